"""What changed, with uncertainty: effect sizes of per-cell features with bootstrap confidence intervals.

Two comparisons, one `Effect` per feature each:
- **paired**: every cell's translation against the same cell's source (the same labels), the
  mean change per cell;
- **between**: the real cells of one condition against those of the other.

Each effect has the difference of the means in the feature's unit, the relative change (after /
before - 1) and a standardised effect (the difference in cell-to-cell standard deviations of the
"before" cells: what the ranking and the forest plot use, since units differ between features),
each with a percentile bootstrap interval over cells. `agreement` says whether a translation
changes the features the real conditions differ in: Spearman's rank correlation of the
standardised effects over features, and how often the signs agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.explain.features import Feature

N_RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Effect:
    key: str
    words: str
    unit: str
    kind: str  # "paired" (translation vs its source) or "between" (real condition vs real condition)
    n_before: int
    n_after: int
    before: float  # mean over the "before" cells (source / first condition)
    after: float
    difference: float
    difference_ci: tuple[float, float]
    relative: float  # after / before - 1; NaN when the before mean is 0
    relative_ci: tuple[float, float]
    standardised: float  # difference / s.d. of the before cells
    standardised_ci: tuple[float, float]

    def excludes_zero(self) -> bool:
        low, high = self.difference_ci
        return bool(low > 0 or high < 0)

    def text(self) -> str:
        """'golgi fragments per cell: +4.9 [4.4, 5.4] count (+445% [380, 512])'."""
        low, high = self.difference_ci
        words = f"{self.words}: {self.difference:+.3g} [{low:.3g}, {high:.3g}] {self.unit}"
        if math.isfinite(self.relative):
            words += f" ({100 * self.relative:+.0f}% [{100 * self.relative_ci[0]:.0f}, {100 * self.relative_ci[1]:.0f}])"
        return words

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rows_to_matrix(rows: list[dict[str, Any]], features: list[Feature]) -> np.ndarray:
    return np.array([[float(row.get(f.key, np.nan)) for f in features] for row in rows], dtype=np.float64).reshape(
        len(rows), len(features))


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return (float("nan"), float("nan"))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return (float(low), float(high))


def _statistics(before: np.ndarray, after: np.ndarray, paired: bool) -> tuple[np.ndarray, ...]:
    """Difference, relative change and standardised effect of the means along the last axis."""
    mean_before, mean_after = np.nanmean(before, axis=-1), np.nanmean(after, axis=-1)
    difference = np.nanmean(after - before, axis=-1) if paired else mean_after - mean_before
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(mean_before != 0, mean_after / mean_before - 1, np.nan)
        spread = np.nanstd(before, axis=-1) if paired else np.sqrt(
            (np.nanvar(before, axis=-1) + np.nanvar(after, axis=-1)) / 2)
        # no spread before: no change is 0, any change is infinitely many spreads (ranked first)
        standardised = np.where(spread > 0, difference / spread, np.where(difference == 0, 0.0, np.sign(difference) * np.inf))
    return difference, relative, standardised


def compare(before_rows: list[dict[str, Any]], after_rows: list[dict[str, Any]], features: list[Feature],
            paired: bool, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
            seed: int = 0) -> list[Effect]:
    """One `Effect` per feature, ranked by |standardised effect| (the largest change first).

    Paired rows are the same cells in the same order (a translation measured with its source's
    labels). The bootstrap is hand-written (a percentile bootstrap, seeded) so that one
    resampling of the cells serves every feature and all three statistics at once, and paired
    cells stay paired; scipy.stats.bootstrap would resample per feature and statistic."""
    if paired and len(before_rows) != len(after_rows):
        raise PhenotwinError(f"a paired comparison needs the same cells before and after; got {len(before_rows)} "
                             f"and {len(after_rows)} cells. Measure each translation with its source's labels.")
    for name, rows in (("before", before_rows), ("after", after_rows)):
        if len(rows) < 2:
            raise PhenotwinError(f"the {name} group has {len(rows)} cell(s); effect sizes and their intervals need "
                                 "at least 2 cells per group (preferably 20 or more). Give more images or cells.")
    before, after = _rows_to_matrix(before_rows, features), _rows_to_matrix(after_rows, features)
    rng = np.random.default_rng(seed)
    picks_before = rng.integers(0, len(before), (n_resamples, len(before)))
    picks_after = picks_before if paired else rng.integers(0, len(after), (n_resamples, len(after)))
    estimates = _statistics(before.T, after.T, paired)
    effects = []
    for j, feature in enumerate(features):
        resampled = _statistics(before[picks_before, j], after[picks_after, j], paired)
        (difference, relative, standardised) = (float(s[j]) for s in estimates)
        effects.append(Effect(
            key=feature.key, words=feature.words, unit=feature.unit, kind="paired" if paired else "between",
            n_before=int(np.isfinite(before[:, j]).sum()), n_after=int(np.isfinite(after[:, j]).sum()),
            before=float(np.nanmean(before[:, j])) if np.isfinite(before[:, j]).any() else float("nan"),
            after=float(np.nanmean(after[:, j])) if np.isfinite(after[:, j]).any() else float("nan"),
            difference=difference, difference_ci=_interval(resampled[0], confidence),
            relative=relative, relative_ci=_interval(resampled[1], confidence),
            standardised=standardised, standardised_ci=_interval(resampled[2], confidence)))
    return rank(effects)


def rank(effects: list[Effect]) -> list[Effect]:
    """Largest |standardised effect| first; features that cannot be measured (NaN) last."""
    return sorted(effects, key=lambda e: math.inf if math.isnan(e.standardised) else -abs(e.standardised))


def agreement(translation: list[Effect], real: list[Effect]) -> dict[str, Any]:
    """Does the translation change what really differs between the conditions?

    Spearman's rank correlation of the standardised effects over the features both measured,
    and the share of the features whose real difference is clear (interval excludes 0) in which
    the translation moves the same way."""
    from scipy.stats import spearmanr

    by_key = {e.key: e for e in real}
    pairs = [(t.standardised, by_key[t.key].standardised, by_key[t.key]) for t in translation
             if t.key in by_key and math.isfinite(t.standardised) and math.isfinite(by_key[t.key].standardised)]
    if len(pairs) < 3:
        raise PhenotwinError("fewer than 3 features were measured in both comparisons; a rank agreement needs more.")
    ours, theirs = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    rho = spearmanr(ours, theirs).statistic if np.ptp(ours) > 0 and np.ptp(theirs) > 0 else float("nan")
    clear = [(t, r) for t, r, effect in pairs if effect.excludes_zero()]
    signs = [np.sign(t) == np.sign(r) for t, r in clear]
    return {"spearman": float(rho), "features": len(pairs), "clear_real_differences": len(clear),
            "sign_agreement": float(np.mean(signs)) if signs else float("nan")}


def forest_plot(path, effects: list[Effect], top: int = 15, reference: list[Effect] | None = None,
                labels: tuple[str, str] = ("translation vs source", "between real conditions"), title: str = ""):
    """The `top` effects (their standardised size and 95% interval) as a forest plot PNG, written atomically.
    With `reference`, the same features' real between-condition effects beside them."""
    from matplotlib.figure import Figure

    from phenotwin.io import write_png_figure

    figure = Figure(figsize=(7.5, 0.38 * min(top, len(effects)) + 1.4))
    draw_forest(figure, effects, top, reference, labels, title)
    return write_png_figure(path, figure)


