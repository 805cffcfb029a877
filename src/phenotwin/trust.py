"""Should the user believe this result? A verdict calibrated on the model's own held-out images.

The reconstruction PSNR (the input regenerated under its own condition) is the trust signal,
but what counts as good depends on the model, its step count and the strength: fixed dB
thresholds called garbage "fair" at 20 steps (25.9 dB) next to a real image (26.0 dB). So
`phenotwin calibrate` (and training) measure the PSNR on held-out images of the training
distribution at the settings the model offers, and a result is ranked against that
distribution. The input-fit report comes first: an image that does not fit the model never
reads good, whatever its PSNR. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from phenotwin.input_fit import FitReport

LEVELS = ("good", "fair", "uncalibrated", "poor", "does-not-fit")  # from best to worst
# A result reads "good" at or above this quantile of the model's held-out PSNRs, less GOOD_MARGIN_DB,
# so about 95% of the model's own held-out images do. Not the worst held-out image: real cells have a
# hard tail (two nuclei in one crop, an unusually large cell: 1 in 12 of the demo's reconstruct ~15 dB
# below the median at strength 0.75, and their translations can move a nucleus), so the worst of 16
# usually missed it while the worst of 64 fell into it, and the verdict depended on how many images
# were calibrated. A quantile does not. Results in the tail read "fair"; below every held-out image
# less POOR_MARGIN_DB, "poor".
GOOD_QUANTILE = 0.05
GOOD_MARGIN_DB = 1.0
POOR_MARGIN_DB = 3.0
# Used only for a model without calibration, and said so: the old fixed thresholds.
UNCALIBRATED_DB = (25.0, 32.0)
# The reconstruction PSNR rises steeply with the step count (32 / 38 / 44 dB at 50 / 100 / 200 steps
# on the demo model), so a result is ranked only against held-out images measured at nearly its own
# step count (within this factor); at any other it is not judged, rather than called poor or good.
STEP_TOLERANCE = 1.2


@dataclass(frozen=True)
class TrustVerdict:
    level: str  # one of LEVELS
    message: str
    psnr: float
    percentile: float | None = None  # share of the model's held-out images this result beats, in %

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "message": self.message, "psnr": self.psnr, "percentile": self.percentile}

    @staticmethod
    def worst(verdicts: list[TrustVerdict]) -> TrustVerdict:
        """The least trustworthy of several (the cells or planes of one result)."""
        return max(verdicts, key=lambda v: (LEVELS.index(v.level), -v.psnr if math.isfinite(v.psnr) else 0.0))


def _nearest(keys: list[str], value: float, log: bool = False) -> str:
    def distance(key: str) -> float:
        return abs(math.log(float(key) / value)) if log else abs(float(key) - value)

    return min(keys, key=distance)


def measured_with(calibration: dict[str, Any] | None) -> tuple[str, int]:
    """The solver and inversion refinements the verdict's table was measured with (records from
    before the cost search measured DDIM without refinements)."""
    calibration = calibration or {}
    return calibration.get("reconstruction_solver", "ddim"), calibration.get("reconstruction_refinements", 0)


def held_out_psnrs(calibration: dict[str, Any] | None, steps: int, strength: float, guidance: float = 0.0,
                   solver: str = "ddim", refinements: int = 0) -> tuple[list[float], str] | None:
    """The calibrated PSNRs nearest to these settings, and a phrase naming the settings they were measured at."""
    table = (calibration or {}).get("reconstruction_psnr") or {}
    measured = calibration.get("reconstruction_guidance") if table else None  # None: a record from before guidance was kept
    if not table or (measured is not None and not math.isclose(guidance, measured)):
        return None
    if measured_with(calibration) != (solver, refinements):  # another solver reconstructs to another scale
        return None
    step_key = _nearest(list(table), steps, log=True)
    if abs(math.log(float(step_key) / steps)) > math.log(STEP_TOLERANCE):
        return None
    strength_key = _nearest(list(table[step_key]), strength)
    values = [v for v in table[step_key][strength_key] if math.isfinite(v)]
    return (values, f"at {step_key} steps, strength {float(strength_key):g}") if values else None


def verdict(psnr: float, steps: int, strength: float, calibration: dict[str, Any] | None,
            fit: FitReport | None = None, guidance: float = 0.0, solver: str = "ddim",
            refinements: int = 0) -> TrustVerdict:
    """The trust verdict of a result with reconstruction `psnr` at these settings."""
    shown = "not measured" if not math.isfinite(psnr) and psnr != math.inf else f"{psnr:.1f} dB"
    if fit is not None and fit.level == "does-not-fit":
        return TrustVerdict("does-not-fit", f"Reconstruction {shown}. {fit.message}", psnr)
    reference = held_out_psnrs(calibration, steps, strength, guidance, solver, refinements)
    if not math.isfinite(psnr) and psnr != math.inf:
        level, message, percentile = "uncalibrated", "Reconstruction not measured.", None
    elif reference is None and (calibration or {}).get("reconstruction_psnr"):
        calibrated = ", ".join(sorted(calibration["reconstruction_psnr"], key=float))
        measured_guidance = calibration.get("reconstruction_guidance")
        level, percentile = "uncalibrated", None
        measured_solver, measured_refinements = measured_with(calibration)
        if (measured_solver, measured_refinements) != (solver, refinements):
            message = (f"Reconstruction {shown} with solver {solver} and {refinements} inversion refinement(s): not "
                       f"judged, as this model's held-out images were measured with {measured_solver} and "
                       f"{measured_refinements}, which reconstruct to another scale. Use the model's defaults, or "
                       "make these its defaults and run `phenotwin calibrate MODEL --data HELD_OUT --no-sweep`.")
        elif measured_guidance is not None and not math.isclose(guidance, measured_guidance):
            message = (f"Reconstruction {shown} at guidance {guidance:g}: not judged, as this model's held-out images "
                       f"were measured at guidance {measured_guidance:g} and guidance changes the reconstruction. Use "
                       f"guidance {measured_guidance:g}, or make {guidance:g} the model's default and run "
                       f"`phenotwin calibrate MODEL --data HELD_OUT --no-sweep`.")
        else:
            message = (f"Reconstruction {shown} at {steps} steps: not judged, as this model's held-out images were "
                       f"measured at {calibrated} steps only and the PSNR depends on the step count. Use {calibrated} "
                       f"steps, or run `phenotwin calibrate MODEL --data HELD_OUT --steps {steps} --no-sweep`.")
    elif reference is None:
        poor, fair = UNCALIBRATED_DB
        word = "poor" if psnr < poor else "fair" if psnr < fair else "good"
        level, percentile = "uncalibrated", None
        message = (f"Reconstruction {shown} ({word} by fixed thresholds; this model is not calibrated, so this is a "
                   "rough guide: run `phenotwin calibrate` to judge results against the model's own held-out images).")
    else:
        values, where = reference
        percentile = float(100.0 * np.mean(np.asarray(values) <= psnr))
        if psnr >= float(np.quantile(values, GOOD_QUANTILE)) - GOOD_MARGIN_DB:
            level = "good"
            message = (f"Reconstruction {shown}: good, as high as or higher than {percentile:.0f}% of this model's "
                       f"held-out images ({where}).")
        elif psnr >= min(values) - POOR_MARGIN_DB:
            level = "fair"
            message = (f"Reconstruction {shown}: fair, lower than {100 - percentile:.0f}% of this model's held-out "
                       f"images ({where}), like the hardest images it reconstructs (unusual cells: two nuclei in one "
                       "crop, a large cell): small changes may be reconstruction error, and a cell may have moved. "
                       "Compare the translation with the input before reading the heatmap.")
        else:
            level = "poor"
            message = (f"Reconstruction {shown}: POOR, below all of this model's held-out images ({where}, worst "
                       f"{min(values):.1f} dB): do not trust this translation. Is the image like the training images "
                       "(magnification, channels, intensities)?")
    if fit is not None and fit.level == "warning":
        if level == "good":
            level = "fair"
        message += " " + fit.message
    elif fit is not None and fit.level == "unknown":
        message += " (Input fit unknown: the model records no training statistics.)"
    return TrustVerdict(level, message, psnr, percentile)
