"""What a checkpoint says about itself: `phenotwin.json`, read and checked without any weights.

Every field is checked for its type and range before anything uses it: JSON gives strings,
nulls, NaN and Infinity where numbers and lists belong, and each would otherwise surface
later as a traceback or, worse, as silently wrong output (NaN in the normalisation gives
all-zero images, `"classes": "ab"` two classes a and b). Torch-free; `phenotwin.checkpoint`
re-exports these names.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phenotwin.errors import CheckpointError
from phenotwin.pipeline.settings import MODEL_DEFAULTS

FORMAT_VERSION = 1
INFO_FILE = "phenotwin.json"
KINDS = ("pixel", "latent", "stable-diffusion")
ADAPTERS = (None, "lora", "svdiff")


@dataclass
class CheckpointInfo:
    """Everything about a model that is not weights: the content of `phenotwin.json`."""

    kind: str
    classes: list[str]
    image_size: int
    channels: int
    normalization: dict[str, Any] = field(default_factory=lambda: {"mode": "percentile", "low": 0.1, "high": 99.9})
    channel_names: list[str] | None = None
    defaults: dict[str, Any] = field(default_factory=lambda: dict(MODEL_DEFAULTS))
    provenance: dict[str, Any] = field(default_factory=dict)
    # Per-channel intensities of the training images (`input_fit.training_statistics`): what
    # an input is checked against. None for models trained before it was recorded.
    intensity_statistics: dict[str, Any] | None = None
    # Reconstruction quality on held-out images (`phenotwin calibrate`): what a result's trust verdict compares with.
    calibration: dict[str, Any] | None = None
    # Batches (plates, days) the model was trained with, when its data had batches.csv: a batch is
    # a second label beside the condition, so a translation can change the condition and keep the
    # batch (`batch_row`). None: a model without batches.
    batches: list[str] | None = None
    base: str | None = None
    adapter: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        problems = _info_problems(self)
        if problems:
            raise CheckpointError("invalid phenotwin.json: " + "; ".join(problems) + ".")
        self.classes = [str(c) for c in self.classes]
        self.batches = None if self.batches is None else [str(b) for b in self.batches]
        self.defaults = {**MODEL_DEFAULTS, **self.defaults}

    @property
    def null_class(self) -> int:
        """Index of the 'no condition' label used for classifier-free guidance."""
        return len(self.classes)

    @property
    def label_count(self) -> int:
        """Class labels the UNet embeds: per batch row, every condition and the null one; one row per
        batch and one for "batch unknown" (the only row of a model without batches)."""
        return (len(self.classes) + 1) * (len(self.batches or []) + 1)

    def batch_row(self, batch: str | None) -> int:
        """The row of `batch` in the label table: the label of condition c in it is row * (classes + 1) + c.
        None is the "batch unknown" row, which training learns by dropping the batch (row 0 without batches)."""
        known = self.batches or []
        if batch is None:
            return len(known)
        if not known:
            raise CheckpointError(f"this model was trained without batches, so it cannot keep batch {batch!r}: leave "
                                  "the batch unset, or train with a batches.csv in the data folder.")
        if batch not in known:
            raise CheckpointError(f"unknown batch {batch!r}: this model knows {', '.join(map(repr, known))}. Pick one "
                                  "of those, or leave the batch unset for an image from another batch.")
        return known.index(batch)

    def class_index(self, name: str | int) -> int:
        if isinstance(name, int) and not isinstance(name, bool):
            if 0 <= name < len(self.classes):
                return name
        elif name in self.classes:
            return self.classes.index(name)
        raise CheckpointError(
            f"unknown condition {name!r}: this model knows {', '.join(map(repr, self.classes))}. "
            "Pick one of those (names are case-sensitive)."
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointInfo:
        missing = [k for k in ("kind", "classes", "image_size", "channels") if k not in data]
        if missing:
            raise CheckpointError(f"invalid phenotwin.json: missing {', '.join(missing)}.")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    """A JSON number that can scale intensities: not a bool, string, NaN or infinity."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _info_problems(info: CheckpointInfo) -> list[str]:
    """Everything wrong with a phenotwin.json, each with what it must be: types first, since
    JSON gives strings, nulls and NaN where numbers and lists belong."""
    problems = []
    if info.kind not in KINDS:
        problems.append(f"kind {info.kind!r} is not one of {', '.join(KINDS)}")
    classes = info.classes
    if not isinstance(classes, (list, tuple)) or not all(
            (isinstance(c, str) and c.strip()) or _whole(c) for c in classes):
        problems.append(f"classes must be a list of condition names such as [\"control\", \"treated\"], got {classes!r}")
    elif len(classes) < 2:
        problems.append(
            f"a translation model needs at least two classes (conditions), this one has {list(classes)}: "
            "list every condition the model was trained on in 'classes'"
        )
    elif len({str(c) for c in classes}) != len(classes):
        problems.append(f"class names must be unique, got {list(classes)}")
    if not _whole(info.image_size) or info.image_size < 8:
        problems.append(f"image_size must be an integer >= 8, got {info.image_size!r}")
    if not _whole(info.channels) or info.channels < 1:
        problems.append(f"channels must be a positive integer, got {info.channels!r}")
    if info.adapter not in ADAPTERS:
        problems.append(f"adapter {info.adapter!r} is not one of {ADAPTERS}")
    if info.base is not None and not (isinstance(info.base, str) and info.base):
        problems.append(f"base must be the path of the base model, got {info.base!r}")
    if info.adapter is not None and not info.base:
        problems.append(f"a {info.adapter} checkpoint must name the base model it adapts ('base')")
    if not _whole(info.format_version) or info.format_version < 1:
        problems.append(f"format_version must be a whole number such as {FORMAT_VERSION}, got {info.format_version!r}")
    elif info.format_version > FORMAT_VERSION:
        problems.append(
            f"format version {info.format_version} is newer than this phenotwin understands "
            f"({FORMAT_VERSION}); upgrade napari-phenotwin"
        )
    for name in ("defaults", "provenance"):
        if not isinstance(getattr(info, name), dict):
            problems.append(f"{name} must be a JSON object ({{}} for none), got {getattr(info, name)!r}")
    problems += _normalization_problems(info.normalization, info.channels)
    batches = info.batches
    if batches is not None and (not isinstance(batches, list) or not all(isinstance(b, str) and b.strip()
                                                                         for b in batches)):
        problems.append(f"batches must be a list of batch names such as [\"plate1\", \"plate2\"], got {batches!r}")
    elif batches is not None and (len(batches) < 2 or len(set(batches)) != len(batches)):
        problems.append(f"batches must name at least two different batches (or be null), got {batches!r}")
    names = info.channel_names
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        problems.append(f"channel_names must be a list of names, got {names!r}")
    elif names is not None and _whole(info.channels) and len(names) != info.channels:
        problems.append(f"{len(names)} channel names for {info.channels} channels")
    return problems


