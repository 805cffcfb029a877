"""What a training run keeps in training/ between sessions: its state, log and own entries.

A run must survive a kill: the state (optimizer, EMA, random streams, step) is swapped in
atomically, what a killed save left half-written is tidied at the next start, and a resumed
run is refused when its settings or data differ from the saved run's (the saved state would
silently keep the old values). Only phenotwin's own names are ever removed. Torch-free.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from phenotwin.checkpoint import INFO_FILE, TRAINING_DIR, foreign_entries, recover_interrupted_save
from phenotwin.errors import PhenotwinError
from phenotwin.io import write_atomically
from phenotwin.train.config import TrainConfig

STATE_DIR = "state"
CANDIDATES_DIR = "candidates"
# What the trainer (and its calibration) writes inside training/: the only entries a new run there replaces.
CALIBRATION_FILES = ("candidates.csv", "calibration.csv", "calibration-cost.csv", "calibration.png")
TRAINING_ENTRIES = ("log.csv", "samples", STATE_DIR, CANDIDATES_DIR, *CALIBRATION_FILES)
LOG_HEADER = "step,loss,learning_rate,seconds\n"
# Settings a resumed run must share with the saved one: they shape the model, or the saved state
# (optimizer, moving average, random streams) would silently keep the old value. The validation
# split follows from the seed and the fraction: a change would train on images held out before.
RESUME_FIXED = ("method", "base", "size", "width", "vae", "prediction_type", "zero_snr", "lora_rank",
                "context_tokens", "channel_axis", "learning_rate", "ema_decay", "seed", "validation_fraction")


def state_dir(out: Path) -> Path:
    return Path(out) / TRAINING_DIR / STATE_DIR


def foreign(out: Path) -> list[str]:
    """What in the output folder phenotwin did not write (folders end in /): an overwrite must leave it."""
    training = out / TRAINING_DIR
    names = [name for name in foreign_entries(out) if name != TRAINING_DIR]
    if training.is_dir():
        names += [f"{TRAINING_DIR}/{p.name}" for p in training.iterdir()
                  if p.name not in TRAINING_ENTRIES and not leftover(p)]
    elif training.exists():
        names.append(TRAINING_DIR)
    return sorted(name + "/" if (out / name).is_dir() else name for name in names)


def tidy_killed_run(out: Path) -> list[str]:
    """Put back or remove what a killed run left half-written: the model's staging folder, the
    state's, temporary files. Only phenotwin's own names are touched."""
    tidied = recover_interrupted_save(out)
    training = out / TRAINING_DIR
    state = training / STATE_DIR
    retired = training / f".{STATE_DIR}-old"
    if retired.is_dir() and not state.exists():
        os.replace(retired, state)  # killed between the two renames of save_state
        tidied.append(f"{TRAINING_DIR}/{retired.name}")
    for folder in (training, training / "samples", training / CANDIDATES_DIR):
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            if leftover(entry):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                tidied.append(entry.relative_to(out).as_posix())
    return tidied


def saved_progress(out: Path) -> dict[str, Any]:
    """The saved state's step, data fingerprint, validation split and settings."""
    path = state_dir(out) / "progress.json"
    try:
        progress = json.loads(path.read_text())
        int(progress["step"])
        return progress
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PhenotwinError(
            f"the saved training state in {state_dir(out)} cannot be read ({path.name}: {err}); it cannot be "
            "resumed. Start a new run, in another output folder or replacing this one."
        ) from None


def check_same_run(out: Path, config: TrainConfig, progress: dict[str, Any]) -> None:
    """Refuse to resume with settings that differ from the saved run's in `RESUME_FIXED`."""
    saved = progress.get("config")
    if saved is None:  # a state saved before progress.json kept the settings: the model's copy
        try:
            saved = json.loads((out / INFO_FILE).read_text())["provenance"]["config"]
        except (OSError, ValueError, KeyError, TypeError):
            return
    given = asdict(config)
    changed = [(name, _resumed_value(saved, name), _resumed_value(given, name)) for name in RESUME_FIXED
               if name in saved and _resumed_value(saved, name) != _resumed_value(given, name)]
    if changed:
        listed = "; ".join(f"{name}: saved {old!r}, now {new!r}" for name, old, new in changed)
        flags = " ".join(f"--{name.replace('_', '-')} {old}" for name, old, _ in changed if old is not None)
        raise PhenotwinError(
            f"cannot resume the run in {out} with other settings ({listed}). Resume with the saved run's "
            f"settings{f' ({flags})' if flags else ''}, or start a new run in another output folder."
        )


