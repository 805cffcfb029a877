"""Synthetic paired fluorescence images of the same cells under two conditions.

Image-to-image translation between conditions can only be evaluated against a
ground truth when we know, pixel by pixel, what the treatment changed.  Real
screens never give us that (a cell is imaged under one condition only), so this
module renders the *same* cells twice -- once as control, once as treated -- with
the same camera noise, and returns the exact mask of what the phenotype changed.

The images are meant to look like widefield fluorescence microscopy rather than
clean geometry: irregular cell bodies, off-centre nuclei with chromatin texture
and nucleoli, a textured cytoplasm, a non-flat background, a small PSF blur and
shot + read noise.  Three phenotypes are available:

* ``"obvious"`` -- nocodazole-like Golgi dispersal: the compact perinuclear
  Golgi ribbon of the control cell breaks up into scattered puncta.
* ``"subtle"`` -- the Golgi crescent becomes ~30 % wider in angle and therefore
  ~20 % dimmer at equal total intensity, with slightly fragmented ends; easy to
  miss by eye but systematic, like many real screening hits.
* ``"texture"`` -- real microscopy texture (scikit-image's bundled cell image), its
  granularity and brightness raised inside one known region (`synthetic.texture`).

Everything is a pure function of ``(seed, index, size, channels, phenotype,
cells_per_image, changed_fraction)``, so disjoint train / held-out sets are made
with the ``start`` argument and results are bit-identical across runs.
Only numpy and scipy.ndimage are used (tifffile for `write_folders`), so tests,
benchmarks and the napari sample-data hook can call it without torch.

Here: the public API (`make_pairs`, `PairedCells`, `as_camera_units`, `write_folders`),
argument checks, channel composition, PSF blur and camera noise. `_render`: drawing the
clean cells of one image pair. `synthetic.batches`: the same biology on several plates with
known batch effects (`phenotwin synthetic --batches N`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from phenotwin.io import write_atomically
from phenotwin.synthetic._render import render_one
from phenotwin.synthetic.texture import texture_pair

__all__ = ["PHENOTYPES", "CHANNEL_NAMES", "PairedCells", "make_pairs", "write_folders"]

PHENOTYPES = ("obvious", "subtle", "texture")
CHANNEL_NAMES = {1: ("cells",), 2: ("nucleus", "golgi"), 3: ("nucleus", "golgi", "cytoplasm")}
TEXTURE_CHANNEL_NAMES = {1: ("texture",), 2: ("texture", "second stain")}
CONDITION_NAMES = {"obvious": ("control", "nocodazole"), "subtle": ("control", "treated"),
                   "texture": ("control", "textured")}

# Clean-image difference above which a pixel counts as changed.  Well above
# float rounding, well below what a person could see under the camera noise.
MASK_THRESHOLD = 0.02
# Fixed rendering constants (kept module-level so the look is easy to tune; cell size in _render).
_PSF_SIGMA = 0.9          # px, small widefield PSF
_PX_PER_CELL = 48 * 48    # default density for images larger than 64 px


@dataclass(frozen=True, eq=False)
class PairedCells:
    """A batch of control/treated images of the same cells plus ground truth.

    ``eq=False`` because the fields are numpy arrays (element-wise ``==`` would
    make dataclass equality ambiguous).  ``start`` records the index of the
    first image so files written from disjoint batches get disjoint names.
    """

    control: np.ndarray
    treated: np.ndarray
    change_mask: np.ndarray
    cell_labels: np.ndarray
    changed_cells: tuple
    channel_names: tuple
    condition_names: tuple
    phenotype: str
    seed: int
    start: int = 0

    def __len__(self) -> int:
        return int(self.control.shape[0])


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
def _as_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}; pass e.g. {name}=64.")
    return int(value)


def _validate(n, size, channels, phenotype, seed, start, cells_per_image, changed_fraction):
    n = _as_int(n, "n")
    size = _as_int(size, "size")
    channels = _as_int(channels, "channels")
    seed = _as_int(seed, "seed")
    start = _as_int(start, "start")
    if n < 1:
        raise ValueError(f"n must be >= 1 (number of image pairs), got n={n}; ask for at least one pair.")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got size={size}; cells cannot be drawn smaller. Use size=64.")
    if channels not in CHANNEL_NAMES:
        raise ValueError(
            f"channels must be 1, 2 or 3, got channels={channels}; "
            "1 = composite 'cells', 2 = nucleus+golgi, 3 = nucleus+golgi+cytoplasm."
        )
    if phenotype not in PHENOTYPES:
        raise ValueError(f"unknown phenotype={phenotype!r}; valid phenotypes are {', '.join(PHENOTYPES)}.")
    if phenotype == "texture" and (channels not in TEXTURE_CHANNEL_NAMES or size > 512):
        raise ValueError(f"the texture phenotype takes 1 or 2 channels and size <= 512 (crops of a 660 x 550 image), "
                         f"got channels={channels}, size={size}.")
    if seed < 0 or start < 0:
        raise ValueError(f"seed and start must be >= 0, got seed={seed}, start={start}; use non-negative integers.")
    try:
        changed_fraction = float(changed_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"changed_fraction must be a number in [0, 1], got {changed_fraction!r}.") from None
    if not 0.0 <= changed_fraction <= 1.0:
        raise ValueError(
            f"changed_fraction must be in [0, 1], got changed_fraction={changed_fraction}; "
            "it is the fraction of cells whose phenotype changes (1.0 = all)."
        )
    if cells_per_image is None:
        cells_per_image = _default_cells(size)
    else:
        try:
            lo, hi = (int(v) for v in cells_per_image)
        except (TypeError, ValueError):
            raise ValueError(
                f"cells_per_image must be a (min, max) pair of integers, got {cells_per_image!r}; e.g. (1, 2)."
            ) from None
        if lo < 1 or hi < lo:
            raise ValueError(
                f"cells_per_image must satisfy 1 <= min <= max, got {cells_per_image!r}; e.g. (1, 2)."
            )
        cells_per_image = (lo, hi)
    return n, size, channels, seed, start, cells_per_image, changed_fraction


def _default_cells(size: int) -> tuple[int, int]:
    """1-2 cells up to 64 px (a close-up), else about one cell per 48x48 px."""
    if size < 32:
        return (1, 1)
    if size <= 64:
        return (1, 2)
    mean = size * size / _PX_PER_CELL
    return (max(1, int(round(0.8 * mean))), max(2, int(round(1.05 * mean))))


def _compose(clean, channels):
    """Select / mix the base (nucleus, golgi, cytoplasm) channels for the requested count."""
    if channels == 3:
        return clean
    if channels == 2:
        return clean[:, :2]
    # single composite channel: dim nucleus + bright Golgi + faint cytoplasm, background once
    nuc, gol, cyt = clean[:, 0], clean[:, 1], clean[:, 2]
    return (0.25 * nuc + gol + 0.3 * cyt - 0.025)[:, None]


def make_pairs(
    n: int,
    size: int = 64,
    channels: int = 2,
    phenotype: str = "obvious",
    seed: int = 0,
    start: int = 0,
    cells_per_image: tuple[int, int] | None = None,
    changed_fraction: float = 1.0,
    redraw: int = 0,
) -> PairedCells:
    """Render `n` control/treated pairs of the same cells with exact change masks.

    Image ``i`` depends only on ``(seed, start + i)`` and the other arguments,
    so items 5..9 of ``make_pairs(10)`` equal ``make_pairs(5, start=5)`` and
    disjoint ``start`` ranges give disjoint data sets.  ``changed_fraction`` is the
    probability that each cell changes phenotype; the others stay identical.
    ``redraw`` > 0 draws the phenotype again (puncta elsewhere, another widening) for the same
    cells, camera and noise: what a perfect model, which cannot know where the puncta of the
    true counterfactual fell, could produce (benchmarks/demo_quality.py's floor of the ratio).
    """
    n, size, channels, seed, start, cells_per_image, changed_fraction = _validate(
        n, size, channels, phenotype, seed, start, cells_per_image, changed_fraction
    )
    redraw = _as_int(redraw, "redraw")
    if redraw < 0:
        raise ValueError(f"redraw must be >= 0 (0: the phenotype as first drawn), got redraw={redraw}.")
    if phenotype == "texture" and (changed_fraction != 1.0 or redraw):
        raise ValueError("the texture phenotype changes one region of every image: changed_fraction and redraw "
                         "apply to the drawn phenotypes (obvious, subtle) only.")
    ctrl = np.empty((n, channels, size, size), np.float32)
    trt = np.empty((n, channels, size, size), np.float32)
    mask = np.empty((n, size, size), bool)
    labels = np.empty((n, size, size), np.int32)
    changed_all = []
    for i in range(n):
        if phenotype == "texture":  # real microscopy texture (synthetic.texture)
            ctrl[i], trt[i], mask[i] = texture_pair(seed, start + i, size, channels)
            labels[i] = ndi.binary_fill_holes(ndi.binary_closing(mask[i], iterations=2)).astype(np.int32)
            changed_all.append((1,))
            continue
        clean, lab, changed, noise_rng = render_one(
            seed, start + i, size, phenotype, cells_per_image, changed_fraction, redraw
        )
        clean = ndi.gaussian_filter(
            _compose(clean, channels), (0, 0, _PSF_SIGMA, _PSF_SIGMA), mode="nearest", truncate=3.0
        )
        mask[i] = (np.abs(clean[1] - clean[0]) > MASK_THRESHOLD).any(axis=0)
        # camera: shot noise (Gaussian approximation of Poisson) + read noise; the
        # SAME draws for both conditions so unchanged pixels stay bit-identical
        photons = noise_rng.uniform(250.0, 600.0)
        read = noise_rng.uniform(0.006, 0.012)
        z = noise_rng.standard_normal((2, channels, size, size))
        noisy = clean + np.sqrt(np.clip(clean, 0, None) / photons) * z[0] + read * z[1]
        np.clip(noisy, 0.0, 1.0, out=noisy)
        ctrl[i], trt[i] = noisy[0], noisy[1]
        labels[i] = lab
        changed_all.append(changed)
    return PairedCells(
        control=ctrl,
        treated=trt,
        change_mask=mask,
        cell_labels=labels,
        changed_cells=tuple(changed_all),
        channel_names=(TEXTURE_CHANNEL_NAMES if phenotype == "texture" else CHANNEL_NAMES)[channels],
        condition_names=CONDITION_NAMES[phenotype],
        phenotype=phenotype,
        seed=seed,
        start=start,
    )


def as_camera_units(images: np.ndarray, dtype="uint16") -> np.ndarray:
    """[0, 1] synthetic intensities as a camera would record them (full range of an integer dtype).

    The demo model is trained on, and its sample data and benchmarks use, exactly these units.
    """
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32)):
        raise ValueError(f"dtype must be uint8, uint16 or float32, got dtype={dtype!r}.")
    if dt.kind == "u":
        return np.round(np.clip(images, 0, 1) * np.iinfo(dt).max).astype(dt)
    return np.asarray(images, np.float32)


def write_folders(root, pairs: PairedCells, dtype="uint16") -> dict[str, list[Path]]:
    """Write ``root/<condition>/<phenotype>_<seed>_<index:05d>.tif`` (C, Y, X) files.

    This is the folder-per-condition layout the training and inference code read,
    so a synthetic set can be used exactly like real data.  Files are written to
    a temporary name and renamed, so a crash never leaves a truncated TIFF that a
    later run would pick up.
    """
    import tifffile

    as_camera_units(np.zeros(1), dtype)  # validates dtype before anything is written
    root = Path(root)
    start = getattr(pairs, "start", 0)
    out: dict[str, list[Path]] = {}
    for cond, images in zip(pairs.condition_names, (pairs.control, pairs.treated)):
        folder = root / cond
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, img in enumerate(images):
            data = as_camera_units(img, dtype)
            path = folder / f"{pairs.phenotype}_{pairs.seed}_{start + i:05d}.tif"
            write_atomically(path, lambda temp, data=data: tifffile.imwrite(temp, data, photometric="minisblack",
                                                                            metadata={"axes": "CYX"}))
            paths.append(path)
        out[cond] = paths
    return out
