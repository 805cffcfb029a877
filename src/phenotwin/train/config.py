"""What defines a training run: `TrainConfig`, its checks and defaults, and `TrainProgress`.

Each field that is a `phenotwin train` flag carries its help text (and choices) in its
metadata, so `phenotwin.train.commands` builds the flags from the dataclass itself: a new
setting, a changed default or a renamed field cannot leave the command behind. Importing
this module is cheap (no torch), as building the command's parser must be.
"""

from __future__ import annotations

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
    sample_steps: int = 25
    overwrite: bool = flag(False, "replace a model already in --out")
    resume: bool = flag(False, "continue the run saved in --out")
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
        if self.prediction_type not in PREDICTION_TYPES:
            raise PhenotwinError(f"prediction_type must be epsilon, v_prediction or sample, got {self.prediction_type!r}.")


@dataclass(frozen=True)
class TrainProgress:
    """One optimizer step's report, for a progress bar or a loss plot."""

    step: int
    total: int
    loss: float
    learning_rate: float
    saved: bool = False
