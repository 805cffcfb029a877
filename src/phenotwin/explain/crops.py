"""Cell crops for the image models of the condition (the β-VAE and the CNN black box).

One window per cell, centred on it, of one size for every cell of a run (a little more than
the largest cells' extent), then resized to CROP_SIZE: resizing each cell to fill its own
crop would erase its size, often the very phenotype. Pixels of other cells are blanked (a
model sees one cell), and intensities use the run's common scale (`features.intensity_ranges`)
so that a brighter condition stays brighter.
"""

from __future__ import annotations

import numpy as np

from phenotwin.explain.features import MIN_CELL_AREA

CROP_SIZE = 32  # px per side the models see
WINDOW_MARGIN = 1.15  # the window over the 95th percentile of the cells' extent


def crop_window(labels: list[np.ndarray]) -> int:
    """The side (px) of the window cut around every cell of these label images."""
    from skimage.measure import regionprops

    extents = [max(r.bbox[2] - r.bbox[0], r.bbox[3] - r.bbox[1]) for image in labels for r in regionprops(image)
               if r.area >= MIN_CELL_AREA]
    return max(8, int(np.ceil(WINDOW_MARGIN * np.percentile(extents, 95)))) if extents else CROP_SIZE


def cell_crops(image: np.ndarray, labels: np.ndarray, cells: list[int], ranges: np.ndarray, window: int,
               size: int = CROP_SIZE) -> np.ndarray:
    """(N, C, size, size) float32 crops in [0, 1] of the cells `cells` (labels) of a (C, H, W) image.
    A cell larger than the window is cut to it; the image's edge pads with 0 (the background)."""
    from skimage.transform import resize

    chw = np.asarray(image, np.float64)
    scaled = np.clip((chw - ranges[:, :1, None]) / (ranges[:, 1:, None] - ranges[:, :1, None]), 0.0, 1.0)
    half = window // 2 + 1
    padded = np.pad(scaled, ((0, 0), (half, half), (half, half)))
    padded_labels = np.pad(labels, half)
    out = np.zeros((len(cells), chw.shape[0], size, size), np.float32)
    for i, cell in enumerate(cells):
        ys, xs = np.nonzero(labels == cell)
        if not len(ys):
            continue
        y0, x0 = int(round(ys.mean())) + half - window // 2, int(round(xs.mean())) + half - window // 2
        crop = padded[:, y0:y0 + window, x0:x0 + window] * (padded_labels[y0:y0 + window, x0:x0 + window] == cell)
        out[i] = resize(crop, (chw.shape[0], size, size), order=1, anti_aliasing=window > size, preserve_range=True)
    return out