def _normalization_problems(normalization: Any, channels: Any) -> list[str]:
    """NaN or infinity would map every pixel to one value (all-zero output), so refuse them here."""
    if not isinstance(normalization, dict):
        return [f"normalization must be a JSON object such as {{\"mode\": \"percentile\", \"low\": 0.1, "
                f"\"high\": 99.9}}, got {normalization!r}"]
    mode = normalization.get("mode")
    low, high = normalization.get("low", 0.1), normalization.get("high", 99.9)
    if mode == "fixed":
        if not (isinstance(low, list) and isinstance(high, list) and len(low) == len(high) == channels):
            return [f"normalization 'fixed' needs per-channel 'low' and 'high' lists ({channels!r} numbers each)"]
        if not all(_finite(v) for v in low + high):
            return [f"normalization 'fixed' needs finite numbers (no NaN, Infinity or strings), got low {low!r}, "
                    f"high {high!r}"]
        if any(lo > hi for lo, hi in zip(low, high)):
            return [f"normalization 'fixed' needs low <= high for every channel, got low {low!r}, high {high!r}"]
    elif mode == "percentile":
        if not (_finite(low) and _finite(high) and 0 <= low < high <= 100):
            return [f"normalization 'percentile' needs numbers 0 <= low < high <= 100, got low {low!r}, high {high!r}"]
    else:
        return [f"normalization mode {mode!r} is not 'fixed' or 'percentile'"]
    return []


def read_info(path: str | os.PathLike) -> CheckpointInfo:
    """Read and validate `phenotwin.json` without touching any weights."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist. Check the path.")
    if folder.is_file():
        if folder.name == INFO_FILE:
            folder = folder.parent
        else:
            raise CheckpointError(
                f"{folder} is a file; a phenotwin checkpoint is a folder containing {INFO_FILE}. "
                "Select the folder instead."
            )
    info_file = folder / INFO_FILE
    if not info_file.is_file():
        raise CheckpointError(
            f"{folder} has no {INFO_FILE}, so it is not a phenotwin checkpoint. "
            "Select the folder written by `phenotwin train` (it contains phenotwin.json)."
        )
    try:
        data = json.loads(info_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{info_file} is corrupt ({err}). Restore it from the original checkpoint.") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{info_file} is corrupt: expected a JSON object. Restore it from the original checkpoint.")
    return CheckpointInfo.from_dict(data)
