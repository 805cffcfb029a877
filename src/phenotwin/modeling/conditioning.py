"""How a condition reaches the network, written once for inference and training.

- `pixel` and `latent` kinds: a `UNet2DModel` whose class embedding is added to the timestep
  embedding (PhenDiff);
- `stable-diffusion` kind: a `UNet2DConditionModel` whose cross-attention context is a learned
  per-class embedding in place of a text encoder (Phen-LDiff).
The last class index is the "no condition" label used for classifier-free guidance.
"""

from __future__ import annotations

import torch


def conditioned_forward(kind: str, unet: torch.nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                        labels: torch.Tensor, contexts: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's prediction for `sample` under the class `labels`: the one dispatch by kind."""
    if kind == "stable-diffusion":
        return unet(sample, timesteps, encoder_hidden_states=contexts[labels]).sample
    return unet(sample, timesteps, class_labels=labels).sample


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
    """How many pixels one latent pixel stands for, per side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
