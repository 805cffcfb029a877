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
import threading
import time
from collections.abc import Generator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from phenotwin.checkpoint import (
    INFO_FILE,
    TRAINING_DIR,
    Checkpoint,
    CheckpointInfo,
    foreign_entries,
    recover_interrupted_save,
    save_checkpoint,
)
from phenotwin.errors import PhenotwinError
from phenotwin.io import write_atomically
from phenotwin.train.config import OutputFolderInUse, TrainConfig, TrainProgress
from phenotwin.train.data import AugmentedCrops, load_condition_folders
from phenotwin.train.models import apply_method, conditional_module, encode, starting_model

__all__ = ["STATE_DIR", "TrainConfig", "TrainProgress", "Trainer", "train"]

STATE_DIR = "state"
# What the trainer writes inside training/: the only entries a new run there replaces.
TRAINING_ENTRIES = ("log.csv", "samples", STATE_DIR)
LOG_HEADER = "step,loss,learning_rate,seconds\n"
# Settings a resumed run must share with the saved one: they shape the model, or the saved state
# (optimizer, moving average, random streams) would silently keep the old value.
RESUME_FIXED = ("method", "base", "size", "width", "vae", "prediction_type", "zero_snr", "lora_rank",
                "context_tokens", "channel_axis", "learning_rate", "ema_decay", "seed")


