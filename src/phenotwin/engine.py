"""The model behind a translation: a class-conditional denoiser, its codec and its schedulers.

Three checkpoint kinds share one interface so DDIM inversion and sampling are written once:
- `pixel`: a `UNet2DModel` on the image, the class added to the timestep embedding (PhenDiff);
- `latent`: the same UNet on `AutoencoderKL` latents;
- `stable-diffusion`: a `UNet2DConditionModel` whose cross-attention context is a learned
  per-class embedding (in place of a text encoder), on VAE latents (Phen-LDiff).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from phenotwin.checkpoint import Checkpoint


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' means CUDA, then Apple MPS, then CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def inference_schedulers(scheduler_config: dict[str, Any], steps: int):
    """A matched pair (DDIM inverse, DDIM) whose step levels mirror each other exactly.

    Inversion step i moves the sample up to level inverse.timesteps[i]; generation step j
    moves it down from sampler.timesteps[j]; they visit the same levels in reverse order,
    which is what lets generation start from any point of a cached inversion trajectory.
    """
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    config = dict(scheduler_config)
    # Clipping x0 breaks the invertibility of DDIM, and 'linspace' has no inverse in diffusers.
    config["clip_sample"] = False
    if config.get("timestep_spacing") not in ("leading", "trailing"):
        config["timestep_spacing"] = "leading"
    sampler = DDIMScheduler.from_config(config)
    inverse = DDIMInverseScheduler.from_config(config)
    sampler.set_timesteps(steps)
    inverse.set_timesteps(steps)
    if len(sampler.timesteps) > steps:
        # diffusers builds "trailing" timesteps with np.arange over a float stride: for some
        # step counts (61, 103, 121, ... of 1000) a rounding error adds a last level at t = -1,
        # which indexes the noisiest alpha and makes one step more than asked. Drop it.
        sampler.timesteps = sampler.timesteps[:steps]
        inverse.timesteps = inverse.timesteps[-steps:]
    if not torch.equal(sampler.timesteps.flip(0), inverse.timesteps):
        raise RuntimeError(
            f"DDIM and inverse DDIM timesteps disagree for {steps} steps "
            f"({sampler.timesteps.tolist()[:3]}... vs {inverse.timesteps.tolist()[-3:]})"
        )
    return inverse, sampler


def resize_class_embedding(unet: torch.nn.Module, rows: int, fresh: bool = False) -> None:
    """Give a UNet2DModel `rows` class embeddings for other conditions; new (or, with `fresh`,
    all) rows start near the old mean."""
    old = unet.class_embedding
    if old.num_embeddings == rows and not fresh:
        return
    new = torch.nn.Embedding(rows, old.embedding_dim)
    with torch.no_grad():
        new.weight.copy_(old.weight.mean(dim=0, keepdim=True).expand(rows, -1))
        new.weight.add_(torch.randn_like(new.weight) * old.weight.std() * 0.1)
    unet.class_embedding = new
    unet.register_to_config(num_class_embeds=rows)


def to_vae_channels(images: torch.Tensor, vae_channels: int) -> torch.Tensor:
    """Feed 1- or 2-channel microscopy to a (pretrained, RGB) VAE: grey is repeated, missing
    channels are black (model range -1). `from_vae_channels` undoes it."""
    channels = images.shape[1]
    if vae_channels == channels:
        return images
    if channels == 1:
        return images.repeat(1, vae_channels, 1, 1)
    return torch.cat([images, torch.full_like(images[:, :1], -1.0).repeat(1, vae_channels - channels, 1, 1)], dim=1)


def from_vae_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[1] == channels:
        return images
    return images.mean(dim=1, keepdim=True) if channels == 1 else images[:, :channels]


def vae_downsampling(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Origins of tiles covering `length`: evenly spread, neighbours overlapping by at least
    `overlap` of a tile, the first and last flush with the ends."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    count = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def blend_window(tile: int, device) -> torch.Tensor:
    """Smooth (Hann) weights for one tile: a tile's prediction fades out towards its edges,
    where the neighbouring tile's takes over, so no seam can form. Never zero, so border
    pixels covered by one tile keep its prediction."""
    ramp = torch.hann_window(tile + 2, periodic=False, device=device)[1:-1]
    return (ramp[:, None] * ramp[None, :]).clamp_min(1e-3)


class Denoiser:
    """Class-conditional noise predictor plus the encode/decode between images and its sample space.

    `calls` counts UNet evaluations (a batch counts once) so tests and benchmarks can prove
    that work was or was not repeated.

    A sample larger than the model's native size is denoised tile by tile at every step,
    the tiles' predictions blended into one prediction for the whole field (as in
    MultiDiffusion): the field is a single diffusion state, so neighbouring tiles agree in
    their overlap by construction, and only `tile_batch` tiles' activations exist at once.
    """

    tile_overlap = 0.25
    tile_batch = 8
    tiling = True  # False runs the UNet on the whole field at once (for comparisons; memory grows with area)
    # Called as tile_progress(done, total) after each batch of tiles, from the thread doing the
    # work: a step over a large field takes long, and a GUI wants to show that it moves.
    tile_progress: Callable[[int, int], object] | None = None

    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype):
        self.info = checkpoint.info
        self.device = device
        self.dtype = dtype
        self.unet = checkpoint.unet.to(device=device).eval()
        if dtype != torch.float32:
            self.unet.to(dtype=dtype)
        # The VAE stays float32: its decoder overflows in float16 on real images.
        self.vae = checkpoint.vae.to(device=device).eval() if checkpoint.vae is not None else None
        self.class_embeddings = (
            checkpoint.class_embeddings.to(device=device, dtype=dtype) if checkpoint.class_embeddings is not None else None
        )
        self.calls = 0
        if self.vae is not None:
            self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
            self.vae_channels = int(self.vae.config.in_channels)
            if self.vae_channels < self.info.channels:
                raise ValueError(
                    f"the VAE takes {self.vae_channels} channels but the model has {self.info.channels}"
                )

    @property
    def null_label(self) -> int:
        return self.info.null_class

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | int, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        sample = sample.to(self.dtype)
        t = torch.as_tensor(timestep, device=self.device).reshape(-1).expand(sample.shape[0])
        if self.info.kind == "stable-diffusion":
            context = self.class_embeddings[labels]
            out = self.unet(sample, t, encoder_hidden_states=context).sample
        else:
            out = self.unet(sample, t, class_labels=labels).sample
        return out.float()

    def predict(self, sample: torch.Tensor, timestep: Any, labels: torch.Tensor, guidance: float = 0.0) -> torch.Tensor:
        """Conditional prediction; with guidance w > 0, classifier-free guidance cond + w (cond - uncond)."""
        if guidance <= 0:
            return self.predict_field(sample, timestep, labels)
        null = torch.full_like(labels, self.null_label)
        both = self.predict_field(torch.cat([sample, sample]), timestep, torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        return cond + guidance * (cond - uncond)

    @property
    def tile_size(self) -> int:
        return self.sample_shape()[1]

    def predict_field(self, sample: torch.Tensor, timestep: Any, labels: torch.Tensor) -> torch.Tensor:
        """The model's prediction for a sample of any size >= the native size, tiled when larger."""
        tile = self.tile_size
        height, width = sample.shape[-2:]
        if (height <= tile and width <= tile) or not self.tiling:
            return self(sample, timestep, labels)
        ys = tile_starts(height, tile, self.tile_overlap)
        xs = tile_starts(width, tile, self.tile_overlap)
        window = blend_window(tile, sample.device)
        weight = torch.zeros((height, width), device=sample.device)
        for y in ys:
            for x in xs:
                weight[y : y + tile, x : x + tile] += window
        out = torch.zeros(sample.shape, dtype=torch.float32, device=sample.device)
        jobs = [(b, y, x) for b in range(sample.shape[0]) for y in ys for x in xs]
        for first in range(0, len(jobs), self.tile_batch):
            chunk = jobs[first : first + self.tile_batch]
            tiles = torch.stack([sample[b, :, y : y + tile, x : x + tile] for b, y, x in chunk])
            predictions = self(tiles, timestep, labels[[b for b, _, _ in chunk]])
            for (b, y, x), prediction in zip(chunk, predictions):
                out[b, :, y : y + tile, x : x + tile] += prediction * window
            if self.tile_progress is not None:
                self.tile_progress(first + len(chunk), len(jobs))
        return out / weight

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Model-range images (B, C, H, W) to the diffusion sample space (identity for pixel models)."""
        if self.vae is None:
            return images.float()
        x = to_vae_channels(images.float(), self.vae_channels)
        self._tile_vae_for(x.shape[-1], x.shape[-2])
        # The posterior mean, not a sample: inversion must be deterministic.
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    def _tile_vae_for(self, width: int, height: int) -> None:
        """diffusers' own VAE tiling, for fields larger than the model's images (bounded memory)."""
        if max(width, height) > self.info.image_size:
            self.vae.enable_tiling()
        else:
            self.vae.disable_tiling()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.float()
        factor = vae_downsampling(self.vae)
        self._tile_vae_for(latents.shape[-1] * factor, latents.shape[-2] * factor)
        images = self.vae.decode(latents.float() / self.scaling_factor).sample
        return from_vae_channels(images, self.info.channels)

    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the space diffusion runs in."""
        size = self.info.image_size
        if self.vae is not None:
            size //= vae_downsampling(self.vae)
        return int(self.unet.config.in_channels), size, size
