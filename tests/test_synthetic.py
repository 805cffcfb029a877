"""Tests for phenotwin.synthetic: the ground truth every other test and benchmark trusts."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from phenotwin.synthetic import CHANNEL_NAMES, PHENOTYPES, PairedCells, make_pairs, write_folders

FIELDS = ("control", "treated", "change_mask", "cell_labels")


def _changed_region(pairs: PairedCells, i: int) -> np.ndarray:
    return np.isin(pairs.cell_labels[i], pairs.changed_cells[i])


def _assert_same(a: PairedCells, b: PairedCells, sl=slice(None)):
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f)[sl], getattr(b, f), err_msg=f)
    assert a.changed_cells[sl] == b.changed_cells


@pytest.fixture(scope="module")
def batches():
    """One shared batch per phenotype (64 px, 2 channels, half the cells changed)."""
    # the drawn phenotypes, whose cells change or not (changed_fraction); "texture" has its own test below
    return {ph: make_pairs(40, 64, 2, phenotype=ph, seed=11, changed_fraction=0.5) for ph in ("obvious", "subtle")}


def test_same_arguments_are_bit_identical():
    _assert_same(make_pairs(4, 48, 3, seed=5), make_pairs(4, 48, 3, seed=5))


def test_start_offset_gives_the_same_images():
    full = make_pairs(8, 64, 2, phenotype="subtle", seed=3, changed_fraction=0.5)
    tail = make_pairs(3, 64, 2, phenotype="subtle", seed=3, start=5, changed_fraction=0.5)
    _assert_same(full, tail, slice(5, 8))
    assert tail.start == 5 and len(tail) == 3


def test_redraw_changes_only_where_the_phenotype_falls():
    drawn, redrawn = make_pairs(6, 64, 2, seed=2), make_pairs(6, 64, 2, seed=2, redraw=1)
    np.testing.assert_array_equal(drawn.control, redrawn.control)  # the same cells and camera noise
    np.testing.assert_array_equal(drawn.treated[:, 0], redrawn.treated[:, 0])  # nucleus untouched
    for i in range(6):
        assert not np.array_equal(drawn.treated[i, 1], redrawn.treated[i, 1])  # the puncta moved
        assert abs(drawn.treated[i, 1].sum() - redrawn.treated[i, 1].sum()) < 0.02 * drawn.treated[i, 1].sum()


def test_different_seeds_and_indices_differ():
    a, b = make_pairs(3, 64, 2, seed=0), make_pairs(3, 64, 2, seed=1)
    for i in range(3):
        assert not np.array_equal(a.control[i], b.control[i])
        assert not np.array_equal(a.cell_labels[i], b.cell_labels[i])
    assert not np.array_equal(a.control[0], a.control[1])


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("size", [16, 64, 256])
def test_shapes_dtypes_and_ranges(size, channels):
    n = 1 if size == 256 else 4
    p = make_pairs(n, size, channels, seed=2)
    assert p.control.shape == p.treated.shape == (n, channels, size, size)
    assert p.control.dtype == p.treated.dtype == np.float32
    assert p.change_mask.shape == p.cell_labels.shape == (n, size, size)
    assert p.change_mask.dtype == bool and p.cell_labels.dtype == np.int32
    assert p.channel_names == CHANNEL_NAMES[channels]
    assert p.condition_names == ("control", "nocodazole") and p.phenotype == "obvious" and p.seed == 2
    assert len(p.changed_cells) == n
    for img in (p.control, p.treated):
        assert img.min() >= 0.0 and img.max() <= 1.0 and np.isfinite(img).all()
    for i in range(n):
        fg, bg = p.cell_labels[i] > 0, p.cell_labels[i] == 0
        n_cells = len(np.unique(p.cell_labels[i][fg]))
        if size <= 64:
            assert 1 <= n_cells <= 2
        else:
            assert 15 <= n_cells <= 40, n_cells
        # changed_fraction=1: every visible cell changes
        assert set(p.changed_cells[i]) == set(np.unique(p.cell_labels[i][fg]).tolist())
        assert bg.any() and fg.any()
        bg_med = np.median(p.control[i][:, bg])
        assert 0.02 < bg_med < 0.12, bg_med  # dim but non-zero background
        # cells are clearly brighter than the background (brightest channel per pixel)
        top = p.control[i].max(axis=0)[fg]
        assert np.percentile(top, 75) > bg_med + 0.1
        assert np.percentile(top, 90) > bg_med + 0.2


def test_images_identical_away_from_changed_cells(batches):
    for p in batches.values():
        for i in range(len(p)):
            diff = (p.treated[i] != p.control[i]).any(axis=0)
            # a change never reaches further than the 3 px PSF support beyond a changed cell
            near = ndi.binary_dilation(_changed_region(p, i), np.ones((3, 3), bool), iterations=3)
            assert not (diff & ~near).any()
            if not p.changed_cells[i]:
                np.testing.assert_array_equal(p.control[i], p.treated[i])
                assert not p.change_mask[i].any()


def test_change_outside_mask_is_below_threshold(batches):
    for p in batches.values():
        d = np.abs(p.treated - p.control).max(axis=1)
        # 0.02 clean threshold + a little shot noise scaling difference
        assert d[~p.change_mask].max() < 0.03
        # and far from the mask (beyond the spot + PSF support) pixels are bit-identical
        far = ~ndi.binary_dilation(p.change_mask, np.ones((1, 3, 3), bool), iterations=8)
        assert not (d[far] > 0).any()


def test_change_mask_lies_in_changed_cells(batches):
    for p in batches.values():
        for i in range(len(p)):
            mask, labels = p.change_mask[i], p.cell_labels[i]
            region = _changed_region(p, i)
            # only PSF spill (1 px) leaves the outline of a changed cell
            assert not (mask & ~ndi.binary_dilation(region, np.ones((3, 3), bool))).any()
            for lab in np.unique(labels[labels > 0]):
                inside = (mask & (labels == lab)).sum()
                if lab in p.changed_cells[i]:
                    assert inside >= 10, (i, lab, inside)
                else:  # at most PSF spill across a contact with a changed neighbour
                    core = ndi.binary_erosion(labels == lab, np.ones((3, 3), bool))
                    assert not (mask & core).any()


def test_mask_covers_the_golgi_change_only(batches):
    p = batches["obvious"]
    changed = [i for i in range(len(p)) if p.changed_cells[i]]
    frac = p.change_mask[changed].sum() / (p.cell_labels[changed] > 0).sum()
    assert 0.05 < frac < 0.6  # Golgi regions, not whole cells


def test_obvious_change_is_much_larger_than_subtle(batches):
    def mean_change(p):
        d = np.abs(p.treated - p.control).max(axis=1)
        return d[p.change_mask].mean()

    obvious, subtle = mean_change(batches["obvious"]), mean_change(batches["subtle"])
    assert obvious > 2.0 * subtle, (obvious, subtle)
    assert subtle > 0.03  # still a real, systematic change


def test_golgi_intensity_roughly_conserved(batches):
    for p in batches.values():
        ratio = p.treated[:, 1].sum() / p.control[:, 1].sum()
        assert 0.95 < ratio < 1.05, ratio


def test_subtle_golgi_is_dimmer_but_not_obvious():
    p = make_pairs(20, 64, 2, phenotype="subtle", seed=4)
    top = lambda a: np.sort(a.reshape(len(a), -1), axis=1)[:, -10:].mean()  # noqa: E731
    ratio = top(p.treated[:, 1]) / top(p.control[:, 1])
    assert 0.7 < ratio < 0.95, ratio


def test_changed_fraction_zero_and_half():
    none = make_pairs(12, 64, 2, seed=9, changed_fraction=0.0)
    np.testing.assert_array_equal(none.control, none.treated)
    assert not none.change_mask.any() and all(c == () for c in none.changed_cells)

    half = make_pairs(40, 64, 2, seed=9, changed_fraction=0.5)
    full = make_pairs(40, 64, 2, seed=9, changed_fraction=1.0)
    n_half, n_all = sum(map(len, half.changed_cells)), sum(map(len, full.changed_cells))
    assert 0.2 * n_all < n_half < 0.8 * n_all
    # same cells and same control images; the fraction only toggles which ones change
    np.testing.assert_array_equal(half.control, full.control)
    np.testing.assert_array_equal(half.cell_labels, full.cell_labels)
    for h, f in zip(half.changed_cells, full.changed_cells):
        assert set(h) <= set(f)


def test_phenotypes_share_cells_and_controls():
    o = make_pairs(3, 64, 2, phenotype="obvious", seed=6)
    s = make_pairs(3, 64, 2, phenotype="subtle", seed=6)
    np.testing.assert_array_equal(o.control, s.control)
    np.testing.assert_array_equal(o.cell_labels, s.cell_labels)
    assert s.condition_names == ("control", "treated")
    assert not np.array_equal(o.treated, s.treated)


def test_labels_do_not_depend_on_channels():
    a, b = make_pairs(3, 64, 1, seed=8), make_pairs(3, 64, 3, seed=8)
    np.testing.assert_array_equal(a.cell_labels, b.cell_labels)
    np.testing.assert_array_equal(a.change_mask.any(axis=(1, 2)), b.change_mask.any(axis=(1, 2)))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"n": 0}, "n"),
        ({"size": 8}, "size"),
        ({"channels": 4}, "channels"),
        ({"channels": 0}, "channels"),
        ({"phenotype": "mild"}, "phenotype"),
        ({"changed_fraction": 1.5}, "changed_fraction"),
        ({"changed_fraction": -0.1}, "changed_fraction"),
        ({"cells_per_image": (3, 1)}, "cells_per_image"),
        ({"redraw": -1}, "redraw"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, word):
    args = {"n": 1, **kwargs}
    with pytest.raises(ValueError, match=word) as err:
        make_pairs(**args)
    if word == "phenotype":
        assert all(ph in str(err.value) for ph in PHENOTYPES)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize("channels", [1, 3])
def test_write_folders_round_trip(tmp_path, dtype, channels):
    p = make_pairs(2, 32, channels, phenotype="subtle", seed=4, start=7)
    out = write_folders(tmp_path, p, dtype=dtype)
    assert list(out) == ["control", "treated"]
    for cond, images in zip(p.condition_names, (p.control, p.treated)):
        paths = out[cond]
        assert [q.name for q in paths] == ["subtle_4_00007.tif", "subtle_4_00008.tif"]
        assert sorted(x.name for x in (tmp_path / cond).iterdir()) == [q.name for q in paths]  # no temp files
        for q, img in zip(paths, images):
            data = tifffile.imread(q)
            assert data.shape == (channels, 32, 32) and data.dtype == np.dtype(dtype)
            scale = np.iinfo(data.dtype).max if data.dtype.kind == "u" else 1.0
            np.testing.assert_allclose(data / scale, img, atol=0.5 / scale + 1e-7)
            with tifffile.TiffFile(q) as tf:
                assert tf.series[0].axes == "CYX"
    # overwriting is fine (atomic replace), masks are not written
    write_folders(tmp_path, p, dtype=dtype)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["control", "treated"]


def test_the_texture_phenotype_changes_real_microscopy_texture_only_inside_its_mask():
    from phenotwin.synthetic import make_pairs

    pairs = make_pairs(6, size=64, channels=2, phenotype="texture", seed=0)
    again = make_pairs(3, size=64, channels=2, phenotype="texture", seed=0, start=3)
    np.testing.assert_array_equal(pairs.control[3:], again.control)  # a pure function of (seed, index)
    assert pairs.condition_names == ("control", "textured") and pairs.channel_names == ("texture", "second stain")
    difference = np.abs(pairs.treated - pairs.control)
    for i in range(6):
        inside, outside = difference[i, 0][pairs.change_mask[i]], difference[i, 0][~pairs.change_mask[i]]
        assert 0.03 < pairs.change_mask[i].mean() < 0.3 and inside.mean() > 0.03
        assert outside.max() <= 0.02 + 1e-6  # nothing changes outside the mask but below the threshold
    assert not difference[:, 1].any()  # the second stain is never touched
    with pytest.raises(ValueError, match="changed_fraction and redraw"):
        make_pairs(2, phenotype="texture", changed_fraction=0.5)
