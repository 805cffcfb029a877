"""Whether to believe a result, in the dock's words: the input's fit and the model's trust verdict.

The library judges (`phenotwin.input_fit`, `phenotwin.trust`); this module picks what the dock
says. A `Translation` carries its fit and its trust verdict, calibrated per model; per-cell
and stack results carry neither yet, so they get the library's verdict on their worst cell
or plane and the worst fit of their planes. No fixed dB thresholds here. Imports neither Qt,
napari nor torch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from phenotwin.input_fit import FitReport
from phenotwin.trust import verdict as trust_verdict

if TYPE_CHECKING:
    from phenotwin.pipeline.translator import Translator

BAD_FIT = ("warning", "does-not-fit")  # a notification, not only a line in the dock


@dataclass(frozen=True)
class Verdict:
    """The dock's two lines about a result, and whether to notify."""

    fit_line: str  # "" when the fit is not known
    quality_line: str | None  # None: not measured (a slider update), the line stays as it was
    fit_level: str | None
    trust_level: str | None

    @property
    def notify(self) -> bool:
        return self.fit_level in BAD_FIT or self.trust_level == "does-not-fit"


def input_fit(translator: Translator, image: np.ndarray) -> FitReport | None:
    """The worst fit over the planes of a (C, *leading, H, W) copy: for results that carry none
    (per-cell and stack runs). The model's own check (`ImageProcessor.preprocess`), no model call."""
    planes = image.reshape(image.shape[0], -1, *image.shape[-2:])
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dock shows it (and notifies) once
        for k in range(planes.shape[1]):
            reports.append(translator.processor.preprocess(planes[:, k], channel_axis=0).fit)
    return FitReport.worst(reports) if reports else None


def _worst_psnr(result) -> float:
    scores = getattr(result, "scores", None)
    if scores is not None:  # per cell
        values = [row["reconstruction_psnr"] for row in scores if math.isfinite(row["reconstruction_psnr"])]
        return min(values, default=float("nan"))
    return float(result.reconstruction_psnr)


def _settings(result) -> tuple[int, float]:
    settings = getattr(result, "settings", None)
    if settings is not None:
        return settings.steps, settings.strength
    meta = result.metadata() if callable(result.metadata) else result.metadata
    return meta["steps"], meta["strength"]


def verdict(result, fit: FitReport | None, calibration: dict[str, Any] | None, several: bool = False) -> Verdict:
    """The lines for `result` (a Translation, CellTranslation or StackTranslation); `several`: it
    holds many cells or planes, and the verdict is on the worst; `calibration`: the model's."""
    trust = None if several else getattr(result, "trust", None)
    psnr = _worst_psnr(result)
    if trust is None:
        trust = trust_verdict(psnr, *_settings(result), calibration, fit)
    quality = None if not math.isfinite(psnr) and not several else trust.message + (" (the worst of all)" * several)
    return Verdict(f"Input: {fit.message}" if fit is not None else "", quality,
                   fit.level if fit is not None else None, trust.level)
