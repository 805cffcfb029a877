"""One image and its translation, cell by cell: what the napari "Explain change" dock shows.

`explain_cells_steps` measures every labelled cell of the source and of the translation (the
same labels and nuclei: paired), ranks the paired effects, and keeps each cell's change of
every feature, so `largest_changes` can name the cells where a chosen feature changed most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.explain.effects import Effect, compare
from phenotwin.explain.features import (
    Feature,
    cell_features,
    check_labels,
    feature_list,
    intensity_ranges,
    nucleus_mask,
    segment_cells,
)
from phenotwin.progress import Progress, Steps

HIGHLIGHTED = 3  # cells marked for a selected feature


@dataclass
class CellChanges:
    labels: np.ndarray  # (H, W) the cells measured
    segmented: bool  # labels made here, for the user to check
    features: list[Feature]
    before: list[dict[str, Any]]  # per cell, the source
    after: list[dict[str, Any]]  # per cell, the translation (same order)
    effects: list[Effect]  # paired, ranked

    def change(self, key: str) -> dict[int, float]:
        """label -> after - before of one feature."""
        return {int(b["label"]): float(a[key]) - float(b[key]) for b, a in zip(self.before, self.after)}


def largest_changes(changes: CellChanges, key: str, count: int = HIGHLIGHTED) -> list[int]:
    """The labels of the `count` cells whose `key` changed most (by size; unchanged cells never)."""
    ranked = sorted(((abs(v), label) for label, v in changes.change(key).items() if np.isfinite(v) and v != 0),
                    reverse=True)
    return [label for _, label in ranked[:count]]


def explain_cells_steps(source: np.ndarray, translated: np.ndarray, labels: np.ndarray | None,
                        channel_names: list[str], nucleus_channel: int | None = 0,
                        seed: int = 0) -> Steps[CellChanges]:
    """Measure the cells of a (C, H, W) source and its translation; `labels` None: segment the source."""
    source, translated = np.asarray(source, np.float64), np.asarray(translated, np.float64)
    if source.shape != translated.shape:
        raise PhenotwinError(f"the translation is {translated.shape} but the source is {source.shape}; choose the "
                             "translation of this very image.")
    if nucleus_channel is not None and not 0 <= nucleus_channel < source.shape[0]:
        raise PhenotwinError(f"nucleus channel {nucleus_channel} does not exist (channels 0..{source.shape[0] - 1}).")
    yield Progress("segment", 0, 3)
    segmented = labels is None
    labels = segment_cells(source, nucleus_channel) if segmented else check_labels(labels, source.shape[1:])
    if not labels.any():
        raise PhenotwinError("the labels hold no cells; segment the cells first (or leave Labels empty to segment here).")
    ranges = intensity_ranges([source, translated])
    nuclei = nucleus_mask(source, nucleus_channel)
    yield Progress("measure", 1, 3)
    before = cell_features(source, labels, channel_names, ranges, nucleus_channel, nuclei)
    after = cell_features(translated, labels, channel_names, ranges, nucleus_channel, nuclei)
    yield Progress("compare", 2, 3)
    features = feature_list(channel_names)
    effects = compare(before, after, features, paired=True, seed=seed)
    yield Progress("compare", 3, 3)
    return CellChanges(labels, segmented, features, before, after, effects)
