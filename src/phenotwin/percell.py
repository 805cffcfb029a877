"""Per-cell translation: translate each segmented cell in its own window and score its change.

Given an image and a labels array of segmented cells, every cell is translated in a window
around its bounding box at the model's own scale (never resized): the window is the model's
native size, or larger for a cell bigger than that, in which case the `Translator` tiles it
like any large field. Windows that reach past the image edge are mirrored there (as
`ImageProcessor.preprocess` pads). Each cell's translation and heatmap are pasted back inside that
cell's own mask only, so overlapping windows never conflict and pixels outside cells keep
the input (heatmap 0). Each cell is scored by its mean heatmap inside its mask.

Cells go one by one through the public `Translator` API (one inference path); a run
reports progress per cell and diffusion step and can be cancelled like any other.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.input_fit import FitReport
from phenotwin.io import write_csv, write_text
from phenotwin.pipeline.settings import TranslationSettings
from phenotwin.preprocessing import channels_first, from_channels_first
from phenotwin.progress import CancelFlag, Steps, drive, tagged
from phenotwin.trust import TrustVerdict

if TYPE_CHECKING:
    from phenotwin.pipeline.translator import Translator

DEFAULT_MARGIN = 8  # px of context around a cell's bounding box


@dataclass
class CellTranslation:
    """A field translated cell by cell, with one row of scores per cell."""

    image: np.ndarray  # the input with every cell replaced by its translation (input units, dtype, layout)
    heatmap: np.ndarray  # (H, W) summed over channels, normalised units; 0 outside cells
    heatmap_channels: np.ndarray  # (C, H, W)
    scores: list[dict[str, Any]]  # one dict per cell, the columns of `columns`
    columns: list[str]
    settings: TranslationSettings  # resolved
    checkpoint_id: str
    margin: int
    fit: FitReport | None = None  # the worst cell's input fit
    trust: TrustVerdict | None = None  # the least trustworthy cell's verdict

    def metadata(self) -> dict[str, Any]:
        """Provenance of the run (napari layer metadata)."""
        s = self.settings
        return {"source": s.source, "target": s.target, "strength": s.strength, "steps": s.steps,
                "guidance": s.guidance, "confine": s.confine, "seed": s.seed, "checkpoint": self.checkpoint_id,
                "margin": self.margin, "cells": len(self.scores),
                "input_fit": None if self.fit is None else {"level": self.fit.level, "findings": list(self.fit.findings)},
                "trust": None if self.trust is None else self.trust.to_dict()}

    def write_csv(self, path: str | os.PathLike) -> Path:
        """Write the per-cell scores as CSV, atomically (a half-written table never appears), and the
        run's settings and provenance beside it: the same name with .json (a sidecar)."""
        written = write_csv(path, self.columns, self.scores)
        write_text(written.with_suffix(".json"), json.dumps(
            {"settings": self.settings.to_dict(), **self.metadata()}, indent=2, default=str))
        return written


