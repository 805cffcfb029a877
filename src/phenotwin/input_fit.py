"""Does this image fit the model? Intensities compared with the model's own training images.

A model normalises raw intensities with the fixed range it was trained with and clips the
rest. An image outside that range goes through silently and comes back as confident
garbage: a float image in [0, 1] looks black to a model trained on 16-bit camera units, an
8-bit image saturates nothing and shows nothing, a background-subtracted image loses its
background to the clip. So training records, per channel, how its images' intensities were
spread (`training_statistics`), and every translation compares its input with that record
before any model call (`check_fit`), giving a `FitReport`: ok, warning or does-not-fit, each
finding with the numbers and the fix in words. A model without the record gets "unknown"
plus the checks that need no record. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STATISTICS_VERSION = 1
QUANTILES = (1, 50, 99)  # of the per-image values over the training images
LEVELS = ("ok", "unknown", "warning", "does-not-fit")  # from best to worst
# A finding becomes a warning past these, "does not fit" past the second.
CLIPPED = (0.05, 0.5)  # fraction of a channel's pixels clipped at one end, beyond what training saw
# The image's median and 99th percentile (normalised) against the training images' 1st and 99th
# quantiles of them: darker than these fractions of the darkest, or brighter than these multiples of the brightest.
DARKER = (0.5, 0.2)
BRIGHTER = (1.5, 3.0)


@dataclass(frozen=True)
class FitReport:
    """How well an image fits the intensities the model was trained on."""

    level: str  # one of LEVELS
    findings: tuple[str, ...] = ()  # one sentence per problem: the numbers and the fix
    matched: bool = False  # intensities were mapped onto the training range (`match_intensities`)
    channels: tuple[dict[str, float], ...] = field(default=(), repr=False)  # the image's own numbers

    @property
    def message(self) -> str:
        head = {"ok": "The image fits the model's training intensities.",
                "unknown": "Input fit unknown:",
                "warning": "The image may not fit the model:",
                "does-not-fit": "The image does not fit the model; do not trust this translation:"}[self.level]
        return " ".join([head, *self.findings])

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "findings": list(self.findings), "matched": self.matched,
                "channels": [dict(c) for c in self.channels]}

    @staticmethod
    def worst(reports: Sequence[FitReport]) -> FitReport:
        return max(reports, key=lambda r: LEVELS.index(r.level))


def _image_numbers(chw: np.ndarray, low: np.ndarray, high: np.ndarray) -> list[dict[str, float]]:
    flat = chw.reshape(chw.shape[0], -1)
    p1, p50, p99 = np.percentile(flat, QUANTILES, axis=1)
    return [{"p1": float(p1[c]), "p50": float(p50[c]), "p99": float(p99[c]), "min": float(flat[c].min()),
             "max": float(flat[c].max()), "clipped_low": float(np.mean(flat[c] <= low[c])),
             "clipped_high": float(np.mean(flat[c] >= high[c]))} for c in range(chw.shape[0])]


def training_statistics(images: Sequence[np.ndarray], low: np.ndarray, high: np.ndarray) -> dict[str, Any]:
    """What `check_fit` compares with: per channel, quantiles over the training images of each
    image's 1st, 50th and 99th percentile and of its clipped fractions, and the value range seen."""
    per_image = [_image_numbers(np.asarray(im, np.float64), low, high) for im in images]
    channels = []
    for c in range(len(per_image[0])):
        values = {key: np.array([numbers[c][key] for numbers in per_image]) for key in per_image[0][c]}
        channels.append({
            **{key: np.percentile(values[key], QUANTILES).tolist() for key in ("p1", "p50", "p99", "clipped_low",
                                                                                 "clipped_high")},
            "min": float(values["min"].min()), "max": float(values["max"].max()),
        })
    integer = all(np.array_equal(im, np.round(im)) for im in images)
    top = max(c["max"] for c in channels)
    return {"version": STATISTICS_VERSION, "images": len(per_image), "quantiles": list(QUANTILES),
            "integer_values": bool(integer),
            "bit_depth": int(math.ceil(math.log2(top + 1))) if integer and top >= 0 else None,
            "channels": channels}


