"""What a training run trains: the model built or loaded for it, and how each method wraps it.

- `scratch`: a compact class-conditional pixel UNet sized for CPU training (PhenDiff), or a
  latent one on a frozen autoencoder;
- `full`, `lora`, `svdiff`: a base model loaded from a phenotwin checkpoint or from a
  Stable-Diffusion architecture diffusers folder, whose text conditioning is replaced by one
  learned context per condition (Phen-LDiff); LoRA through peft, SVDiff through
  `phenotwin.modeling.svdiff`.
The noise schedule phenotwin trains with by default is written here too (`scheduler_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phenotwin.checkpoint import INFO_FILE, SAFE_LOAD
from phenotwin.errors import PhenotwinError

if TYPE_CHECKING:
    from phenotwin.checkpoint import CheckpointInfo
    from phenotwin.train.config import TrainConfig
    from phenotwin.train.data import ConditionImages


def scheduler_config(**overrides: Any) -> dict[str, Any]:
    """The DDIM noise schedule phenotwin trains and samples with unless told otherwise."""
    from diffusers import DDIMScheduler

    config = dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
        steps_offset=0,
    )
    config.update(overrides)
    return dict(DDIMScheduler(**config).config)


def scratch_scheduler_config(config: TrainConfig) -> dict[str, Any]:
    """PhenDiff's measured choices by default: v-prediction, zero-terminal-SNR, trailing steps."""
    return scheduler_config(
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.zero_snr,
        timestep_spacing="trailing",
    )


def scratch_unet(channels: int, size: int, labels: int, width: int):
    """A compact class-conditional UNet: four levels, attention only at the coarsest two; `labels`
    class embeddings (`ConditionImages.label_count`: conditions + null, per batch row)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(width, width * 2, width * 2, width * 4),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
        num_class_embeds=labels,
        resnet_time_scale_shift="scale_shift",
    )


@dataclass
class StartingModel:
    """What a run starts from; for a phenotwin base, its `CheckpointInfo` too (its defaults and
    provenance carry over into the trained checkpoint)."""

    kind: str
    unet: Any
    vae: Any
    class_embeddings: Any  # (labels, tokens, dim) contexts for the stable-diffusion kind, else None
    scheduler_config: dict[str, Any]
    base: str | None = None
    base_info: CheckpointInfo | None = None


def starting_model(config: TrainConfig, data: ConditionImages) -> StartingModel:
    """A fresh scratch model, or the base to fine-tune. Draws from torch's global generator."""
    if config.method != "scratch":
        return _load_base(config, data)
    if config.vae:
        from phenotwin.modeling.conditioning import vae_downsampling

        vae = _load_vae(Path(config.vae), data.channels)
        latent_size = config.size // vae_downsampling(vae)
        unet = scratch_unet(vae.config.latent_channels, latent_size, data.label_count, config.width)
        return StartingModel("latent", unet, vae, None, scratch_scheduler_config(config))
    unet = scratch_unet(data.channels, config.size, data.label_count, config.width)
    return StartingModel("pixel", unet, None, None, scratch_scheduler_config(config))


