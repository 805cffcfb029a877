"""Tiny random checkpoints of every kind, built in seconds, for tests and benchmarks.

Pretrained weights cannot be downloaded on test machines, so these stand in for them; they
are written to disk and read back through the real loading code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from phenotwin.checkpoint import SAFE_LOAD, Checkpoint, CheckpointInfo, save_checkpoint
from phenotwin.train.models import scheduler_config

CLASSES = ("control", "treated")


def _tame(unet):
    """Scale the output layer of a random UNet down, so its predictions are small and smooth
    like a trained model's; random full-scale outputs make any ODE solver, DDIM included,
    diverge, which would test nothing about phenotwin."""
    import torch

    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    return unet


def _tiny_pixel_unet(channels: int, size: int, labels: int):
    from diffusers import UNet2DModel

    return _tame(UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=labels,
    ))


def _tiny_vae(channels: int, size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=size,
        # Like Stable Diffusion's 0.18215: brings this random encoder's latents to about unit variance.
        scaling_factor=3.5,
    )


def _tiny_sd_unet(latent_size: int, context_dim: int = 32):
    from diffusers import UNet2DConditionModel

    return _tame(UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    ))


def make_tiny_sd_base(path: str | os.PathLike, channels: int = 3, size: int = 32, seed: int = 0) -> Path:
    """A random Stable-Diffusion-architecture diffusers folder (unet/, vae/, scheduler/), like a local SD copy."""
    import torch
    from diffusers import DDIMScheduler

    torch.manual_seed(seed)
    folder = Path(path)
    _tiny_sd_unet(size // 2).save_pretrained(folder / "unet", safe_serialization=True)
    _tiny_vae(channels, size).save_pretrained(folder / "vae", safe_serialization=True)
    DDIMScheduler.from_config(scheduler_config()).save_pretrained(folder / "scheduler")
    return folder


def make_tiny_checkpoint(
    path: str | os.PathLike,
    kind: str = "pixel",
    channels: int = 2,
    size: int = 32,
    classes: tuple[str, ...] = CLASSES,
    lora: bool = False,
    seed: int = 0,
    normalization: dict[str, Any] | None = None,
    overwrite: bool = False,
    batches: tuple[str, ...] | None = None,
    **schedule: Any,
) -> Path:
    """Build and save a random checkpoint of `kind`; with `lora` (stable-diffusion only), a
    peft LoRA delta over a tiny SD base folder written beside it; with `batches`, a label per
    condition and batch (`CheckpointInfo.batch_row`)."""
    import torch

    torch.manual_seed(seed)
    labels = (len(classes) + 1) * (len(batches or ()) + 1)
    folder = Path(path)
    vae = class_embeddings = None
    base = adapter = None
    if kind == "pixel":
        unet = _tiny_pixel_unet(channels, size, labels)
    elif kind == "latent":
        unet = _tiny_pixel_unet(4, size // 2, labels)
        unet.register_to_config(in_channels=4)
        vae = _tiny_vae(channels, size)
    elif kind == "stable-diffusion":
        class_embeddings = torch.randn(labels, 4, 32) * 0.5
        if lora:
            from peft import LoraConfig, get_peft_model

            base_folder = make_tiny_sd_base(folder.parent / f"{folder.name}-base", channels, size, seed)
            from diffusers import UNet2DConditionModel

            base_unet = UNet2DConditionModel.from_pretrained(base_folder / "unet", **SAFE_LOAD)
            unet = get_peft_model(
                base_unet, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
            )
            for name, param in unet.named_parameters():  # a non-trivial delta, as after training
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.02)
            base, adapter = os.path.relpath(base_folder, folder), "lora"
        else:
            unet = _tiny_sd_unet(size // 2)
            vae = _tiny_vae(channels, size)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    info = CheckpointInfo(
        kind=kind,
        classes=list(classes),
        image_size=size,
        channels=channels,
        normalization=normalization or {"mode": "fixed", "low": [0.0] * channels, "high": [1.0] * channels},
        provenance={"method": "random", "seed": seed, "note": "tiny random model for tests"},
        base=base,
        adapter=adapter,
        batches=list(batches) if batches else None,
    )
    checkpoint = Checkpoint(
        info=info, unet=unet, scheduler_config=scheduler_config(**schedule), vae=vae, class_embeddings=class_embeddings
    )
    return save_checkpoint(checkpoint, folder, overwrite=overwrite)


def make_tiny_plates_and_encoder(root: str | os.PathLike, n: int = 4, batches: int = 2, size: int = 32,
                                 seed: int = 3, steps: int = 4) -> tuple[Path, Path]:
    """Synthetic plates in root/plates (batches.csv included) and a few-step encoder on them in root/enc:
    the smallest material `phenotwin embed` and the map can run on in a test."""
    import torch

    from phenotwin.embed.trainer import EmbedConfig, train_steps
    from phenotwin.progress import drive
    from phenotwin.synthetic.batches import make_plates, write_plates

    torch.set_num_threads(1)
    root = Path(root)
    write_plates(root / "plates", make_plates(n, batches, size=size, seed=seed))
    config = EmbedConfig(data=str(root / "plates"), out=str(root / "enc"), steps=steps, batch_size=8, size=16,
                         width=8, save_every=steps)
    return root / "plates", drive(train_steps(config))
