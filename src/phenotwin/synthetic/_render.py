"""Drawing one synthetic image pair: cell geometry, nucleus, cytoplasm, Golgi, background.

`render_one(seed, index, ...)` returns the clean (noise-free, unblurred) control and treated
base channels (nucleus, golgi, cytoplasm) of image `index`, the cell labels, the ids of the
cells whose phenotype changed, and the random generator the camera noise is drawn from.
`phenotwin.synthetic.make_pairs` composes the channels, blurs, adds noise and builds the
change mask. Everything is a pure function of its arguments (numpy and scipy.ndimage only).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

_CELL_RADIUS = (13.0, 21.0)  # px at full scale


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


def render_one(seed, index, size, phenotype, cells_per_image, changed_fraction, redraw=0):
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
