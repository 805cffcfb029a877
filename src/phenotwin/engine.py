"""The model behind a translation: a class-conditional denoiser, its codec and its schedulers.

Three checkpoint kinds share one interface so DDIM inversion and sampling are written once:
- `pixel`: a `UNet2DModel` on the image, the class added to the timestep embedding (PhenDiff);
- `latent`: the same UNet on `AutoencoderKL` latents;
- `stable-diffusion`: a `UNet2DConditionModel` whose cross-attention context is a learned
  per-class embedding (in place of a text encoder), on VAE latents (Phen-LDiff).
"""

from __future__ import annotations

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


class Denoiser:
    """Class-conditional noise predictor plus the encode/decode between images and its sample space.

    `calls` counts UNet evaluations (a batch counts once) so tests and benchmarks can prove
    that work was or was not repeated.
    """

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
            return self(sample, timestep, labels)
        null = torch.full_like(labels, self.null_label)
        both = self(torch.cat([sample, sample]), timestep, torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        return cond + guidance * (cond - uncond)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Model-range images (B, C, H, W) to the diffusion sample space (identity for pixel models)."""
        if self.vae is None:
            return images.float()
        x = to_vae_channels(images.float(), self.vae_channels)
        # The posterior mean, not a sample: inversion must be deterministic.
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.float()
        images = self.vae.decode(latents.float() / self.scaling_factor).sample
        return from_vae_channels(images, self.info.channels)

    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the space diffusion runs in."""
        size = self.info.image_size
        if self.vae is not None:
            size //= vae_downsampling(self.vae)
        return int(self.unet.config.in_channels), size, size
