"""What defines a training run: `TrainConfig`, its checks and defaults, and `TrainProgress`.

Each field that is a `phenotwin train` flag carries its help text (and choices) in its
metadata, so `phenotwin.train.commands` builds the flags from the dataclass itself: a new
setting, a changed default or a renamed field cannot leave the command behind. Importing
this module is cheap (no torch), as building the command's parser must be.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from phenotwin.errors import PhenotwinError

METHODS = ("scratch", "full", "lora", "svdiff")
DEFAULT_LEARNING_RATES = {"scratch": 1e-3, "full": 1e-4, "lora": 1e-3, "svdiff": 5e-3}
PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")


def _path(text: str) -> str:
    """A path flag as pathlib writes it (`data/` -> `data`), the form stored in provenance."""
    return str(Path(text))


def flag(default: Any = MISSING, help: str | None = None, **argparse_options: Any) -> Any:
    """A field that is also a `phenotwin train` flag: its help text and any argparse option
    the field's type and default do not already say; `option` names the flag when
    `--field-name` would not fit (a default-on switch is turned off by it)."""
    return field(default=default, metadata={"cli": {"help": help, **argparse_options}})


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored in the checkpoint's provenance."""

    data: str = flag(help="folder with one subfolder of images per condition", type=_path)
    out: str = flag(help="checkpoint folder to write (and resume from)", type=_path)
    method: str = flag("scratch", choices=list(METHODS))
    base: str | None = flag(None, "model to fine-tune: a phenotwin checkpoint or a Stable-Diffusion diffusers folder")
    size: int = flag(64, "crop size = model image size (default: %(default)s)")
    steps: int = flag(3000, "optimizer steps in total (default: %(default)s)")
    batch_size: int = flag(16)
    learning_rate: float | None = flag(None, "default depends on the method")
    warmup_steps: int = flag(100)
    ema_decay: float = flag(0.999)
    class_dropout: float = flag(0.1, "fraction of unconditional steps, for guidance")
    batches: bool = flag(
        True, "ignore the data folder's batches.csv: train without batch labels (by default a translation then "
        "keeps each image's batch, plate or day)", option="--no-batches",
    )
    batch_dropout: float = flag(0.2, "with batches: fraction of steps with the batch hidden, so a translation can "
                                "leave the batch unknown (default: %(default)s)")
    checkpoint_every: int = flag(500, "save model, state and samples every N steps")
    seed: int = flag(0)
    width: int = flag(32, "scratch: channels of the UNet's first level")
    vae: str | None = flag(
        None, "scratch: train a latent model on this frozen autoencoder (diffusers AutoencoderKL folder, "
        "or a model folder with vae/); default: a pixel model",
    )
    prediction_type: str = flag(
        "v_prediction", "scratch only; fine-tuning keeps the base model's (default: %(default)s)",
        choices=list(PREDICTION_TYPES),
    )
    zero_snr: bool = flag(True, "scratch: keep the plain linear noise schedule", option="--no-zero-snr")
    lora_rank: int = flag(8)
    context_tokens: int = 4
    mixed_precision: str = flag("auto", choices=list(MIXED_PRECISIONS))
    channel_axis: int | None = flag(None, "channel axis of 3-D images (default: guessed as the short axis)",
                                    choices=[0, -1])
    channel_names: list[str] | None = flag(None, "a name per channel, in order (e.g. nucleus golgi); shown in napari",
                                           metavar="NAME")
    max_per_class: int | None = flag(None, "use at most N images per condition")
    allow_mixed_bit_depth: bool = flag(
        False, "train although the conditions' images differ in type or bit depth (e.g. 8-bit against 16-bit); "
        "by default refused, as the model would learn the bit depth as the phenotype",
    )
    validation_fraction: float = flag(
        0.1, "fraction of each condition's images held out (never trained on) for the calibration and the choice "
        "of the saved model; at least one per condition of 5 or more images; 0 turns it off (default: %(default)s)",
    )
    calibrate: bool = flag(
        True, "skip the calibration on the held-out images at the end (defaults, trust verdict, which save to keep)",
        option="--no-calibrate",
    )
    calibration_images: int | None = flag(
        None, "held-out images per condition the calibration uses, whatever it costs (default: as many as fit in "
        "about 15%% of the training time)", metavar="N",
    )
    reconstruction_target: float | None = flag(
        None, "the calibration's reconstruction target in dB (e.g. 38): defaults with more steps or a fixed-point "
        "refinement when the model's own reconstruct worse, dearer translations (default: none)", metavar="DB",
    )
    sample_steps: int = 25
    overwrite: bool = flag(False, "replace a model already in --out")
    resume: bool = flag(False, "continue the run saved in --out")
    command: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse a setting that cannot work before any file is read: every range, with the flag to fix."""
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
        for name, low in INTEGER_MINIMA.items():
            _check_integer(name, getattr(self, name), low)
        if self.max_per_class is not None:
            _check_integer("max_per_class", self.max_per_class, 1)
        if self.calibration_images is not None:
            _check_integer("calibration_images", self.calibration_images, 2)
        if self.reconstruction_target is not None:
            _check_fraction("reconstruction_target", self.reconstruction_target, "(0, 100) dB, e.g. 38",
                            lambda v: 0 < v < 100)
        _check_fraction("validation_fraction", self.validation_fraction, "[0, 0.5], e.g. 0.1 (0 turns it off)",
                        lambda v: 0 <= v <= 0.5)
        if self.seed >= 2**32:
            raise PhenotwinError(f"seed (--seed) must be below 2**32, got {self.seed}.")
        for name, unit in (("size", "the UNet halves it three times"), ("width", "its group norms take 8 groups")):
            if getattr(self, name) % 8:
                raise PhenotwinError(f"{name} (--{name}) must be a multiple of 8 ({unit}), got {getattr(self, name)}.")
        if self.learning_rate is not None:
            _check_fraction("learning_rate", self.learning_rate, "(0, 1], e.g. 1e-4", lambda v: 0 < v <= 1)
        _check_fraction("ema_decay", self.ema_decay, "[0, 1), e.g. 0.999 (0 turns the average off)",
                        lambda v: 0 <= v < 1)
        _check_fraction("class_dropout", self.class_dropout, "[0, 1), e.g. 0.1", lambda v: 0 <= v < 1)
        _check_fraction("batch_dropout", self.batch_dropout, "(0, 1), e.g. 0.2", lambda v: 0 < v < 1)
        if self.channel_names is not None and not all(self.channel_names):
            raise PhenotwinError("channel names must not be empty, e.g. --channel-names nucleus golgi.")
        if self.prediction_type not in PREDICTION_TYPES:
            raise PhenotwinError(f"prediction_type must be epsilon, v_prediction or sample, got {self.prediction_type!r}.")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise PhenotwinError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}."
            )
        if self.channel_axis not in (None, 0, -1):
            raise PhenotwinError(f"channel_axis must be 0 (first) or -1 (last), got {self.channel_axis!r}.")
        if self.resume and self.overwrite:
            raise PhenotwinError("--resume continues the run in --out and --overwrite replaces it: give only one.")

    def effective_learning_rate(self) -> float:
        """The learning rate the run uses: the one given, or the method's default."""
        return self.learning_rate or DEFAULT_LEARNING_RATES[self.method]


