"""The model behind a translation: a class-conditional denoiser and the codec to its sample space.

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

from phenotwin.errors import PhenotwinError
from phenotwin.modeling.conditioning import conditioned_forward, from_vae_channels, to_vae_channels, vae_downsampling


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' means CUDA, then Apple MPS, then CPU. A device this machine lacks is refused here,
    by name, rather than failing at the first tensor moved with torch's own message."""
    if str(device) != "auto":
        try:
            chosen = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise PhenotwinError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps.") from err
        available = {"cpu": True, "cuda": torch.cuda.is_available(),
                     "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
        if not available.get(chosen.type, True):
            raise PhenotwinError(f"device {device!r} was asked for but this machine has no {chosen.type.upper()} "
                                 "device torch can use; use --device auto (or cpu).")
        if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise PhenotwinError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                 f"numbered from 0; use cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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

    def __init__(self, checkpoint: Any, device: torch.device, dtype: torch.dtype):
        """`checkpoint`: a loaded `phenotwin.checkpoint.Checkpoint` (not imported: this package is a leaf)."""
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

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | int, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        sample = sample.to(self.dtype)
        t = torch.as_tensor(timestep, device=self.device).reshape(-1).expand(sample.shape[0])
        return conditioned_forward(self.info.kind, self.unet, sample, t, labels, self.class_embeddings).float()

    def predict(self, sample: torch.Tensor, timestep: Any, labels: torch.Tensor, guidance: float = 0.0) -> torch.Tensor:
        """Conditional prediction; with guidance w > 0, classifier-free guidance cond + w (cond - uncond),
        uncond being the null condition of each label's own batch row (`CheckpointInfo.batch_row`)."""
        if guidance <= 0:
            return self.predict_field(sample, timestep, labels)
        stride = self.info.null_class + 1
        null = labels - labels % stride + self.info.null_class
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
