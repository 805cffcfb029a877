"""Differences between an image and its translation: the heatmap, and PSNR.

Differences are taken in normalised units (0 = the normalisation's low value, 1 = its
high value), so a heatmap value of 0.1 means "a tenth of the channel's dynamic range",
whatever the microscope's bit depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Heatmap:
    per_channel: np.ndarray  # (C, H, W) float32
    total: np.ndarray  # (H, W) float32: summed over channels (signed maps sum signed values)
    signed: bool


def difference_map(source: np.ndarray, translated: np.ndarray, signed: bool = False, sigma: float = 0.0) -> Heatmap:
    """Pixelwise (|translated - source|, or the signed difference) of model-range (C, H, W) images.

    `sigma` > 0 smooths each channel with a Gaussian (scikit-image) so that scattered
    single-pixel noise does not outshine a coherent, cell-sized change.
    """
    source = np.asarray(source, dtype=np.float32)
    translated = np.asarray(translated, dtype=np.float32)
    if source.shape != translated.shape or source.ndim != 3:
        raise ValueError(f"difference_map needs two (C, H, W) arrays of one shape, got {source.shape} and {translated.shape}")
    diff = (translated - source) / 2.0  # model range [-1, 1] spans 2 units
    if not signed:
        diff = np.abs(diff)
    if sigma > 0:
        from skimage.filters import gaussian

        diff = gaussian(diff, sigma=sigma, channel_axis=0, preserve_range=True).astype(np.float32)
    return Heatmap(per_channel=diff.astype(np.float32), total=diff.sum(axis=0).astype(np.float32), signed=signed)


def psnr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """PSNR in dB of model-range ([-1, 1]) images; infinite when they are equal."""
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(reference, estimate):
        return float("inf")
    return float(peak_signal_noise_ratio(reference, estimate, data_range=2.0))