# The smallest value of each whole-number setting.
INTEGER_MINIMA = {"steps": 1, "batch_size": 1, "checkpoint_every": 1, "size": 8, "width": 8, "lora_rank": 1,
                  "sample_steps": 1, "context_tokens": 1, "warmup_steps": 0, "seed": 0}


def _option(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def _check_integer(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PhenotwinError(f"{_option(name)} must be a whole number, got {value!r}.")
    if value < low:
        raise PhenotwinError(f"{_option(name)} must be at least {low}, got {value}.")


def _check_fraction(name: str, value: Any, allowed: str, inside) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not inside(value):
        raise PhenotwinError(f"{_option(name)} must be a number in {allowed}; got {value!r}.")


class OutputFolderInUse(PhenotwinError):
    """The output folder is not free to train into. It carries the facts (`folder`, `foreign`,
    `holds_model`, `resumable`, `overwriting`) so that each caller names its own way out:
    `describe(resume="--resume", overwrite="--overwrite")` for the command line, while the
    default message names none (the Train widget has neither flag)."""

    def __init__(self, folder: Path, foreign: list[str], holds_model: bool, resumable: bool, overwriting: bool):
        self.folder, self.foreign, self.holds_model = Path(folder), list(foreign), holds_model
        self.resumable, self.overwriting = resumable, overwriting
        super().__init__(self.describe())

    def describe(self, resume: str | None = None, overwrite: str | None = None) -> str:
        listed = _listing(self.foreign)
        if self.overwriting:
            return (f"{self.folder} holds files phenotwin did not write: {listed}. Replacing a model replaces only "
                    f"phenotwin's own files, so nothing was changed: move those out of {self.folder}, or choose "
                    "another output folder.")
        what = "a model" if self.holds_model else "a training run" if self.resumable else "files"
        text = f"{self.folder} already holds {what}" + (f" ({listed})" if self.foreign else "") + "."
        ways = ["choose another output folder"]
        if self.resumable and resume:
            ways.append(f"pass {resume} to continue that run")
        if overwrite and (self.holds_model or self.resumable or not self.foreign):
            ways.append(f"{overwrite} to replace it" + (" once the files phenotwin did not write are moved out"
                                                        if self.foreign else ""))
        return f"{text} Nothing was changed: {', or '.join(ways)}."


def _listing(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


@dataclass(frozen=True)
class TrainProgress:
    """One optimizer step's report, for a progress bar or a loss plot."""

    step: int
    total: int
    loss: float
    learning_rate: float
    saved: bool = False
    # "training", or after the last step "calibrating: <what>" (step/total count that stage's model calls;
    # loss and learning_rate are the last step's); a progress bar shows the stage, a loss plot skips it.
    stage: str = "training"