def _load_base(config: TrainConfig, data: ConditionImages) -> StartingModel:
    import torch

    base = Path(config.base).expanduser().resolve()
    if (base / INFO_FILE).is_file():
        from phenotwin.checkpoint import load_checkpoint

        loaded = load_checkpoint(base)
        info = loaded.info
        if info.adapter is not None:
            raise PhenotwinError(
                f"{base} is itself a {info.adapter} delta; fine-tune its base model or a full checkpoint instead."
            )
        if info.channels != data.channels:
            raise PhenotwinError(
                f"the base model takes {info.channels} channel(s) but the data has {data.channels}. "
                "Use a base trained on the same channels."
            )
        class_embeddings = loaded.class_embeddings
        same_labels = info.classes == data.classes and (info.batches or None) == (data.batches or None)
        if info.kind == "stable-diffusion":
            if not same_labels:
                class_embeddings = _fresh_contexts(data.label_count, class_embeddings.shape[1], class_embeddings.shape[2],
                                                   class_embeddings)
        elif not same_labels:
            from phenotwin.modeling.conditioning import resize_class_embedding

            # Other conditions or batches, even as many, must not inherit the old ones' embeddings in order.
            resize_class_embedding(loaded.unet, data.label_count, fresh=True)
        return StartingModel(info.kind, loaded.unet, loaded.vae, class_embeddings, loaded.scheduler_config, str(base),
                             info)

    if (base / "unet").is_dir() and (base / "vae").is_dir():
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        from phenotwin.checkpoint import refuse_pickles, require_weights

        refuse_pickles(base, ("unet", "vae"))
        require_weights(base / "unet", "UNet")
        require_weights(base / "vae", "VAE")
        unet = UNet2DConditionModel.from_pretrained(base / "unet", **SAFE_LOAD)
        vae = AutoencoderKL.from_pretrained(base / "vae", **SAFE_LOAD)
        if vae.config.in_channels < data.channels:
            raise PhenotwinError(
                f"the base VAE takes {vae.config.in_channels} channels but the data has {data.channels}."
            )
        schedule = dict(DDIMScheduler.from_config(DDIMScheduler.load_config(base / "scheduler")).config)
        dim = unet.config.cross_attention_dim
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            class_embeddings = _fresh_contexts(data.label_count, config.context_tokens, dim)
        return StartingModel("stable-diffusion", unet, vae, class_embeddings, schedule, str(base))
    raise PhenotwinError(
        f"--base {base} is neither a phenotwin checkpoint (no {INFO_FILE}) nor a Stable-Diffusion diffusers folder "
        "(with unet/ and vae/ subfolders)."
    )


def _load_vae(path: Path, channels: int):
    """A frozen autoencoder for a latent model trained from scratch: a diffusers AutoencoderKL
    folder, or the vae/ of a phenotwin or Stable-Diffusion folder."""
    from diffusers import AutoencoderKL

    from phenotwin.checkpoint import refuse_pickles, require_weights

    folder = path / "vae" if (path / "vae").is_dir() else path
    refuse_pickles(folder)
    require_weights(folder, "VAE")
    vae = AutoencoderKL.from_pretrained(folder, **SAFE_LOAD)
    if vae.config.in_channels < channels:
        raise PhenotwinError(f"the VAE in {folder} takes {vae.config.in_channels} channels but the data has {channels}.")
    return vae


def _fresh_contexts(labels: int, tokens: int, dim: int, previous=None):
    """One learned cross-attention context per label (each condition and the null one, per batch row),
    around the old mean if any."""
    import torch

    centre = previous.mean(dim=0, keepdim=True) if previous is not None else torch.zeros(1, tokens, dim)
    return centre.repeat(labels, 1, 1) + torch.randn(labels, tokens, dim)


def conditional_module(kind: str, unet, class_embeddings):
    """One torch module holding everything trained (UNet, and for stable-diffusion the per-class
    contexts), called like the inference `Denoiser`'s UNet: what accelerate wraps and the
    optimizer and EMA see. Defined here because torch is imported lazily."""
    import torch

    from phenotwin.modeling.conditioning import conditioned_forward

    class ConditionalUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet
            if class_embeddings is not None:
                self.contexts = torch.nn.Parameter(class_embeddings.clone())

        def forward(self, sample, timesteps, labels):
            return conditioned_forward(kind, self.unet, sample, timesteps, labels, getattr(self, "contexts", None))

    return ConditionalUNet()


def _lora_targets(unet) -> list[str]:
    import torch

    wanted = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out")
    return sorted({
        name for name, module in unet.named_modules()
        if name.endswith(wanted) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    })


def apply_method(method: str, kind: str, unet, rank: int):
    """Wrap or freeze `unet` for the method; returns the (possibly wrapped) UNet."""
    if method in ("scratch", "full"):
        unet.requires_grad_(True)
        return unet
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        modules_to_save = ["class_embedding"] if kind != "stable-diffusion" else None
        lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=_lora_targets(unet), modules_to_save=modules_to_save)
        return get_peft_model(unet, lora)
    if method == "svdiff":
        from phenotwin.modeling.svdiff import add_spectral_shifts

        unet.requires_grad_(False)
        add_spectral_shifts(unet)
        if kind != "stable-diffusion":
            unet.class_embedding.requires_grad_(True)
        return unet
    raise PhenotwinError(f"unknown method {method!r}")


def encode(vae, images):
    """Latents to train on: a posterior sample, not the mean (the usual latent-diffusion training noise)."""
    from phenotwin.modeling.conditioning import to_vae_channels

    return vae.encode(to_vae_channels(images, vae.config.in_channels)).latent_dist.sample()
