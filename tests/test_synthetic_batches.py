"""Synthetic plates with batch effects: the recorded parameters are the ones applied, measured back
from the written files, and the metadata reader refuses what does not match the images."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from phenotwin.cli import main
from phenotwin.errors import PhenotwinError
from phenotwin.synthetic import make_pairs
from phenotwin.synthetic.batches import BATCHES_FILE, draw_effects, make_plates, read_batches

N, PLATES, SIZE = 3, 3, 48


@pytest.fixture(scope="module")
def plates_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plates")
    assert main(["synthetic", "--out", str(root), "-n", str(N), "--batches", str(PLATES), "--size", str(SIZE),
                 "--seed", "3"]) == 0
    return root


def _rows(root):
    with open(root / BATCHES_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def _plate(rows, batch):
    mine = [r for r in rows if r["batch"] == batch]
    return mine, {k: float(v) for k, v in mine[0].items() if k not in ("file", "condition", "batch")}


def _fit_plane(recorded, blurred):
    """Least squares of recorded = bg + gain * (1 + gx * X + gy * Y) * blurred over unclipped pixels."""
    coords = (np.arange(SIZE) + 0.5) / SIZE - 0.5
    x, y = np.broadcast_to(coords[None, :], recorded.shape), np.broadcast_to(coords[:, None], recorded.shape)
    keep = (recorded > 1e-4) & (recorded < 1 - 1e-4)
    design = np.stack([np.ones(keep.sum()), blurred[keep], (x * blurred)[keep], (y * blurred)[keep]], axis=1)
    coef, *_ = np.linalg.lstsq(design, recorded[keep], rcond=None)
    residual = recorded[keep] - design @ coef
    return coef, float(np.sqrt(np.mean(residual ** 2)))


def test_every_file_has_a_row_and_the_plates_differ(plates_dir):
    rows = _rows(plates_dir)
    files = sorted(p.relative_to(plates_dir).as_posix() for p in plates_dir.glob("*/*.tif"))
    assert sorted(r["file"] for r in rows) == files and len(files) == 2 * N * PLATES
    batches = read_batches(plates_dir)
    assert sorted(set(batches.values())) == ["plate00", "plate01", "plate02"]
    gains = sorted(_plate(rows, b)[1]["gain"] for b in ("plate00", "plate01", "plate02"))
    assert gains[-1] - gains[0] > 0.2  # spread over the range, not three near-equal plates
    for batch in ("plate00", "plate01", "plate02"):  # both conditions on every plate
        assert {r["condition"] for r in rows if r["batch"] == batch} == {"control", "nocodazole"}


@pytest.mark.parametrize("plate", [0, 1, 2])
def test_gain_background_gradient_and_blur_measured_back(plates_dir, plate):
    """The effect is measured from the files against the clean cells (not recomputed with apply_effect)."""
    rows = _rows(plates_dir)
    batch = f"plate{plate:02d}"
    mine, effect = _plate(rows, batch)
    clean = make_pairs(N, size=SIZE, channels=2, seed=3, start=plate * N,
                       cells_per_image=(int(effect["cells_min"]), int(effect["cells_max"])))
    recorded, blurred = [], []
    for images, condition in ((clean.control, "control"), (clean.treated, "nocodazole")):
        for i in range(N):
            name = f"{condition}/obvious_{batch}_3_{plate * N + i:05d}.tif"
            assert any(r["file"] == name for r in mine)
            recorded.append(tifffile.imread(plates_dir / name).astype(np.float64) / 65535)
            blurred.append(ndi.gaussian_filter(images[i].astype(np.float64), (0, effect["blur_sigma"],
                                               effect["blur_sigma"]), mode="nearest", truncate=3.0))
    recorded, blurred = np.stack(recorded), np.stack(blurred)
    (background, gain, gx, gy), rms = _fit_plane(recorded, blurred)
    assert gain == pytest.approx(effect["gain"], abs=2e-3)
    assert background == pytest.approx(effect["background"], abs=1e-3)
    strength = np.hypot(gx, gy) / gain
    angle = np.deg2rad(effect["gradient_angle"])
    assert strength * (abs(np.cos(angle)) + abs(np.sin(angle))) == pytest.approx(effect["gradient"], abs=5e-3)
    if effect["gradient"] > 0.05:
        assert np.rad2deg(np.arctan2(gy, gx)) % 360 == pytest.approx(effect["gradient_angle"] % 360, abs=2.0)
    assert rms < 1e-4  # rounding to 16 bits only
    # the recorded blur is the one applied: a blur 0.4 px off leaves a residual far above the rounding
    wrong = ndi.gaussian_filter(np.stack([*clean.control, *clean.treated]).astype(np.float64),
                                (0, 0, effect["blur_sigma"] + 0.4, effect["blur_sigma"] + 0.4), mode="nearest",
                                truncate=3.0)
    assert _fit_plane(recorded, wrong)[1] > 20 * rms


def test_same_biology_on_every_plate_and_density_shift():
    plates = make_plates(6, 2, size=SIZE, seed=1)
    effects = plates.effects
    assert (effects[0].cells_min, effects[0].cells_max) == (1, 2) and (effects[1].cells_max) == 3
    for pairs, effect in zip(plates.pairs, effects):
        assert pairs.condition_names == ("control", "nocodazole") and pairs.phenotype == "obvious"
        counts = [len(np.unique(lab)) - 1 for lab in pairs.cell_labels]
        assert effect.cells_min <= min(counts) and max(counts) <= effect.cells_max
        # every cell of every plate carries the phenotype, as without batches
        assert all(len(changed) == n for changed, n in zip(pairs.changed_cells, counts))
        assert pairs.change_mask.mean() > 0.005
    # within a plate the conditions share the effect: outside the change mask they stay within its threshold
    pairs = plates.pairs[0]
    outside = ~np.broadcast_to(pairs.change_mask[:, None], pairs.control.shape)
    assert np.abs(pairs.control - pairs.treated)[outside].max() < 0.03


def test_effects_are_deterministic_and_one_plate_is_refused(tmp_path, capsys):
    assert draw_effects(4, seed=2) == draw_effects(4, seed=2) != draw_effects(4, seed=5)
    assert main(["synthetic", "--out", str(tmp_path), "-n", "2", "--batches", "1"]) == 2
    assert "--batches must be an integer >= 2" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    with pytest.raises(PhenotwinError, match="texture phenotype"):
        make_plates(2, 2, phenotype="texture")


def test_read_batches_refuses_bad_metadata(tmp_path):
    for condition in ("control", "treated"):
        (tmp_path / condition).mkdir()
        for i in range(2):
            tifffile.imwrite(tmp_path / condition / f"img{i}.tif", np.zeros((8, 8), np.uint16))
    with pytest.raises(PhenotwinError, match="has no batches.csv"):
        read_batches(tmp_path)

    def write(rows):
        (tmp_path / BATCHES_FILE).write_text("file,condition,batch\n" + "".join(",".join(r) + "\n" for r in rows))

    good = [(f"{c}/img{i}.tif", c, f"b{i}") for c in ("control", "treated") for i in range(2)]
    write(good)
    assert read_batches(tmp_path) == {f: b for f, _, b in good}
    write(good + [("control/gone.tif", "control", "b0")])
    with pytest.raises(PhenotwinError, match="names 1 image.*not in.*gone.tif"):
        read_batches(tmp_path)
    write(good[1:])
    with pytest.raises(PhenotwinError, match="1 image.*have no row.*control/img0.tif"):
        read_batches(tmp_path)
    write([(f, c, "b0") for f, c, _ in good])
    with pytest.raises(PhenotwinError, match="has 1 batch \\(b0\\).*at least 2 batches"):
        read_batches(tmp_path)
    write([(f, "treated" if c == "control" else c, b) for f, c, b in good])
    with pytest.raises(PhenotwinError, match="not its folder's"):
        read_batches(tmp_path)
