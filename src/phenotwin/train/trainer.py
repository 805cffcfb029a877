"""Training and fine-tuning of class-conditional diffusion models, driven by accelerate.

One loop serves every method:
- `scratch`: a compact class-conditional pixel UNet sized for CPU training (PhenDiff);
- `full`: every weight of an existing model is trained;
- `lora`: low-rank adapters (peft) on attention and convolution layers;
- `svdiff`: shifts of the singular values of the weights (`phenotwin.svdiff`).
Fine-tuning starts from a phenotwin checkpoint (any kind) or from a Stable-Diffusion
architecture diffusers folder, whose text conditioning is replaced by one learned context
per condition (Phen-LDiff).

Long runs behave: a `TrainProgress` per step (loss, learning rate), the model saved
atomically every N steps with a sample grid, the full training state (optimizer, EMA, RNGs)
saved beside it so `resume=True` continues after a kill, and an interrupt saves first.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phenotwin.checkpoint import INFO_FILE, SAFE_LOAD, TRAINING_DIR, Checkpoint, CheckpointInfo, read_info, save_checkpoint
from phenotwin.errors import PhenotwinError
from phenotwin.train.data import AugmentedCrops, ConditionImages, load_condition_folders

METHODS = ("scratch", "full", "lora", "svdiff")
DEFAULT_LEARNING_RATES = {"scratch": 1e-3, "full": 1e-4, "lora": 1e-3, "svdiff": 5e-3}
STATE_DIR = "state"


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored in the checkpoint's provenance."""

    data: str
    out: str
    method: str = "scratch"
    base: str | None = None
    size: int = 64
    steps: int = 3000
    batch_size: int = 16
    learning_rate: float | None = None
    warmup_steps: int = 100
    ema_decay: float = 0.999
    class_dropout: float = 0.1
    checkpoint_every: int = 500
    seed: int = 0
    width: int = 32
    vae: str | None = None
    prediction_type: str = "v_prediction"
    zero_snr: bool = True
    lora_rank: int = 8
    context_tokens: int = 4
    mixed_precision: str = "auto"
    channel_axis: int | None = None
    channel_names: list[str] | None = None
    max_per_class: int | None = None
    sample_steps: int = 25
    overwrite: bool = False
    resume: bool = False
    command: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.method not in METHODS:
            raise PhenotwinError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.method != "scratch" and not self.base:
            raise PhenotwinError(
                f"method {self.method!r} fine-tunes an existing model: give --base (a phenotwin checkpoint or a "
                "Stable-Diffusion diffusers folder), or use --method scratch."
            )
        if self.method == "scratch" and self.base:
            raise PhenotwinError("--base is for fine-tuning; use --method full, lora or svdiff with it.")
        if self.vae and self.method != "scratch":
            raise PhenotwinError("--vae is for latent models trained from scratch; fine-tuning uses the base's VAE.")
        for name in ("steps", "batch_size", "checkpoint_every", "size", "width", "lora_rank", "sample_steps"):
            if getattr(self, name) < 1:
                raise PhenotwinError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.size % 8:
            raise PhenotwinError(f"size must be a multiple of 8 (the UNet halves it three times), got {self.size}.")
        if not 0 <= self.class_dropout < 1:
            raise PhenotwinError(f"class_dropout must be in [0, 1), got {self.class_dropout}.")
        if self.channel_names is not None and not all(self.channel_names):
            raise PhenotwinError("channel names must not be empty, e.g. --channel-names nucleus golgi.")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise PhenotwinError(f"prediction_type must be epsilon, v_prediction or sample, got {self.prediction_type!r}.")


@dataclass(frozen=True)
class TrainProgress:
    step: int
    total: int
    loss: float
    learning_rate: float
    saved: bool = False


# -- model construction ---------------------------------------------------------------


def scratch_scheduler_config(config: TrainConfig) -> dict[str, Any]:
    """PhenDiff's measured choices by default: v-prediction, zero-terminal-SNR, trailing steps."""
    from phenotwin.testing import scheduler_config

    return scheduler_config(
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.zero_snr,
        timestep_spacing="trailing",
    )


