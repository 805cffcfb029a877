"""The training loop, driven by accelerate: one loop for every method and model kind.

What is trained comes from `phenotwin.train.models`, the settings from
`phenotwin.train.config` (`TrainConfig` and `TrainProgress` are importable from here too),
what survives between sessions from `phenotwin.train.state`. Long runs behave: a
`TrainProgress` per step (loss, learning rate), the model saved atomically every N steps with
a sample grid and a candidate copy of its weights, the full training state (optimizer, EMA,
RNGs) saved beside it so `resume=True` continues after a kill, and an interrupt saves first.
After the last step `phenotwin.train.selection` calibrates on the held-out images and keeps
the best save.
"""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from phenotwin.checkpoint import INFO_FILE, TRAINING_DIR, Checkpoint, CheckpointInfo, save_checkpoint
from phenotwin.errors import PhenotwinError
from phenotwin.io import write_atomically
from phenotwin.pipeline.settings import MODEL_DEFAULTS, SCRATCH_DEFAULTS
from phenotwin.train import state
from phenotwin.train.config import OutputFolderInUse, TrainConfig, TrainProgress
from phenotwin.train.data import AugmentedCrops, dropped_labels, hold_out, load_condition_folders, with_batches
from phenotwin.train.models import apply_method, conditional_module, encode, starting_model
from phenotwin.train.state import STATE_DIR

__all__ = ["STATE_DIR", "TrainConfig", "TrainProgress", "Trainer", "train"]


