"""Synthetic plates with known batch effects, and the batch metadata of a data folder.

A feature space that claims to ignore batch effects needs data where the effects are known
exactly. `make_plates` renders the same biology (the same phenotype, conditions and cell
generator as `make_pairs`) on several plates, each with its own microscope and staining
differences, applied in the order light meets them:

    image' = clip(gain * illumination(y, x) * blur_sigma(image) + background, 0, 1)

* ``blur_sigma`` -- an extra Gaussian blur (focus), in pixels;
* ``illumination`` -- a linear ramp ``1 + gradient * u`` with ``u`` in [-0.5, 0.5] along
  ``gradient_angle`` (degrees): uneven widefield illumination;
* ``gain`` -- exposure / stain intensity; ``background`` -- camera offset plus autofluorescence;
* ``cells_min`` / ``cells_max`` -- the plate's cells per image: a small shift of density.

Each plate draws its own cells (different wells of the same cell line): plate ``b`` takes the
indices ``start + b * n`` .. ``start + (b + 1) * n - 1``. Control and treated images of one
plate share its effect, so the condition difference is the same on every plate.

The layout is the usual folder per condition, with the plates' files side by side
(``<condition>/<phenotype>_<seed>_<batch>_<index>.tif``), plus ``batches.csv`` at the data
root: one row per file with ``file`` (relative to the root), ``condition``, ``batch`` and the
effect's parameters. `read_batches` is how training (a label per condition and batch,
`train.data.with_batches`) and phenotwin.embed find the batch of each image. numpy + scipy only.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from phenotwin.errors import PhenotwinError
from phenotwin.io import IMAGE_SUFFIXES, write_atomically

__all__ = ["BATCHES_FILE", "BatchEffect", "draw_effects", "apply_effect", "make_plates", "write_plates",
           "read_batches"]

BATCHES_FILE = "batches.csv"
COLUMNS = ("file", "condition", "batch", "gain", "background", "blur_sigma", "gradient", "gradient_angle",
           "cells_min", "cells_max")
# Ranges of the drawn effects: clearly visible, each alone far below the phenotype's own contrast in
# a mean image, together enough that a plain encoder can tell the plates apart.
GAIN_RANGE = (0.65, 1.35)
BACKGROUND_RANGE = (0.0, 0.10)
BLUR_RANGE = (0.0, 1.2)
GRADIENT_RANGE = (0.0, 0.6)


@dataclass(frozen=True)
class BatchEffect:
    """One plate's acquisition differences (see the module docstring for the formula)."""

    batch: str
    gain: float = 1.0
    background: float = 0.0
    blur_sigma: float = 0.0
    gradient: float = 0.0
    gradient_angle: float = 0.0
    cells_min: int = 1
    cells_max: int = 2

    def illumination(self, size: int) -> np.ndarray:
        """The (size, size) multiplicative illumination field, mean 1."""
        coords = (np.arange(size) + 0.5) / size - 0.5
        angle = np.deg2rad(self.gradient_angle)
        u = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
        return (1.0 + self.gradient * u / max(abs(np.cos(angle)) + abs(np.sin(angle)), 1e-9)).astype(np.float32)


def draw_effects(batches: int, seed: int = 0, cells_per_image: tuple[int, int] = (1, 2)) -> list[BatchEffect]:
    """`batches` plates with effects drawn from a stream fixed by `seed`; plate 0 is never the identity.

    The gains are spread over the whole range (a shuffled even grid, jittered) so that any two
    plates differ visibly; the density shift alternates 0 / +1 cell at the top of the range."""
    if isinstance(batches, bool) or not isinstance(batches, (int, np.integer)) or batches < 2:
        raise PhenotwinError(f"--batches must be an integer >= 2, got {batches!r}: batch effects need at least two "
                             "plates to differ between (leave --batches out for one plate without effects).")
    rng = np.random.default_rng([seed, 16_000])
    grid = (np.arange(batches) + rng.uniform(0.2, 0.8, batches)) / batches
    gains = GAIN_RANGE[0] + (GAIN_RANGE[1] - GAIN_RANGE[0]) * rng.permutation(grid)
    lo, hi = cells_per_image
    effects = []
    for b in range(batches):
        effects.append(BatchEffect(
            batch=f"plate{b:02d}", gain=round(float(gains[b]), 4),
            background=round(float(rng.uniform(*BACKGROUND_RANGE)), 4),
            blur_sigma=round(float(rng.uniform(*BLUR_RANGE)), 3),
            gradient=round(float(rng.uniform(*GRADIENT_RANGE)), 3),
            gradient_angle=round(float(rng.uniform(0, 360)), 1),
            cells_min=int(lo), cells_max=int(hi + b % 2)))
    return effects


def apply_effect(images: np.ndarray, effect: BatchEffect) -> np.ndarray:
    """(N, C, H, W) images in [0, 1] as the plate of `effect` would record them (float32, [0, 1])."""
    images = np.asarray(images, np.float32)
    out = images
    if effect.blur_sigma > 0:
        out = ndi.gaussian_filter(images, (0, 0, effect.blur_sigma, effect.blur_sigma), mode="nearest", truncate=3.0)
    out = effect.gain * effect.illumination(images.shape[-1])[None, None] * out + effect.background
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Plates:
    """Each plate's `PairedCells` as recorded (effects applied), with its `BatchEffect`."""

    pairs: tuple
    effects: tuple