def scratch_unet(channels: int, size: int, classes: int, width: int):
    """A compact class-conditional UNet: four levels, attention only at the coarsest two."""
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
        num_class_embeds=classes + 1,
        resnet_time_scale_shift="scale_shift",
    )


def _is_phenotwin_checkpoint(path: Path) -> bool:
    return (path / INFO_FILE).is_file()


def _load_base(config: TrainConfig, data: ConditionImages):
    """Base model for fine-tuning: (kind, unet, vae, class_embeddings, scheduler_config, base path,
    and for a phenotwin base its `CheckpointInfo`: its defaults and provenance carry over)."""
    import torch

    base = Path(config.base).expanduser().resolve()
    if _is_phenotwin_checkpoint(base):
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
        same_classes = info.classes == data.classes
        if info.kind == "stable-diffusion":
            if not same_classes:
                class_embeddings = _fresh_contexts(len(data.classes), class_embeddings.shape[1], class_embeddings.shape[2],
                                                   class_embeddings)
        elif not same_classes:
            from phenotwin.engine import resize_class_embedding

            # Other conditions, even as many, must not inherit the old ones' embeddings in order.
            resize_class_embedding(loaded.unet, len(data.classes) + 1, fresh=True)
        return info.kind, loaded.unet, loaded.vae, class_embeddings, loaded.scheduler_config, str(base), info

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
        scheduler_config = dict(DDIMScheduler.from_config(DDIMScheduler.load_config(base / "scheduler")).config)
        dim = unet.config.cross_attention_dim
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            class_embeddings = _fresh_contexts(len(data.classes), config.context_tokens, dim)
        return "stable-diffusion", unet, vae, class_embeddings, scheduler_config, str(base), None
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


def _fresh_contexts(classes: int, tokens: int, dim: int, previous=None):
    """One learned cross-attention context per class plus the null context, around the old mean if any."""
    import torch

    centre = previous.mean(dim=0, keepdim=True) if previous is not None else torch.zeros(1, tokens, dim)
    return centre.repeat(classes + 1, 1, 1) + torch.randn(classes + 1, tokens, dim)


def conditional_module(kind: str, unet, class_embeddings):
    """One torch module holding everything trained (UNet, and for stable-diffusion the per-class
    contexts), with the call signature of `engine.Denoiser`: what accelerate wraps and the
    optimizer and EMA see. Defined here because torch is imported lazily."""
    import torch

    class ConditionalUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet
            if class_embeddings is not None:
                self.contexts = torch.nn.Parameter(class_embeddings.clone())

        def forward(self, sample, timesteps, labels):
            if kind == "stable-diffusion":
                return self.unet(sample, timesteps, encoder_hidden_states=self.contexts[labels]).sample
            return self.unet(sample, timesteps, class_labels=labels).sample

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
        from phenotwin.svdiff import add_spectral_shifts

        unet.requires_grad_(False)
        add_spectral_shifts(unet)
        if kind != "stable-diffusion":
            unet.class_embedding.requires_grad_(True)
        return unet
    raise PhenotwinError(f"unknown method {method!r}")


# -- the run --------------------------------------------------------------------------