class Trainer:
    """Prepare once, then iterate `steps()`; `save()` may be called at any time (e.g. on Stop)."""

    def __init__(self, config: TrainConfig):
        config.check()
        self.config = config
        self.out = Path(config.out)
        self._check_folders_apart()
        self.tidied = state.tidy_killed_run(self.out) if os.environ.get("RANK", "0") == "0" else []
        self._check_output()
        everything = load_condition_folders(config.data, config.size, config.channel_axis, config.max_per_class,
                                            config.allow_mixed_bit_depth)
        if config.batches:  # each image's plate or day, a second label, when the folder has batches.csv
            everything = with_batches(everything, config.data)
        # The held-out images are never trained on: they calibrate the model and choose the save to keep.
        self.data, self.validation, self.split = hold_out(everything, config.data, config.validation_fraction,
                                                          config.seed)
        self.channel_names = self._channel_names()
        if config.resume:
            state.check_same_data(self.out, config.data, self.data.fingerprint, self.split)
        self._build()
        self.calibration = None  # a `selection.Calibration` once the last step is done
        self.last_event: TrainProgress | None = None

    def _channel_names(self) -> list[str] | None:
        names = self.config.channel_names
        if names is not None and len(names) != self.data.channels:
            raise PhenotwinError(
                f"{len(names)} channel name(s) given ({', '.join(names)}) but the images have {self.data.channels} "
                "channel(s). Give one name per channel, in the images' order."
            )
        return list(names) if names else None

    def _check_folders_apart(self) -> None:
        """The output folder must not hold an input (replacing the model would touch it), nor lie in
        the data (the model folder would become a condition)."""
        out = self.out.expanduser().resolve()
        inputs = [("data", self.config.data), ("base", self.config.base), ("vae", self.config.vae)]
        for name, given in inputs:
            if not given:
                continue
            path = Path(given).expanduser().resolve()
            if name != "data" and not path.is_dir():
                raise PhenotwinError(
                    f"the {name} folder {given} does not exist. Give a phenotwin model folder"
                    + (" or a Stable-Diffusion diffusers folder." if name == "base" else " or an AutoencoderKL folder.")
                )
            if path == out or out in path.parents:
                raise PhenotwinError(
                    f"the {name} folder {given} lies inside the output folder {self.out} (or is it): the model "
                    f"written there would mix with it. Choose an output folder outside {given}."
                )
            if name == "data" and path in out.parents:
                raise PhenotwinError(
                    f"the output folder {self.out} lies inside the data folder {given}: the model folder would "
                    "become a condition of the next run. Choose an output folder outside the data."
                )

    def _check_output(self) -> None:
        out, config = self.out, self.config
        saved = state.state_dir(out)
        if out.exists() and not out.is_dir():
            raise PhenotwinError(f"{out} is a file; a model is a folder. Choose another output folder.")
        if config.resume:
            if not saved.is_dir():
                raise PhenotwinError(
                    f"nothing to resume in {out}: no saved training state ({saved}). Start without --resume."
                )
            state.check_same_run(out, config, state.saved_progress(out))
            return
        if out.exists() and any(out.iterdir()):
            foreign = state.foreign(out)
            if not config.overwrite or foreign:
                raise OutputFolderInUse(out, foreign, holds_model=(out / INFO_FILE).is_file(),
                                        resumable=saved.is_dir(), overwriting=config.overwrite)

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
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in named]
        self.trainable_names = [name for name, _ in named]
        if not self.trainable:
            raise PhenotwinError(f"method {config.method} left nothing to train in this model.")
        lr = config.effective_learning_rate()
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
            self.accelerator.load_state(str(state.state_dir(self.out)))
            self.step = int(state.saved_progress(self.out)["step"])
        from phenotwin.input_fit import training_statistics

        # What every translation's input-fit check compares with: the intensities trained on.
        self.intensity_statistics = training_statistics(data.images, data.low, data.high)

    # -- saving --------------------------------------------------------------------------

    def save(self) -> Path:
        """Write the EMA model as a checkpoint (atomically), the training state and a sample grid."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.ema.store(self.trainable)
            self.ema.copy_to(self.trainable)
            try:
                save_checkpoint(self._checkpoint(), self.out, overwrite=True, keep=(TRAINING_DIR,))
                self._write_candidate()
            finally:
                self.ema.restore(self.trainable)
        state.save_state(self.accelerator, self.out, self.step, {
            "data_fingerprint": self.data.fingerprint, "validation": self.split,
            "config": state.saved_config(self.config)})
        accelerator.wait_for_everyone()
        try:
            if accelerator.is_main_process:
                self._sample_grid()
        finally:
            # The others wait for the samples: a process that leaves the group (end of training)
            # while the main one still works can make gloo abort the main one at its exit.
            accelerator.wait_for_everyone()
        return self.out

    def _write_candidate(self) -> None:
        """The weights just saved, kept as training/candidates/step-N.safetensors for the choice at the end."""
        from safetensors.torch import save_file

        from phenotwin.train.selection import candidate_file

        tensors = {name: p.detach().float().cpu().contiguous().clone()
                   for name, p in zip(self.trainable_names, self.trainable)}
        write_atomically(candidate_file(self.out, self.step), lambda temp: save_file(tensors, temp))

    def load_candidate(self, file: Path) -> None:
        """Put a candidate's weights into the model (callers store and restore the live ones)."""
        import torch
        from safetensors.torch import load_file

        tensors = load_file(file)
        with torch.no_grad():
            for name, p in zip(self.trainable_names, self.trainable):
                p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))

    def candidate_translator(self):
        """A Translator over the model being trained (float32, sharing its weights): `load_candidate` changes both."""
        import torch

        from phenotwin import Translator

        return Translator(self._checkpoint(), device=str(self.accelerator.device), dtype=torch.float32)

    def write_model(self, candidate: Path, selection: dict[str, Any]) -> None:
        """Save a candidate's weights as the model, with how it was chosen; the live weights stay."""
        self.ema.store(self.trainable)
        try:
            self.load_candidate(candidate)
            save_checkpoint(self._checkpoint(selection), self.out, overwrite=True, keep=(TRAINING_DIR,))
        finally:
            self.ema.restore(self.trainable)

    def _checkpoint(self, selection: dict[str, Any] | None = None) -> Checkpoint:
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
            intensity_statistics=self.intensity_statistics,
            batches=data.batches,
            provenance={
                "method": config.method,
                "command": config.command,
                "steps": self.step,
                "processes": self.accelerator.num_processes,
                "seed": config.seed,
                "data": str(Path(config.data)),
                "data_fingerprint": data.fingerprint,
                "images_per_class": data.counts(),
                "validation": self.split,
                **({"selection": selection} if selection else {}),
                "config": state.saved_config(self.config),
                # How the base was made, so that the whole chain can be re-run from the docs.
                **({"base": {"path": self.base, "provenance": self.base_info.provenance}} if self.base_info else {}),
            },
            base=self.base if adapter else None,
            adapter=adapter,
            # Steps, strength, reference... tuned for the base (by hand, in its phenotwin.json) still fit it.
            defaults=dict(self.base_info.defaults) if self.base_info else {**MODEL_DEFAULTS, **SCRATCH_DEFAULTS},
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
        import torch

        from phenotwin import Translator
        from phenotwin.montage import save_montage

        # Loading the model initialises weights from torch's generator before reading them: fork it,
        # or a run resumed from this save (whose state holds the generator as it was) would diverge.
        with torch.random.fork_rng(devices=[]):
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
        """Train until `config.steps`, yielding after every optimizer step; then calibrate on the held-out
        images and keep the best save (events with a "calibrating: ..." stage, `self.calibration.notes`)."""
        from phenotwin.train.selection import Calibration

        yield from self._train_steps()
        self.calibration = Calibration(self)
        if self.accelerator.is_main_process:
            yield from self.calibration.steps()
        self.accelerator.wait_for_everyone()
        return self.out

    def _train_steps(self) -> Generator[TrainProgress, None, Path]:
        import torch

        config, accelerator = self.config, self.accelerator
        device = accelerator.device
        log_path = self.out / TRAINING_DIR / "log.csv"
        if accelerator.is_main_process:
            state.start_log(log_path, self.step)
        start = time.monotonic()
        null, batch_count = len(self.data.classes), len(self.data.batches or [])
        self.model.train()
        stop_requested = _StopFlag(accelerator)
        stopped = False
        try:
            while self.step < config.steps:
                # Each process draws its own batches, from a stream fixed by (seed, process, step): a
                # resumed run draws exactly the batches the uninterrupted one did, without storing it.
                self.crops.reseed(config.seed, self.accelerator.process_index, self.step)
                images, labels = self.crops.batch(config.batch_size)
                x0 = torch.from_numpy(images).to(device)
                labels = torch.from_numpy(labels).to(device)
                drop = torch.rand(labels.shape, device=device) < config.class_dropout
                hide = torch.rand(labels.shape, device=device) < config.batch_dropout if batch_count else None
                labels = dropped_labels(labels, null, batch_count, drop, hide)
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
                self.last_event = TrainProgress(self.step, config.steps, value, lr, saved)
                yield self.last_event
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
    """Called after each step: whether Ctrl-C came during it.

    Ctrl-C only raises a flag, checked after each step, so the run stops and saves at a step's
    end: a KeyboardInterrupt in the middle of a step would save weights updated by a step that
    the saved step count, EMA and schedule do not include, and `--resume` would then diverge
    from an uninterrupted run. With several processes (Ctrl-C reaches all of them) the flag is
    accelerate's trigger, so they all stop after the same step and save together. A second
    Ctrl-C stops at once. Off the main thread (the napari worker) Python cannot catch signals;
    the widget stops by closing the step generator, also between steps."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.several = accelerator.num_processes > 1
        self.requested = False
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._interrupted)

    def _interrupted(self, signum, frame) -> None:
        if self.requested and not self.several:
            raise KeyboardInterrupt
        self.requested = True
        if self.several:
            self.accelerator.set_trigger()

    def __call__(self) -> bool:
        if self.several:
            return self.accelerator.check_trigger()
        return self.requested

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
