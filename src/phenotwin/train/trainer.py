"""The training loop, driven by accelerate: one loop for every method and model kind.

What is trained comes from `phenotwin.train.models`, the settings from
`phenotwin.train.config` (`TrainConfig` and `TrainProgress` are importable from here too).
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from phenotwin.checkpoint import INFO_FILE, TRAINING_DIR, Checkpoint, CheckpointInfo, save_checkpoint
from phenotwin.errors import PhenotwinError
from phenotwin.train.config import DEFAULT_LEARNING_RATES, TrainConfig, TrainProgress
from phenotwin.train.data import AugmentedCrops, load_condition_folders
from phenotwin.train.models import apply_method, conditional_module, encode, starting_model

__all__ = ["STATE_DIR", "TrainConfig", "TrainProgress", "Trainer", "train"]

STATE_DIR = "state"


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

        initial = starting_model(config, data)
        self.kind, self.base, self.scheduler_config = initial.kind, initial.base, initial.scheduler_config
        self.base_info = initial.base_info
        self.noise_schedule = DDIMScheduler.from_config(initial.scheduler_config)
        vae = initial.vae
        self.vae = vae.to(self.accelerator.device).eval().requires_grad_(False) if vae is not None else None
        if vae is not None:
            self.scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)

        self.unet = apply_method(config.method, initial.kind, initial.unet, config.lora_rank)
        self.model = conditional_module(initial.kind, self.unet, initial.class_embeddings)
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
        from phenotwin import Translator
        from phenotwin.montage import save_montage

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
                        x0 = encode(self.vae, x0) * self.scaling_factor
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