class Trainer:
    """Prepare once, then iterate `steps()`; `save()` may be called at any time (e.g. on Stop)."""

    def __init__(self, config: TrainConfig):
        config.check()
        self.config = config
        self.out = Path(config.out)
        self._check_folders_apart()
        self.tidied = self._tidy_killed_run() if os.environ.get("RANK", "0") == "0" else []
        self._check_output()
        self.data = load_condition_folders(config.data, config.size, config.channel_axis, config.max_per_class,
                                           config.allow_mixed_bit_depth)
        self.channel_names = self._channel_names()
        if config.resume:
            self._check_same_data()
        self._build()

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
        state = out / TRAINING_DIR / STATE_DIR
        if out.exists() and not out.is_dir():
            raise PhenotwinError(f"{out} is a file; a model is a folder. Choose another output folder.")
        if config.resume:
            if not state.is_dir():
                raise PhenotwinError(
                    f"nothing to resume in {out}: no saved training state ({state}). Start without --resume."
                )
            self._check_same_run(self._saved_progress())
            return
        if out.exists() and any(out.iterdir()):
            foreign = self._foreign()
            if not config.overwrite or foreign:
                raise OutputFolderInUse(out, foreign, holds_model=(out / INFO_FILE).is_file(),
                                        resumable=state.is_dir(), overwriting=config.overwrite)

    def _foreign(self) -> list[str]:
        """What in the output folder phenotwin did not write (folders end in /): an overwrite must leave it."""
        training = self.out / TRAINING_DIR
        names = [name for name in foreign_entries(self.out) if name != TRAINING_DIR]
        if training.is_dir():
            names += [f"{TRAINING_DIR}/{p.name}" for p in training.iterdir()
                      if p.name not in TRAINING_ENTRIES and not _leftover(p)]
        elif training.exists():
            names.append(TRAINING_DIR)
        return sorted(name + "/" if (self.out / name).is_dir() else name for name in names)

    def _tidy_killed_run(self) -> list[str]:
        """Put back or remove what a killed run left half-written: the model's staging folder, the
        state's, temporary files. Only phenotwin's own names are touched."""
        tidied = recover_interrupted_save(self.out)
        training = self.out / TRAINING_DIR
        state = training / STATE_DIR
        retired = training / f".{STATE_DIR}-old"
        if retired.is_dir() and not state.exists():
            os.replace(retired, state)  # killed between the two renames of _save_state
            tidied.append(f"{TRAINING_DIR}/{retired.name}")
        for folder in (training, training / "samples"):
            for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
                if _leftover(entry):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                    tidied.append(entry.relative_to(self.out).as_posix())
        return tidied

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
            self._load_state()

    # -- state ---------------------------------------------------------------------------

    def _state_dir(self) -> Path:
        return self.out / TRAINING_DIR / STATE_DIR

    def _saved_progress(self) -> dict[str, Any]:
        """The saved state's step, data fingerprint and settings."""
        path = self._state_dir() / "progress.json"
        try:
            progress = json.loads(path.read_text())
            int(progress["step"])
            return progress
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PhenotwinError(
                f"the saved training state in {self._state_dir()} cannot be read ({path.name}: {err}); it cannot be "
                "resumed. Start a new run, in another output folder or replacing this one."
            ) from None

    def _check_same_data(self) -> None:
        if self._saved_progress().get("data_fingerprint") != self.data.fingerprint:
            raise PhenotwinError(
                f"the data in {self.config.data} differ from the data this run started with; resuming would mix "
                "them. Resume with the original data, or start a new run in another output folder."
            )

    def _load_state(self) -> None:
        self.accelerator.load_state(str(self._state_dir()))
        self.step = int(self._saved_progress()["step"])

    def _check_same_run(self, progress: dict[str, Any]) -> None:
        """Refuse to resume with settings that differ from the saved run's in `RESUME_FIXED`."""
        saved = progress.get("config")
        if saved is None:  # a state saved before progress.json kept the settings: the model's copy
            try:
                saved = json.loads((self.out / INFO_FILE).read_text())["provenance"]["config"]
            except (OSError, ValueError, KeyError, TypeError):
                return
        given = asdict(self.config)
        changed = [(name, _resumed_value(saved, name), _resumed_value(given, name)) for name in RESUME_FIXED
                   if name in saved and _resumed_value(saved, name) != _resumed_value(given, name)]
        if changed:
            listed = "; ".join(f"{name}: saved {old!r}, now {new!r}" for name, old, new in changed)
            flags = " ".join(f"--{name.replace('_', '-')} {old}" for name, old, _ in changed if old is not None)
            raise PhenotwinError(
                f"cannot resume the run in {self.out} with other settings ({listed}). Resume with the saved run's "
                f"settings{f' ({flags})' if flags else ''}, or start a new run in another output folder."
            )

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
                            "processes": accelerator.num_processes, "config": _saved_config(self.config)})
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
                "config": _saved_config(self.config),
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

    def _start_log(self, log_path: Path) -> None:
        """A new run replaces the trainer's own entries in training/ (its log, state and sample grids);
        a resumed one keeps the log's rows up to the saved step: the rows a killed run logged after
        its last save are trained again, and would otherwise appear twice."""
        training = log_path.parent
        if self.step == 0:
            log_path.unlink(missing_ok=True)
            shutil.rmtree(training / STATE_DIR, ignore_errors=True)
            samples = training / "samples"
            for grid in samples.glob("step_*.png"):
                grid.unlink()
            if samples.is_dir() and not any(samples.iterdir()):
                samples.rmdir()
        rows = log_path.read_text().splitlines()[1:] if log_path.is_file() else []
        kept = [row for row in rows if _logged_step(row) <= self.step]
        if not log_path.is_file() or kept != rows:
            text = LOG_HEADER + "".join(row + "\n" for row in kept)
            write_atomically(log_path, lambda temp: Path(temp).write_text(text))

    # -- the loop ------------------------------------------------------------------------

    def steps(self) -> Generator[TrainProgress, None, Path]:
        """Train until `config.steps`, yielding after every optimizer step."""
        import torch

        config, accelerator = self.config, self.accelerator
        device = accelerator.device
        log_path = self.out / TRAINING_DIR / "log.csv"
        if accelerator.is_main_process:
            self._start_log(log_path)
        start = time.monotonic()
        null = len(self.data.classes)
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


def _leftover(entry: Path) -> bool:
    """A file or folder a killed save leaves: write_atomically's `.NAME.XXXX.tmp`, the state's `.state-N`."""
    return entry.name.startswith(".") and (entry.name.endswith(".tmp") or entry.name.startswith(f".{STATE_DIR}-"))


def _logged_step(row: str) -> int:
    try:
        return int(row.split(",")[0])
    except ValueError:
        return 0


def _saved_config(config: TrainConfig) -> dict[str, Any]:
    """The settings stored with the model and the state (the switches of one invocation left out)."""
    return {k: v for k, v in asdict(config).items() if k not in ("overwrite", "resume")}


def _resumed_value(settings: dict[str, Any], name: str) -> Any:
    """A setting as a resumed run compares it: the learning rate in effect, paths as pathlib writes them."""
    value = settings.get(name)
    if name == "learning_rate":
        return TrainConfig(data="", out="", method=settings.get("method", "scratch"),
                           learning_rate=value).effective_learning_rate()
    if name in ("base", "vae") and value:
        return str(Path(value).expanduser().resolve())
    return value


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