def make_plates(n: int, batches: int, size: int = 64, channels: int = 2, phenotype: str = "obvious",
                seed: int = 0, start: int = 0) -> Plates:
    """`n` control/treated pairs on each of `batches` plates, with the plates' effects applied."""
    from dataclasses import replace

    from phenotwin.synthetic import _default_cells, make_pairs

    if phenotype == "texture":
        raise PhenotwinError("--batches draws cells (phenotypes obvious and subtle); the texture phenotype crops one "
                             "real image and has no cell density to shift. Choose --phenotype obvious or subtle.")
    effects = draw_effects(batches, seed, _default_cells(size))
    plates = []
    for b, effect in enumerate(effects):
        clean = make_pairs(n, size=size, channels=channels, phenotype=phenotype, seed=seed, start=start + b * n,
                           cells_per_image=(effect.cells_min, effect.cells_max))
        plates.append(replace(clean, control=apply_effect(clean.control, effect),
                              treated=apply_effect(clean.treated, effect)))
    return Plates(pairs=tuple(plates), effects=tuple(effects))


def write_plates(root, plates: Plates, dtype="uint16") -> dict[str, list[Path]]:
    """Write every plate into `root/<condition>/` and the metadata into `root/batches.csv` (atomically).

    Refuses a root holding a batches.csv phenotwin would contradict: files of another set."""
    from phenotwin.synthetic import write_folders

    root = Path(root)
    rows, written = [], {}
    for pairs, effect in zip(plates.pairs, plates.effects):
        tagged = _with_batch_names(pairs, effect.batch)
        for condition, paths in write_folders(root, tagged, dtype).items():
            written.setdefault(condition, []).extend(paths)
            params = {k: v for k, v in asdict(effect).items() if k != "batch"}
            rows += [{"file": p.relative_to(root).as_posix(), "condition": condition, "batch": effect.batch, **params}
                     for p in paths]
    previous = _read_rows(root / BATCHES_FILE) if (root / BATCHES_FILE).is_file() else []
    ours = {row["file"] for row in rows}
    rows = [row for row in previous if row["file"] not in ours] + rows
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda row: row["file"]))
    write_atomically(root / BATCHES_FILE, lambda temp: Path(temp).write_text(text.getvalue()))
    return written


def _with_batch_names(pairs, batch: str):
    """The plate's pairs under a phenotype label that puts the batch in their file names."""
    from dataclasses import replace

    return replace(pairs, phenotype=f"{pairs.phenotype}_{batch}")


def _read_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise PhenotwinError(f"cannot read the batch metadata {path} ({err}). Fix or remove the file.") from err


def read_batches(root, min_batches: int = 2) -> dict[str, str]:
    """{image path relative to `root` (posix): its batch} from `root/batches.csv`, checked against the images.

    Metadata naming images that are not there, images without metadata, a condition that does not
    match the image's folder, or fewer than `min_batches` batches are refused with what to fix."""
    root = Path(root)
    path = root / BATCHES_FILE
    if not path.is_file():
        raise PhenotwinError(f"{root} has no {BATCHES_FILE}: give one row per image with the columns file, condition, "
                             "batch (file relative to the data folder, e.g. control/img_001.tif), or write plates "
                             "with `phenotwin synthetic --batches N`.")
    rows = _read_rows(path)
    missing_columns = [c for c in ("file", "condition", "batch") if rows and c not in rows[0]]
    if not rows or missing_columns:
        raise PhenotwinError(f"{path} needs the columns file, condition and batch and one row per image"
                             + (f"; it lacks {', '.join(missing_columns)}." if missing_columns else "; it has no rows."))
    images = {p.relative_to(root).as_posix() for folder in root.iterdir() if folder.is_dir()
              and not folder.name.startswith(".") for p in folder.iterdir()
              if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")}
    batches = {row["file"].replace("\\", "/"): row["batch"].strip() for row in rows}
    unknown = sorted(set(batches) - images)
    if unknown:
        raise PhenotwinError(f"{path} names {len(unknown)} image(s) that are not in {root}, e.g. {unknown[0]!r}. "
                             "Give each file relative to the data folder (condition/name.tif), or remove those rows.")
    unlisted = sorted(images - set(batches))
    if unlisted:
        raise PhenotwinError(f"{len(unlisted)} image(s) in {root} have no row in {path}, e.g. {unlisted[0]!r}. Add "
                             "their batch, or move them out of the data folder.")
    wrong = [row["file"] for row in rows if Path(row["file"]).parts[0] != row["condition"]]
    if wrong:
        raise PhenotwinError(f"{path} gives {wrong[0]!r} a condition that is not its folder's; the folder is the "
                             "condition. Correct the condition column.")
    empty = [f for f, b in batches.items() if not b]
    if empty:
        raise PhenotwinError(f"{path} gives {empty[0]!r} no batch. Fill the batch column of every row.")
    found = sorted(set(batches.values()))
    if len(found) < min_batches:
        raise PhenotwinError(f"{path} has {len(found)} batch ({', '.join(found)}): batch-robust features need images "
                             f"of each condition from at least {min_batches} batches (plates, days, microscopes).")
    return batches
