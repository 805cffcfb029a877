"""Whether to believe a result, in the dock's words: the input's fit and the model's trust verdict.

The library judges (`phenotwin.input_fit`, `phenotwin.trust`) and every result carries both:
a `Translation` its own, per-cell and stack results those of their worst cell or plane. This
module only picks what the dock says. No fixed dB thresholds here. Imports neither Qt,
napari nor torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def verdict(result, several: bool = False) -> Verdict:
    """The lines for `result` (a Translation, CellTranslation or StackTranslation); `several`: it
    holds many cells or planes, and its fit and verdict are those of the worst."""
    fit, trust = result.fit, result.trust
    measured = several or not math.isnan(trust.psnr)  # a slider update measures no reconstruction
    quality = trust.message + (" (the worst of all)" * several) if measured else None
    return Verdict(f"Input: {fit.message}" if fit is not None else "", quality,
                   fit.level if fit is not None else None, trust.level)