class Trainer:
    """Prepare once, then iterate `steps()`; `save()` may be called at any time (e.g. on Stop)."""

    def __init__(self, config: TrainConfig):
        config.check()
        self.config = config
        self.out = Path(config.out)
        self._check_output()
        self.data = load_condition_folders(config.data, config.size, config.channel_axis, config.max_per_class)
        self.channel_names = self._channel_names()
        self._build()

    def _channel_names(self) -> list[str] | None:
        names = self.config.channel_names
        if names is not None and len(names) != self.data.channels:
            raise PhenotwinError(
                f"{len(names)} channel name(s) given ({', '.join(names)}) but the images have {self.data.channels} "
                "channel(s). Give one name per channel, in the images' order."
            )
        return list(names) if names else None

    def _check_output(self) -> None:
        out, config = self.out, self.config
        state = out / TRAINING_DIR / STATE_DIR
        if config.resume:
            if not state.is_dir():
                raise PhenotwinError(
                    f"nothing to resume in {out}: no saved training state ({state}). Start without --resume."
                )
            return
        if out.exists() and any(out.iterdir()) and not config.overwrite:
            what = "a model" if (out / INFO_FILE).is_file() else "files"
            raise PhenotwinError(
                f"{out} already holds {what}. Choose a new --out folder, pass --resume to continue that run, "
                "or --overwrite to replace it."
            )

    def _build(self) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import get_int_from_env, set_seed
        from diffusers import DDIMScheduler
        from diffusers.training_utils import EMAModel

        config, data = self.config, self.data
        mixed = config.mixed_precision
        if mixed == "auto":
            # `accelerate launch` passes the user's accelerate config in the environment; respect it.
            configured = os.environ.get("ACCELERATE_MIXED_PRECISION")
            mixed = configured or ("fp16" if torch.cuda.is_available() else "no")
        # Processes started by torchrun (`accelerate launch --multi_gpu`) or MPI on a machine without CUDA
        # join a gloo group only with cpu=True; without it each would train alone. A single
        # process keeps accelerate's own device choice (MPS on Apple silicon).
        several = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1) > 1
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=several and not torch.cuda.is_available())
        torch.manual_seed(config.seed)  # the same initial weights on every process

        if config.method == "scratch":
            contexts, base, base_info = None, None, None
            if config.vae:
                from phenotwin.engine import vae_downsampling

                kind, vae = "latent", _load_vae(Path(config.vae), data.channels)
                latent_size = config.size // vae_downsampling(vae)
                unet = scratch_unet(vae.config.latent_channels, latent_size, len(data.classes), config.width)
            else:
                kind, vae = "pixel", None
                unet = scratch_unet(data.channels, config.size, len(data.classes), config.width)
            scheduler_config = scratch_scheduler_config(config)
        else:
            kind, unet, vae, contexts, scheduler_config, base, base_info = _load_base(config, data)
        self.kind, self.base, self.scheduler_config = kind, base, scheduler_config
        self.base_info = base_info
        self.noise_schedule = DDIMScheduler.from_config(scheduler_config)
        self.vae = vae.to(self.accelerator.device).eval().requires_grad_(False) if vae is not None else None
        if vae is not None:
            self.scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)

        self.unet = apply_method(config.method, kind, unet, config.lora_rank)
        self.model = conditional_module(kind, self.unet, contexts)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not self.trainable:
            raise PhenotwinError(f"method {config.method} left nothing to train in this model.")
        lr = config.learning_rate or DEFAULT_LEARNING_RATES[config.method]
        self.learning_rate = lr
        optimizer = torch.optim.AdamW(self.trainable, lr=lr, weight_decay=1e-4 if config.method != "svdiff" else 0.0)
        schedule = _cosine_with_warmup(optimizer, config.warmup_steps, config.steps)
        self.model, self.optimizer, self.lr_schedule = self.accelerator.prepare(self.model, optimizer, schedule)
        self.ema = EMAModel(self.trainable, decay=config.ema_decay)
        self.ema.to(self.accelerator.device)
        self.accelerator.register_for_checkpointing(self.ema)
        self.crops = AugmentedCrops(data, config.size)
        # Noise, timesteps and class dropout must differ between processes (seed + process index);
        # accelerate saves and restores each process's generators with the state.
        set_seed(config.seed, device_specific=True)
        self.step = 0
        if config.resume:
            self._load_state()

    # -- state ---------------------------------------------------------------------------

    def _state_dir(self) -> Path:
        return self.out / TRAINING_DIR / STATE_DIR

    def _load_state(self) -> None:
        state = self._state_dir()
        progress = json.loads((state / "progress.json").read_text())
        if progress.get("data_fingerprint") != self.data.fingerprint:
            raise PhenotwinError(
                f"the data in {self.config.data} differ from the data this run started with; resuming would mix "
                "them. Resume with the original data, or start a new run with --overwrite."
            )
        self.accelerator.load_state(str(state))
        self.step = int(progress["step"])

    def _save_state(self) -> None:
        """Optimizer, EMA, RNGs and step, swapped in atomically like the model.

        Every process calls this: accelerate's save_state writes each process's random states."""
        accelerator = self.accelerator
        state = self._state_dir()
        staging = state.with_name(f".{STATE_DIR}-{self.step}")
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()  # nobody writes into a folder being removed
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()  # every process's files are in before the swap
        if accelerator.is_main_process:
            (staging / "progress.json").write_text(
                json.dumps({"step": self.step, "data_fingerprint": self.data.fingerprint,
                            "processes": accelerator.num_processes})
            )
            retired = state.with_name(f".{STATE_DIR}-old")
            if state.exists():
                os.replace(state, retired)
            os.replace(staging, state)
            shutil.rmtree(retired, ignore_errors=True)

    def save(self) -> Path:
        """Write the EMA model as a checkpoint (atomically), the training state and a sample grid."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.ema.store(self.trainable)
            self.ema.copy_to(self.trainable)
            try:
                save_checkpoint(self._checkpoint(), self.out, overwrite=True, keep=(TRAINING_DIR,))
            finally:
                self.ema.restore(self.trainable)
        self._save_state()
        accelerator.wait_for_everyone()
        try:
            if accelerator.is_main_process:
                self._sample_grid()
        finally:
            # The others wait for the samples: a process that leaves the group (end of training)
            # while the main one still works can make gloo abort the main one at its exit.
            accelerator.wait_for_everyone()
        return self.out

    def _checkpoint(self) -> Checkpoint:
        config, data = self.config, self.data
        model = self.accelerator.unwrap_model(self.model)
        contexts = getattr(model, "contexts", None)
        adapter = config.method if config.method in ("lora", "svdiff") else None
        info = CheckpointInfo(
            kind=self.kind,
            classes=data.classes,
            image_size=config.size,
            channels=data.channels,
            normalization=data.normalization(),
            channel_names=self.channel_names,
            provenance={
                "method": config.method,
                "command": config.command,
                "steps": self.step,
                "processes": self.accelerator.num_processes,
                "seed": config.seed,
                "data": str(Path(config.data)),
                "data_fingerprint": data.fingerprint,
                "images_per_class": data.counts(),
                "config": {k: v for k, v in asdict(self.config).items() if k not in ("overwrite", "resume")},
                # How the base was made, so that the whole chain can be re-run from the docs.
                **({"base": {"path": self.base, "provenance": self.base_info.provenance}} if self.base_info else {}),
            },
            base=self.base if adapter else None,
            adapter=adapter,
            # Steps, strength, reference... tuned for the base (by hand, in its phenotwin.json) still fit it.
            **({"defaults": dict(self.base_info.defaults)} if self.base_info else {}),
        )
        return Checkpoint(
            info=info,
            unet=model.unet,
            scheduler_config=self.scheduler_config,
            vae=self.vae,
            class_embeddings=contexts.detach() if contexts is not None else None,
        )

    def _sample_grid(self) -> None:
        """Samples from fixed noise for every condition, drawn by the saved checkpoint itself."""
        from phenotwin.montage import save_montage
        from phenotwin.translate import Translator

        translator = Translator(self.out, device=str(self.accelerator.device))
        rows = []
        for label in translator.classes:
            images = translator.sample(label, count=4, seed=self.config.seed, steps=self.config.sample_steps)
            rows.append(list(images))
        titles = [f"sample {i + 1}" for i in range(4)]
        path = self.out / TRAINING_DIR / "samples" / f"step_{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_montage(path, rows, titles, row_titles=translator.classes)

    # -- the loop ------------------------------------------------------------------------

    def steps(self) -> Generator[TrainProgress, None, Path]:
        """Train until `config.steps`, yielding after every optimizer step."""
        import torch

        config, accelerator = self.config, self.accelerator
        device = accelerator.device
        log_path = self.out / TRAINING_DIR / "log.csv"
        if accelerator.is_main_process and self.step == 0 and (self.out / TRAINING_DIR).exists():
            shutil.rmtree(self.out / TRAINING_DIR)  # --overwrite: the old run's log and samples go too
        if accelerator.is_main_process:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            if not log_path.exists():
                log_path.write_text("step,loss,learning_rate,seconds\n")
        start = time.monotonic()
        null = len(self.data.classes)
        # Each process draws its own batches, from a stream fixed by (seed, process, step):
        # a resumed run continues reproducibly without storing the generator.
        self.crops.reseed(config.seed, self.accelerator.process_index, self.step)
        self.model.train()
        stop_requested = _StopFlag(accelerator)
        stopped = False
        try:
            while self.step < config.steps:
                images, labels = self.crops.batch(config.batch_size)
                x0 = torch.from_numpy(images).to(device)
                labels = torch.from_numpy(labels).to(device)
                # Class dropout teaches the null condition, which classifier-free guidance needs.
                drop = torch.rand(labels.shape, device=device) < config.class_dropout
                labels = torch.where(drop, torch.full_like(labels, null), labels)
                with torch.no_grad():
                    if self.vae is not None:
                        x0 = _encode(self.vae, x0, self.data.channels) * self.scaling_factor
                noise = torch.randn_like(x0)
                t = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (x0.shape[0],), device=device)
                noisy = self.noise_schedule.add_noise(x0, noise, t)
                if config_prediction(self.scheduler_config) == "v_prediction":
                    target = self.noise_schedule.get_velocity(x0, noise, t)
                elif config_prediction(self.scheduler_config) == "sample":
                    target = x0
                else:
                    target = noise
                with accelerator.autocast():
                    prediction = self.model(noisy, t, labels)
                loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
                if not torch.isfinite(loss):
                    raise PhenotwinError(
                        f"the loss became {loss.item()} at step {self.step + 1}; lower --learning-rate and resume."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.trainable, 1.0)
                self.optimizer.step()
                self.lr_schedule.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.ema.step(self.trainable)
                self.step += 1
                value = accelerator.gather(loss.detach()[None]).mean().item()
                lr = self.lr_schedule.get_last_lr()[0]
                if accelerator.is_main_process:
                    with log_path.open("a", newline="") as handle:
                        csv.writer(handle).writerow([self.step, f"{value:.6f}", f"{lr:.3e}", f"{time.monotonic() - start:.1f}"])
                stopped = stop_requested()
                saved = stopped or self.step % config.checkpoint_every == 0 or self.step == config.steps
                if saved:
                    self.model.eval()
                    self.save()
                    self.model.train()
                if stopped:
                    break
                yield TrainProgress(self.step, config.steps, value, lr, saved)
        except (KeyboardInterrupt, GeneratorExit):
            # Stop button, Ctrl-C or a closed worker: keep what was learned, then stop. With several
            # processes a save needs all of them, so only the agreed stop above saves.
            if self.step > 0 and accelerator.num_processes == 1:
                self.save()
            raise
        finally:
            stop_requested.restore()
        if stopped:
            raise KeyboardInterrupt
        return self.out


class _StopFlag:
    """Called after each step: whether any process has been interrupted.

    With several processes, Ctrl-C (sent to all of them by the terminal or the launcher) only
    raises accelerate's trigger, which every process checks after each step: they stop after
    the same step and save together. A KeyboardInterrupt in the middle of a step would leave
    the other processes waiting in a collective. One process keeps Python's KeyboardInterrupt."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.active = accelerator.num_processes > 1
        if self.active:
            self.previous = signal.signal(signal.SIGINT, lambda signum, frame: accelerator.set_trigger())

    def __call__(self) -> bool:
        return self.active and self.accelerator.check_trigger()

    def restore(self) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
            self.active = False


def config_prediction(scheduler_config: dict[str, Any]) -> str:
    return scheduler_config.get("prediction_type", "epsilon")


def _encode(vae, images, channels: int):
    from phenotwin.engine import to_vae_channels

    # A posterior sample, not the mean: the usual latent-diffusion training noise.
    return vae.encode(to_vae_channels(images, vae.config.in_channels)).latent_dist.sample()


def _cosine_with_warmup(optimizer, warmup: int, total: int):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=min(warmup, max(total // 10, 1)),
                                           num_training_steps=total)


def train(config: TrainConfig, progress=None) -> Path:
    """Run a whole training; `progress` gets every `TrainProgress`."""
    trainer = Trainer(config)
    try:
        for event in trainer.steps():
            if progress is not None:
                progress(event)
    finally:
        trainer.accelerator.end_training()  # leaves the process group when there are several processes
    return trainer.out