def _check_labels(labels: Any, shape: tuple[int, int]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise PhenotwinError(
            f"labels have dtype {labels.dtype}; expected integer cell labels (0 = background, 1, 2, ... = cells), "
            "e.g. from a segmentation's Labels layer."
        )
    if labels.shape != shape:
        raise PhenotwinError(
            f"labels are {labels.shape} but the image plane is {shape}; use the segmentation of this very image "
            "(same height and width, same plane of a stack)."
        )
    if labels.size and labels.min() < 0:
        raise PhenotwinError("labels contain negative values; cell labels must be 0 (background) or positive.")
    if not labels.any():
        raise PhenotwinError("the labels contain no cells (every pixel is 0); segment the cells first.")
    return labels


def cell_window(bbox: tuple[int, int, int, int], model_size: int, margin: int) -> tuple[int, int, int, int]:
    """(y0, x0, height, width) of a window centred on the box: the model's size, or the box plus
    `margin` on each side when that is larger (then tiled by the Translator). May reach outside."""
    r0, c0, r1, c1 = bbox
    height = max(model_size, r1 - r0 + 2 * margin)
    width = max(model_size, c1 - c0 + 2 * margin)
    y0 = (r0 + r1) // 2 - height // 2
    x0 = (c0 + c1) // 2 - width // 2
    return y0, x0, height, width


def crop_mirrored(chw: np.ndarray, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """The window of a (C, H, W) array; parts outside the image are mirrored at its edges."""
    _, H, W = chw.shape
    top, left = max(0, y0), max(0, x0)
    bottom, right = min(H, y0 + height), min(W, x0 + width)
    inside = chw[:, top:bottom, left:right]
    pads = ((0, 0), (top - y0, y0 + height - bottom), (left - x0, x0 + width - right))
    return np.pad(inside, pads, mode="symmetric") if any(p for pair in pads for p in pair) else inside.copy()


def translate_cells_steps(translator: Translator, image: Any, labels: Any, source: str | int | None = None,
                          target: str | int | None = None, strength: float | None = None, steps: int | None = None,
                          guidance: float | None = None, seed: int | None = None, channel_axis: int | None = None,
                          margin: int = DEFAULT_MARGIN, confine: bool | None = None, *,
                          settings: TranslationSettings | None = None) -> Steps[CellTranslation]:
    """Generator form of `translate_cells`: yields a `Progress` per diffusion step, tagged with
    the cell (item k of N), and returns the `CellTranslation`. Inputs are checked before any work."""
    chw, axis = channels_first(image, channel_axis)
    labels = _check_labels(labels, chw.shape[1:])
    resolved = translator.resolve(settings, source=source, target=target, strength=strength, steps=steps,
                                  guidance=guidance, seed=seed, confine=confine)
    if margin < 0:
        raise PhenotwinError(f"margin must be 0 or more pixels, got {margin}.")
    return _translate_cells(translator, chw, axis, labels, resolved, margin)


def _translate_cells(translator, chw, axis, labels, settings, margin):
    from skimage.measure import regionprops

    cells = regionprops(labels)
    names = list(translator.info.channel_names or [f"channel {c + 1}" for c in range(translator.channels)])
    translated = np.array(chw, copy=True)  # channels first; the input itself is never written
    heat = np.zeros((translator.channels, *chw.shape[1:]), dtype=np.float32)
    rows, results = [], []
    for k, cell in enumerate(cells):
        y0, x0, height, width = cell_window(cell.bbox, translator.image_size, margin)
        window = crop_mirrored(chw, y0, x0, height, width)
        run = translator.translate_steps(window, channel_axis=0, settings=settings)
        try:
            result = yield from tagged(run, k + 1, len(cells), "cell")
        except PhenotwinError as err:
            raise PhenotwinError(f"cell {cell.label} (window at y={y0}, x={x0}): {err}") from err
        # paste inside the cell's own mask, at the window's position in the image
        r0, c0, r1, c1 = cell.bbox
        mask = cell.image  # (r1 - r0, c1 - c0) bool
        wy, wx = r0 - y0, c0 - x0
        translated[:, r0:r1, c0:c1][:, mask] = result.image[:, wy : wy + r1 - r0, wx : wx + c1 - c0][:, mask]
        heat[:, r0:r1, c0:c1][:, mask] = result.heatmap_channels[:, wy : wy + r1 - r0, wx : wx + c1 - c0][:, mask]
        per_channel = heat[:, r0:r1, c0:c1][:, mask].mean(axis=1)
        rows.append({
            "label": int(cell.label),
            "area": int(cell.area),
            "centroid_y": round(float(cell.centroid[0]), 2),
            "centroid_x": round(float(cell.centroid[1]), 2),
            "bbox_y0": int(r0), "bbox_x0": int(c0), "bbox_y1": int(r1), "bbox_x1": int(c1),
            "change": float(per_channel.sum()),
            **{f"change_{name}": float(value) for name, value in zip(names, per_channel)},
            "reconstruction_psnr": round(float(result.reconstruction_psnr), 3)
            if math.isfinite(result.reconstruction_psnr) else result.reconstruction_psnr,
            "trust": result.trust.level,
        })
        results.append(result)
    columns = ["label", "area", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "change",
               *[f"change_{name}" for name in names], "reconstruction_psnr", "trust"]
    return CellTranslation(image=from_channels_first(translated, axis), heatmap=heat.sum(axis=0), heatmap_channels=heat,
                           scores=rows, columns=columns, settings=settings, checkpoint_id=translator.checkpoint_id,
                           margin=margin, fit=FitReport.worst([r.fit for r in results]),
                           trust=TrustVerdict.worst([r.trust for r in results]))


def translate_cells(translator, image, labels, source=None, target=None, strength=None, steps=None, guidance=None,
                    seed=None, channel_axis=None, margin=DEFAULT_MARGIN, confine=None, progress=None,
                    cancel: CancelFlag = None, *, settings=None) -> CellTranslation:
    """Translate every labelled cell of `image` from `source` to `target` and score its change
    (see `translate_cells_steps`)."""
    return drive(translate_cells_steps(translator, image, labels, source, target, strength, steps, guidance, seed,
                                       channel_axis, margin, confine, settings=settings), progress, cancel)
