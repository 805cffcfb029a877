"""The "texture" phenotype: real microscopy texture, changed in a known way inside a known mask.

Clean drawn cells are easier for a diffusion model than real images (dark, spectrally
sparse, camera noise, texture the model cannot reproduce exactly), and defaults tuned on
them do not transfer. This phenotype starts from a real microscope image that ships with
scikit-image (`skimage.data.cell()`, 660 x 550, a cell imaged in transmitted light): each
pair is a random crop (flipped and rotated), and the treated image is the same crop with,
inside one random elliptical region, the local texture amplified (contrast around the
local mean x TEXTURE_GAIN) and the region brightened by BRIGHTEN: a granularity and
intensity change with an exact mask. Channel 2, when asked for, is the same field seen
smoothed (a second, unaffected stain): what a faithful translation must leave alone.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

TEXTURE_GAIN = 1.8
BRIGHTEN = 0.12  # of the full range, added inside the region
REGION_FRACTION = (0.08, 0.2)  # of the image area
LOCAL_SIGMA = 3.0  # px: what "local mean" means
MASK_THRESHOLD = 0.02  # clean difference above which a pixel counts as changed (as for drawn cells)


def _source() -> np.ndarray:
    from skimage import data

    image = data.cell().astype(np.float64) / 255.0
    return image


def texture_pair(seed: int, index: int, size: int, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(control, treated, change mask) of one pair: float32 (C, size, size) in [0, 1] and a bool mask."""
    source = _source()
    rng = np.random.default_rng([seed, index, 7])
    height, width = source.shape
    y = int(rng.integers(0, height - size + 1))
    x = int(rng.integers(0, width - size + 1))
    crop = np.rot90(source[y : y + size, x : x + size], k=int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = 0.1 + 0.8 * (crop - crop.min()) / max(float(np.ptp(crop)), 1e-6)  # a dark floor, some headroom
    area = rng.uniform(*REGION_FRACTION) * size * size
    ratio = rng.uniform(0.6, 1.0)
    a = np.sqrt(area / (np.pi * ratio))
    b = a * ratio
    cy, cx = rng.uniform(0.3, 0.7, size=2) * size
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[:size, :size]
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    region = ndi.gaussian_filter(((u / a) ** 2 + (v / b) ** 2 <= 1.0).astype(np.float64), 1.0)  # soft edge
    local = ndi.gaussian_filter(crop, LOCAL_SIGMA)
    changed = local + TEXTURE_GAIN * (crop - local) + BRIGHTEN
    treated = np.clip(crop + region * (changed - crop), 0.0, 1.0)
    mask = np.abs(treated - crop) > MASK_THRESHOLD
    planes = [crop, treated]
    if channels == 2:  # an unaffected second stain: the field, smoothed and dimmer
        second = 0.15 + 0.6 * ndi.gaussian_filter(crop, 2.0)
        planes = [np.stack([crop, second]), np.stack([treated, second])]
    else:
        planes = [crop[None], treated[None]]
    noise = rng.standard_normal((channels, size, size)) * 0.01  # the same camera noise in both conditions
    control, treated = (np.clip(p + noise, 0.0, 1.0).astype(np.float32) for p in planes)
    return control, treated, mask