def _hint(numbers: dict[str, float], trained: dict[str, Any], dtype: np.dtype, bit_depth: int | None) -> str:
    """What the image probably is, when it is much darker than the training images."""
    if np.issubdtype(dtype, np.floating) and numbers["max"] <= 1.0 < trained["p99"][0]:
        return " This looks like a float image scaled to [0, 1]: pass the raw camera units"
    if dtype == np.uint8 and (bit_depth or 0) > 8:
        return f" This is an 8-bit image; the model was trained on {bit_depth}-bit data: pass the original image"
    if np.issubdtype(dtype, np.integer) and numbers["max"] <= 4095 < trained["p99"][0]:
        return " This looks like 12-bit data; the model was trained on a wider range: pass it as acquired"
    return " Is it from another microscope setting? Pass images acquired like the training images"


def _channel_findings(name: str, numbers: dict[str, float], trained: dict[str, Any] | None, low: float, high: float,
                      dtype: np.dtype, bit_depth: int | None) -> list[tuple[int, str]]:
    """(severity 2 = warning, 3 = does not fit, message) for one channel."""
    span = high - low
    findings = []
    if numbers["max"] <= low or numbers["min"] >= high:
        end = "low" if numbers["max"] <= low else "high"
        findings.append((3, f"{name}: after the model's normalisation the image is constant (every pixel is at or "
                            f"past the training range's {end} end, {low:g}–{high:g})."))
        return findings
    if trained is None:
        return findings
    matched_fix = ", or turn on intensity matching (match_intensities) for images from another setting."
    levels = []  # (severity, key, darker) of the median and the 99th percentile
    for key, label in (("p99", "99th percentile"), ("p50", "median")):
        own, darkest, brightest = ((v - low) / span for v in (numbers[key], trained[key][0], trained[key][2]))
        if darkest > 0 and own < DARKER[0] * darkest:
            levels.append((3 if own < DARKER[1] * darkest else 2, key, label, True))
        elif brightest > 0 and own > BRIGHTER[0] * brightest:
            levels.append((3 if own > BRIGHTER[1] * brightest else 2, key, label, False))
    if levels:  # one finding per channel: the worse of the two
        severity, key, label, darker = max(levels, key=lambda level: level[0])
        hint = _hint(numbers, trained, dtype, bit_depth) if darker else \
            " It is brighter than any training image: check the exposure and the gain"
        findings.append((severity, f"{name}: the image's {label} is {numbers[key]:g}; the training images' were "
                                   f"{trained[key][0]:g}–{trained[key][2]:g}." + hint + matched_fix))
    for end, label in (("clipped_low", "below the training range's low end"),
                       ("clipped_high", "at or above the training range's high end")):
        extra = numbers[end] - trained[end][2]
        if extra > CLIPPED[0]:
            why = " (negative values: is it background-subtracted?)" if end == "clipped_low" and numbers["min"] < 0 \
                <= trained["min"] else ""
            findings.append((3 if extra > CLIPPED[1] else 2,
                             f"{name}: {numbers[end]:.0%} of its pixels are {label} ({low:g} / {high:g}) and are "
                             f"clipped{why}; at most {trained[end][2]:.1%} were in the training images. Pass images "
                             f"acquired like the training images" + matched_fix))
    return findings


def check_fit(chw: np.ndarray, low: np.ndarray, high: np.ndarray, statistics: dict[str, Any] | None,
              normalization_mode: str, dtype: np.dtype, channel_names: Sequence[str] | None = None,
              matched: bool = False) -> FitReport:
    """Compare a raw (C, H, W) image, normalised with (`low`, `high`), with the training record."""
    names = list(channel_names or [f"channel {c + 1}" for c in range(chw.shape[0])])
    numbers = _image_numbers(chw, low, high)
    per_image = normalization_mode == "percentile"  # each image is rescaled by its own percentiles
    trained = None if statistics is None or per_image else statistics["channels"]
    bit_depth = None if statistics is None else statistics.get("bit_depth")
    findings = [f for c, name in enumerate(names)
                for f in _channel_findings(name, numbers[c], None if trained is None else trained[c], float(low[c]),
                                           float(high[c]), np.dtype(dtype), bit_depth)]
    worst = max((severity for severity, _ in findings), default=0)
    messages = tuple(message for _, message in findings)
    if worst:
        return FitReport(LEVELS[worst], messages, matched, tuple(numbers))
    if statistics is None and not per_image:
        return FitReport("unknown", ("this model records no statistics of its training images, so phenotwin cannot "
                                     "judge whether the intensities fit; retrain it with this version of phenotwin.",),
                         matched, tuple(numbers))
    return FitReport("ok", (), matched, tuple(numbers))