def check_same_data(out: Path, data_folder: str, fingerprint: str, validation: dict[str, Any]) -> None:
    """A resumed run trains on the saved run's data and holds out the same images."""
    progress = saved_progress(out)
    if progress.get("data_fingerprint") != fingerprint:
        raise PhenotwinError(
            f"the data in {data_folder} differ from the data this run started with; resuming would mix "
            "them. Resume with the original data, or start a new run in another output folder."
        )
    saved = progress.get("validation")
    if saved is not None and saved.get("fingerprint") != validation.get("fingerprint"):
        raise PhenotwinError(
            f"the validation split of {data_folder} differs from the one this run started with; resuming would "
            "train on images held out before. Resume with the original data and settings, or start a new run."
        )


def save_state(accelerator, out: Path, step: int, extra: dict[str, Any]) -> None:
    """Optimizer, EMA, RNGs and step, swapped in atomically like the model; `extra` goes to progress.json.

    Every process calls this: accelerate's save_state writes each process's random states."""
    state = state_dir(out)
    staging = state.with_name(f".{STATE_DIR}-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()  # nobody writes into a folder being removed
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every process's files are in before the swap
    if accelerator.is_main_process:
        (staging / "progress.json").write_text(
            json.dumps({"step": step, "processes": accelerator.num_processes, **extra})
        )
        retired = state.with_name(f".{STATE_DIR}-old")
        if state.exists():
            os.replace(state, retired)
        os.replace(staging, state)
        shutil.rmtree(retired, ignore_errors=True)


def start_log(log_path: Path, step: int) -> None:
    """A new run replaces the trainer's own entries in training/ (its log, state, sample grids,
    candidates and calibration tables); a resumed one keeps the log's rows up to the saved step:
    the rows a killed run logged after its last save are trained again, and would otherwise
    appear twice."""
    training = log_path.parent
    if step == 0:
        log_path.unlink(missing_ok=True)
        for name in (STATE_DIR, CANDIDATES_DIR):
            shutil.rmtree(training / name, ignore_errors=True)
        for name in CALIBRATION_FILES:
            (training / name).unlink(missing_ok=True)
        samples = training / "samples"
        for grid in samples.glob("step_*.png"):
            grid.unlink()
        if samples.is_dir() and not any(samples.iterdir()):
            samples.rmdir()
    rows = log_path.read_text().splitlines()[1:] if log_path.is_file() else []
    kept = [row for row in rows if _logged_step(row) <= step]
    if not log_path.is_file() or kept != rows:
        text = LOG_HEADER + "".join(row + "\n" for row in kept)
        write_atomically(log_path, lambda temp: Path(temp).write_text(text))


def seconds_per_step(log_path: Path) -> float | None:
    """Mean wall time of a training step (saves included) over every session in the log, or None.

    Each session's `seconds` count from its own start: only increases within a session count."""
    try:
        rows = [row.split(",") for row in log_path.read_text().splitlines()[1:]]
        points = [(int(r[0]), float(r[3])) for r in rows if len(r) >= 4]
    except (OSError, ValueError):
        return None
    gaps = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(points, points[1:]) if s1 > s0 and t1 >= t0]
    return sum(gaps) / len(gaps) if gaps else None


def leftover(entry: Path) -> bool:
    """A file or folder a killed save leaves: write_atomically's `.NAME.XXXX.tmp`, the state's `.state-N`."""
    return entry.name.startswith(".") and (entry.name.endswith(".tmp") or entry.name.startswith(f".{STATE_DIR}-"))


def _logged_step(row: str) -> int:
    try:
        return int(row.split(",")[0])
    except ValueError:
        return 0


def saved_config(config: TrainConfig) -> dict[str, Any]:
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