def draw_forest(figure, effects: list[Effect], top: int = 15, reference: list[Effect] | None = None,
                labels: tuple[str, str] = ("translation vs source", "between real conditions"), title: str = "") -> None:
    """Draw the forest plot into a matplotlib `Figure` (a file's or the napari dock's canvas)."""
    figure.clear()
    shown = [e for e in effects if np.isfinite(e.standardised)][:top]  # an infinite effect has no place on an axis
    axes = figure.subplots()
    ys = np.arange(len(shown))[::-1]
    series = [(shown, labels[0], "tab:blue", 0.0)]
    if reference is not None:
        by_key = {e.key: e for e in reference}
        series = [(shown, labels[0], "tab:blue", 0.15),
                  ([by_key.get(e.key) for e in shown], labels[1], "tab:orange", -0.15)]
    for items, label, colour, offset in series:
        xs = [e.standardised if e else np.nan for e in items]
        lows = [e.standardised - e.standardised_ci[0] if e else np.nan for e in items]
        highs = [e.standardised_ci[1] - e.standardised if e else np.nan for e in items]
        axes.errorbar(xs, ys + offset, xerr=[lows, highs], fmt="o", color=colour, capsize=3, label=label)
    axes.axvline(0, color="grey", lw=0.8)
    axes.set_yticks(ys, [e.words for e in shown])
    axes.set_xlabel("effect (cell-to-cell standard deviations), 95% bootstrap interval")
    axes.set_title(title or "What changed")
    axes.legend(loc="lower right", fontsize=8)
