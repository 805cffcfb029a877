"""Overview figures: rows of images with titles, fluorescence channels as colour composites."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

# Colour for each channel in a composite: magenta nucleus, green organelle, cyan cytoplasm.
CHANNEL_COLOURS = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.8, 1.0]])


def composite(image: np.ndarray) -> np.ndarray:
    """(C, H, W) or (H, W) intensities to an (H, W, 3) RGB picture, each channel scaled to its range."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    low = array.min(axis=(1, 2), keepdims=True)
    high = array.max(axis=(1, 2), keepdims=True)
    unit = (array - low) / np.maximum(high - low, 1e-12)
    if unit.shape[0] == 1:
        return np.repeat(unit[0][..., None], 3, axis=-1)
    colours = CHANNEL_COLOURS[: unit.shape[0]]
    return np.clip(np.einsum("chw,ck->hwk", unit, colours), 0, 1)


def draw_montage(
    figure,
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    row_titles: Sequence[str] | None = None,
) -> None:
    """Draw a grid into a matplotlib `figure`: images as composites, 2-D maps whose title
    names a heatmap or a mask with the inferno colormap."""
    axes = figure.subplots(len(rows), len(titles), squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            ax = axes[r, c]
            if image is None:
                ax.set_visible(False)
                continue
            if "heatmap" in titles[c] or "mask" in titles[c]:
                ax.imshow(image, cmap="inferno", vmin=0)
            else:
                ax.imshow(composite(image), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if c == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[r], fontsize=9)


def save_montage(
    path: str | os.PathLike,
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    row_titles: Sequence[str] | None = None,
) -> None:
    """Save a grid (see `draw_montage`) as a PNG, atomically."""
    from matplotlib.figure import Figure

    from phenotwin.io import write_png_figure

    figure = Figure(figsize=(2.2 * len(titles), 2.2 * len(rows)))
    draw_montage(figure, rows, titles, row_titles)
    figure.tight_layout()
    write_png_figure(path, figure)
