"""Synthetic paired fluorescence images of the same cells under two conditions.

Image-to-image translation between conditions can only be evaluated against a
ground truth when we know, pixel by pixel, what the treatment changed.  Real
screens never give us that (a cell is imaged under one condition only), so this
module renders the *same* cells twice -- once as control, once as treated -- with
the same camera noise, and returns the exact mask of what the phenotype changed.

The images are meant to look like widefield fluorescence microscopy rather than
clean geometry: irregular cell bodies, off-centre nuclei with chromatin texture
and nucleoli, a textured cytoplasm, a non-flat background, a small PSF blur and
shot + read noise.  Two phenotypes are available:

* ``"obvious"`` -- nocodazole-like Golgi dispersal: the compact perinuclear
  Golgi ribbon of the control cell breaks up into scattered puncta.
* ``"subtle"`` -- the Golgi crescent becomes ~30 % wider in angle and therefore
  ~20 % dimmer at equal total intensity, with slightly fragmented ends; easy to
  miss by eye but systematic, like many real screening hits.

Everything is a pure function of ``(seed, index, size, channels, phenotype,
cells_per_image, changed_fraction)``, so disjoint train / held-out sets are made
with the ``start`` argument and results are bit-identical across runs.
Only numpy and scipy.ndimage are used (tifffile for `write_folders`), so tests,
benchmarks and the napari sample-data hook can call it without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from phenotwin.io import write_atomically

__all__ = ["PHENOTYPES", "CHANNEL_NAMES", "PairedCells", "make_pairs", "write_folders"]

PHENOTYPES = ("obvious", "subtle")
CHANNEL_NAMES = {1: ("cells",), 2: ("nucleus", "golgi"), 3: ("nucleus", "golgi", "cytoplasm")}
CONDITION_NAMES = {"obvious": ("control", "nocodazole"), "subtle": ("control", "treated")}

# Clean-image difference above which a pixel counts as changed.  Well above
# float rounding, well below what a person could see under the camera noise.
MASK_THRESHOLD = 0.02
# Fixed rendering constants (kept module-level so the look is easy to tune).
_PSF_SIGMA = 0.9          # px, small widefield PSF
_CELL_RADIUS = (13.0, 21.0)  # px at full scale
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


# --------------------------------------------------------------------------- #
# small rendering helpers
# --------------------------------------------------------------------------- #
def _smooth_noise(rng, shape, sigma):
    """Zero-mean, roughly unit-variance Gaussian random field of correlation `sigma` px."""
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap", truncate=3.0)
    return field * (2.0 * sigma * math.sqrt(math.pi))


def _fourier(theta, amps, phases):
    """Low-frequency radial perturbation sum_k a_k cos(k theta + p_k), k = 2, 3, ..."""
    out = np.zeros_like(theta)
    for k, (a, p) in enumerate(zip(amps, phases), start=2):
        out += a * np.cos(k * theta + p)
    return out


def _polar_distance(x, y, cx, cy, a, b, rot, amps, phases):
    """Normalised distance to an irregular ellipse (1 on its outline)."""
    dx, dy = x - cx, y - cy
    c, s = math.cos(rot), math.sin(rot)
    xr, yr = c * dx + s * dy, -s * dx + c * dy
    theta = np.arctan2(yr, xr)
    rho = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
    return rho / (1.0 + _fourier(theta, amps, phases))


def _outline_radius(alpha, a, b, rot, amps, phases):
    """Distance in px from the centre to the irregular-ellipse outline at image angle `alpha`."""
    theta = np.asarray(alpha) - rot
    return (1.0 + _fourier(theta, amps, phases)) / np.sqrt((np.cos(theta) / a) ** 2 + (np.sin(theta) / b) ** 2)


def _bumps(shape, origin, xs, ys, sig, amp):
    """Sum of compactly supported Gaussian-like spots on a (crop of the) image.

    Spots have exact finite support (radius 2.5 sigma), so a moved spot changes
    the image only locally, and each spot is splatted into a small window
    instead of being evaluated over the whole grid (this is the hot loop).
    """
    h, w = shape
    out = np.zeros(h * w)
    if len(xs) == 0:
        return out.reshape(h, w)
    xs = np.asarray(xs, float) - origin[1]
    ys = np.asarray(ys, float) - origin[0]
    rad2 = (2.5 * np.asarray(sig, float)) ** 2
    p = int(math.ceil(math.sqrt(rad2.max())))
    off = np.arange(-p, p + 1)
    gx = np.round(xs).astype(int)[:, None] + off  # (K, P)
    gy = np.round(ys).astype(int)[:, None] + off
    r2 = (gy - ys[:, None])[:, :, None] ** 2 + (gx - xs[:, None])[:, None, :] ** 2
    wgt = np.clip(1.0 - r2 / rad2[:, None, None], 0.0, None) ** 3 * np.asarray(amp, float)[:, None, None]
    ok = ((gy >= 0) & (gy < h))[:, :, None] & ((gx >= 0) & (gx < w))[:, None, :] & (wgt != 0)
    flat = gy[:, :, None] * w + gx[:, None, :]
    out += np.bincount(flat[ok], weights=wgt[ok], minlength=h * w)
    return out.reshape(h, w)


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# --------------------------------------------------------------------------- #
# one image
# --------------------------------------------------------------------------- #
def _draw_cells(rng, size, scale, n_cells):
    """Cell geometry and per-cell parameters, independent of phenotype and channels."""
    cells = []
    r_lo, r_hi = _CELL_RADIUS
    shrink = 0.88 if (size <= 64 and n_cells > 1) else 1.0
    for _ in range(n_cells):
        R = rng.uniform(r_lo, r_hi) * scale * shrink
        margin = min(0.85 * R, 0.45 * size) if size <= 64 else 0.5 * R
        # rejection sampling keeps cells from piling up; touching is fine
        for _attempt in range(40):
            cx, cy = rng.uniform(margin, size - margin, 2)
            if all(math.hypot(cx - o["cx"], cy - o["cy"]) > 0.8 * (R + o["R"]) for o in cells):
                break
        aspect = rng.uniform(0.62, 1.0)
        rot = rng.uniform(0, 2 * math.pi)
        body_amps = rng.uniform(0.0, 1.0, 4) * np.array([0.12, 0.08, 0.055, 0.04])
        body_ph = rng.uniform(0, 2 * math.pi, 4)
        # nucleus: irregular ellipse roughly aligned with the cell, pushed off-centre
        # along the long axis so it stays inside even elongated cells
        na = R * rng.uniform(0.40, 0.50)
        nb = min(na * rng.uniform(0.72, 0.95), 0.62 * R * aspect)
        nrot = rot + rng.normal(0, 0.35)
        n_amps = rng.uniform(0.0, 1.0, 3) * np.array([0.05, 0.03, 0.02])
        n_ph = rng.uniform(0, 2 * math.pi, 3)
        beta = rot + math.pi * rng.integers(0, 2) + rng.normal(0, 0.5)
        off = R * rng.uniform(0.12, 0.25)
        ncx, ncy = cx + off * math.cos(beta), cy + off * math.sin(beta)
        # Golgi ribbon: sits on the side with most cytoplasm (towards the cell centre)
        psi = beta + math.pi + rng.normal(0, 0.35)
        width = math.radians(rng.uniform(70, 105))
        k = int(rng.integers(11, 17))
        t = np.sort(np.clip((np.arange(k) + rng.uniform(-0.35, 0.35, k)) / (k - 1), 0, 1))
        g_rad = rng.uniform(0.0, 1.0, k)
        g_sig = rng.uniform(0.85, 1.45, k)
        g_amp = rng.uniform(0.55, 1.0, k) * (0.25 + 0.75 * np.sin(math.pi * t))
        nucleoli = int(rng.integers(1, 4))
        cells.append(
            dict(
                R=R, cx=cx, cy=cy, a=R, b=R * aspect, rot=rot, amps=body_amps, ph=body_ph,
                ncx=ncx, ncy=ncy, na=na, nb=nb, nrot=nrot, namps=n_amps, nph=n_ph,
                psi=psi, width=width, t=t, g_rad=g_rad, g_sig=g_sig, g_amp=g_amp,
                nuc_int=rng.uniform(0.5, 0.8), cyto_int=rng.uniform(0.12, 0.22),
                golgi_int=rng.uniform(0.7, 0.95),
                nucleoli_r=np.sqrt(rng.uniform(0, 0.45, nucleoli)),
                nucleoli_a=rng.uniform(0, 2 * math.pi, nucleoli),
                nucleoli_s=rng.uniform(0.9, 1.6, nucleoli),
                nucleoli_amp=rng.uniform(-0.35, 0.25, nucleoli),
                u_change=rng.uniform(),
            )
        )
    return cells


def _ribbon(c, scale, widen=1.0, sig_factor=1.0, fragment=None):
    """Spot centres of the perinuclear Golgi ribbon (optionally widened / frayed)."""
    t = c["t"]
    ang = c["psi"] + (t - 0.5) * c["width"] * widen
    rn = _outline_radius(ang, c["na"], c["nb"], c["nrot"], c["namps"], c["nph"])
    rad = rn + scale * (0.9 + 2.6 * c["g_rad"])
    sig = c["g_sig"] * scale * sig_factor
    if fragment is not None:
        # fray the ribbon ends: end spots drift outwards and apart
        ends = np.minimum(t, 1 - t) < 0.2
        rad = rad + ends * fragment[0] * scale
        ang = ang + ends * fragment[1] * np.sign(t - 0.5)
    xs = c["ncx"] + rad * np.cos(ang)
    ys = c["ncy"] + rad * np.sin(ang)
    return xs, ys, sig


def _render_one(seed, index, size, phenotype, cells_per_image, changed_fraction, redraw=0):
    """Render one pair; returns clean (2, 3, H, W) base channels, labels, changed ids, noise rng."""
    ss = np.random.SeedSequence([seed, index])
    geo_rng, phen_rng, noise_rng = (np.random.default_rng(s) for s in ss.spawn(3))
    if redraw:
        phen_rng = np.random.default_rng([seed, index, redraw])
    # lengths shrink for small crops, but not below half size (a 16 px image is a close-up)
    scale = min(1.0, max(0.5, size / 64.0))
    lo, hi = cells_per_image
    n_cells = int(geo_rng.integers(lo, hi + 1))
    cells = _draw_cells(geo_rng, size, scale, n_cells)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    shape = (size, size)
    jitter = np.clip(_smooth_noise(geo_rng, shape, 3.0 * scale + 0.5), -3, 3)
    chrom_f = _smooth_noise(geo_rng, shape, 0.8)
    chrom_c = _smooth_noise(geo_rng, shape, 2.2 * scale + 0.3)
    cyto_f = _smooth_noise(geo_rng, shape, 0.9)
    cyto_c = _smooth_noise(geo_rng, shape, 3.0 * scale + 0.5)

    # work in a crop around each cell (the outline never exceeds ~1.5 R)
    crops = []
    for c in cells:
        m = 1.6 * c["R"] + 1
        y0, y1 = max(0, int(c["cy"] - m)), min(size, int(math.ceil(c["cy"] + m)) + 1)
        x0, x1 = max(0, int(c["cx"] - m)), min(size, int(math.ceil(c["cx"] + m)) + 1)
        crops.append((slice(y0, y1), slice(x0, x1)))

    # cell bodies and labels: each pixel belongs to the cell it is "most inside"
    d = np.full((n_cells, size, size), np.inf)
    for k, (c, sl) in enumerate(zip(cells, crops)):
        d[k][sl] = _polar_distance(xx[sl], yy[sl], c["cx"], c["cy"], c["a"], c["b"], c["rot"], c["amps"], c["ph"])
        d[k][sl] += 0.05 * jitter[sl]
    owner = np.argmin(d, axis=0)
    dmin = np.take_along_axis(d, owner[None], 0)[0]
    labels = np.where(dmin < 1.0, owner + 1, 0).astype(np.int32)

    nuc = np.zeros(shape)
    cyto = np.zeros(shape)
    golgi_c = np.zeros(shape)
    golgi_t = np.zeros(shape)
    changed = []
    for k, (c, sl) in enumerate(zip(cells, crops)):
        lab = k + 1
        own = labels[sl] == lab
        if not own.any():
            continue
        x, y, dk = xx[sl], yy[sl], d[k][sl]
        cshape, origin = own.shape, (sl[0].start, sl[1].start)
        member = _smoothstep((1.0 - dk) * c["R"] / (2.0 * scale + 0.5)) * own
        # nucleus: domed, sharp-ish envelope, chromatin texture, a few nucleoli
        dn = _polar_distance(x, y, c["ncx"], c["ncy"], c["na"], c["nb"], c["nrot"], c["namps"], c["nph"])
        dn += 0.03 * jitter[sl]
        nmask = _smoothstep((1.0 - dn) * c["na"] / (0.9 * scale + 0.3)) * own
        nr = c["nucleoli_r"] * 0.7 * c["nb"]
        nl = _bumps(cshape, origin, c["ncx"] + nr * np.cos(c["nucleoli_a"]), c["ncy"] + nr * np.sin(c["nucleoli_a"]),
                    c["nucleoli_s"] * scale + 0.3, c["nucleoli_amp"])
        tex = 1.0 + 0.16 * chrom_f[sl] + 0.12 * chrom_c[sl] + nl
        dome = 0.8 + 0.2 * np.clip(1.0 - dn**2, 0, 1)
        nuc[sl] += c["nuc_int"] * nmask * dome * np.clip(tex, 0.3, None)
        # cytoplasm: dim, textured, brighter around the nucleus (ER), partly excluded from it
        dist_nuc = np.clip(dn - 1.0, 0, None) * c["na"]
        peri = 1.0 + 0.7 * np.exp(-dist_nuc / (5.0 * scale + 0.5))
        ctex = np.clip(1.0 + 0.22 * cyto_c[sl] + 0.18 * cyto_f[sl], 0.2, None)
        cyto[sl] += c["cyto_int"] * member * peri * ctex * (1.0 - 0.45 * nmask)
        # Golgi haze in the cytosol is identical in both conditions
        haze = 0.05 * member * (1.0 - 0.6 * nmask)
        # control Golgi: compact ribbon hugging the nucleus
        xs, ys, sig = _ribbon(c, scale)
        g0 = _bumps(cshape, origin, xs, ys, sig, c["g_amp"]) * member
        peak = g0.max()
        if peak <= 0:
            golgi_c[sl] += haze
            golgi_t[sl] += haze
            continue
        g0 *= c["golgi_int"] / peak
        total = g0.sum()
        # phenotype draws happen for every cell so changed_fraction only toggles them
        if phenotype == "obvious":
            cand = np.flatnonzero((own & (dk < 0.8) & (dn > 1.3) & (g0 < 0.1)).ravel())
            n_p = int(phen_rng.integers(8, 21))
            if cand.size == 0:
                cand = np.flatnonzero(own.ravel())
            pick = phen_rng.choice(cand, size=n_p, replace=cand.size < n_p)
            px = x.ravel()[pick] + phen_rng.uniform(-0.5, 0.5, n_p)
            py = y.ravel()[pick] + phen_rng.uniform(-0.5, 0.5, n_p)
            psig = phen_rng.uniform(0.45, 0.7, n_p) * scale + 0.15
            pamp = phen_rng.uniform(0.5, 1.0, n_p)
            g1 = _bumps(cshape, origin, px, py, psig, pamp) * member
        else:
            widen = phen_rng.uniform(1.25, 1.35)
            frag = (phen_rng.uniform(0.2, 0.6), phen_rng.uniform(0.02, 0.05))
            xs, ys, sig = _ribbon(c, scale, widen=widen, sig_factor=1.06, fragment=frag)
            g1 = _bumps(cshape, origin, xs, ys, sig, c["g_amp"]) * member
        s1 = g1.sum()
        g1 = g1 * (total / s1) if s1 > 0 else g0
        is_changed = c["u_change"] < changed_fraction
        golgi_c[sl] += haze + g0
        golgi_t[sl] += haze + (g1 if is_changed else g0)
        if is_changed:
            changed.append(lab)

    # background: autofluorescence offset, gentle gradient and vignetting, per channel
    bg = np.empty((3, size, size))
    u, v = xx / size - 0.5, yy / size - 0.5
    for ch in range(3):
        b0 = geo_rng.uniform(0.045, 0.07)
        gx, gy = geo_rng.normal(0, 0.25, 2)
        bg[ch] = b0 * (1.0 + gx * u + gy * v - 0.5 * (u * u + v * v))
    base = np.stack([nuc, np.zeros_like(nuc), cyto]) + bg
    clean = np.stack([base, base])
    clean[0, 1] += np.minimum(golgi_c, 1.6)
    clean[1, 1] += np.minimum(golgi_t, 1.6)
    return clean, labels, tuple(changed), noise_rng


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
    ctrl = np.empty((n, channels, size, size), np.float32)
    trt = np.empty((n, channels, size, size), np.float32)
    mask = np.empty((n, size, size), bool)
    labels = np.empty((n, size, size), np.int32)
    changed_all = []
    for i in range(n):
        clean, lab, changed, noise_rng = _render_one(
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
        channel_names=CHANNEL_NAMES[channels],
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
            write_atomically(path, lambda temp: tifffile.imwrite(temp, data, photometric="minisblack",
                                                                 metadata={"axes": "CYX"}))
            paths.append(path)
        out[cond] = paths
    return out
