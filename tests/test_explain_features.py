"""Per-cell features on drawn cells whose answers are known (explain/features.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from phenotwin.errors import PhenotwinError
from phenotwin.explain.features import cell_features, feature_list, segment_cells

SIZE = 96
NAMES = ("nucleus", "golgi")
RANGES = np.array([[0.0, 1.0], [0.0, 1.0]])


def disc(radius: float, centre=(SIZE / 2, SIZE / 2), a: float | None = None, b: float | None = None) -> np.ndarray:
    yy, xx = np.indices((SIZE, SIZE))
    a, b = a or radius, b or radius
    return ((yy - centre[0]) / b) ** 2 + ((xx - centre[1]) / a) ** 2 <= 1


def spots(centres, sigma=1.2, amplitude=0.8) -> np.ndarray:
    yy, xx = np.indices((SIZE, SIZE))
    out = np.zeros((SIZE, SIZE))
    for y, x in centres:
        out += amplitude * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))
    return out


def cell_image(golgi: np.ndarray, nucleus_radius: float = 6) -> np.ndarray:
    nucleus = 0.7 * disc(nucleus_radius)
    return np.stack([nucleus + 0.02, golgi + 0.02])


def measure(image, labels, nuclei=None) -> dict:
    rows = cell_features(image, labels, NAMES, RANGES, nucleus_channel=0, nuclei=nuclei)
    assert len(rows) == 1
    return rows[0]


def test_every_feature_has_words_and_a_unit_and_is_measured():
    features = feature_list(NAMES)
    row = measure(cell_image(spots([(48, 62)])), disc(25).astype(np.int32))
    assert len({f.key for f in features}) == len(features) == 5 + 11 * 2
    assert all(f.words and f.unit for f in features)
    assert all(math.isfinite(row[f.key]) for f in features)
    assert "golgi fragments per cell" in [f.words for f in features]


def test_a_disc_has_its_area_perimeter_and_roundness():
    labels = disc(20).astype(np.int32)
    row = measure(cell_image(np.zeros((SIZE, SIZE))), labels)
    assert row["cell_area"] == labels.sum()
    assert row["cell_area"] == pytest.approx(math.pi * 20**2, rel=0.02)
    assert row["cell_perimeter"] == pytest.approx(2 * math.pi * 20, rel=0.06)  # a digital outline is a bit longer
    assert row["cell_eccentricity"] < 0.1
    assert row["cell_solidity"] > 0.95
    assert row["nucleus_area"] == pytest.approx(math.pi * 6**2, rel=0.1)


def test_an_ellipse_has_its_eccentricity():
    row = measure(cell_image(np.zeros((SIZE, SIZE))), disc(0, a=30, b=15).astype(np.int32))
    assert row["cell_eccentricity"] == pytest.approx(math.sqrt(1 - 0.25), abs=0.02)


def test_intensity_mean_spread_and_skew():
    labels = disc(20).astype(np.int32)
    golgi = np.where(np.indices((SIZE, SIZE))[1] < SIZE / 2, 0.2, 0.6)  # half the cell dim, half bright
    image = np.stack([0.7 * disc(6) + 0.02, golgi])
    row = measure(image, labels)
    halves = golgi[labels > 0]
    assert row["golgi_mean"] == pytest.approx(halves.mean())
    assert row["golgi_spread"] == pytest.approx(halves.std())
    assert abs(row["golgi_skew"]) < 0.1
    bright_spot = np.stack([image[0], 0.2 + 0.8 * disc(3, centre=(48, 60))])
    assert measure(bright_spot, labels)["golgi_skew"] > 2  # a few bright pixels: a long right tail


@pytest.mark.parametrize("count", [3, 9])
def test_fragment_count_is_the_number_of_spots(count):
    angles = np.linspace(0, 2 * np.pi, count, endpoint=False)
    centres = [(48 + 16 * math.sin(a), 48 + 16 * math.cos(a)) for a in angles]
    row = measure(cell_image(spots(centres)), disc(28).astype(np.int32))
    assert row["golgi_fragments"] == count


def test_a_ring_further_from_the_nucleus_is_further_away():
    yy, xx = np.indices((SIZE, SIZE))
    radius = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
    labels = disc(30).astype(np.int32)
    near, far = (np.exp(-((radius - r) ** 2) / 2.0) * 0.8 for r in (10, 24))
    row_near, row_far = measure(cell_image(near), labels), measure(cell_image(far), labels)
    # measured from the nucleus' edge (radius 6): rings at 10 and 24 px lie ~4 and ~18 px away
    assert row_near["golgi_distance"] == pytest.approx(4, abs=1.0)
    assert row_far["golgi_distance"] == pytest.approx(18, abs=1.0)
    assert row_near["golgi_radial_0"] > 0.8 and row_far["golgi_radial_2"] > 0.8
    assert sum(row_far[f"golgi_radial_{i}"] for i in range(3)) == pytest.approx(1.0)


def test_texture_and_granularity():
    labels = disc(28).astype(np.int32)
    flat = measure(cell_image(np.full((SIZE, SIZE), 0.5)), labels)
    yy, xx = np.indices((SIZE, SIZE))
    checker = measure(cell_image(0.1 + 0.8 * ((yy + xx) % 2)), labels)
    assert flat["golgi_contrast"] == 0 and flat["golgi_homogeneity"] == 1
    # neighbours across and along differ by 13 levels (contrast 169), diagonal ones not (0): the mean of 4 angles
    assert checker["golgi_contrast"] == pytest.approx(84.5, rel=0.05) and checker["golgi_homogeneity"] < 0.6
    grid = [(y, x) for y in range(30, 70, 8) for x in range(30, 70, 8)]
    fine = measure(cell_image(spots(grid, sigma=0.8)), labels)
    broad = measure(cell_image(spots([(48, 48)], sigma=8)), labels)
    assert fine["golgi_granularity"] > 0.5 > broad["golgi_granularity"]


def test_without_a_nucleus_distances_are_from_the_centre():
    yy, xx = np.indices((SIZE, SIZE))
    ring = np.exp(-((np.hypot(yy - 48, xx - 48) - 12) ** 2) / 2.0)
    rows = cell_features(np.stack([ring]), disc(30).astype(np.int32), ("golgi",), RANGES[:1], nucleus_channel=None)
    assert rows[0]["nucleus_area"] == 0
    assert rows[0]["golgi_distance"] == pytest.approx(12, abs=1.0)


def test_segmentation_finds_the_synthetic_cells():
    from phenotwin import synthetic

    pairs = synthetic.make_pairs(6, phenotype="obvious", seed=3)
    ious, counted = [], 0
    for image, truth in zip(pairs.control, pairs.cell_labels):
        found = segment_cells(image, nucleus_channel=0)
        ious.append(((found > 0) & (truth > 0)).sum() / ((found > 0) | (truth > 0)).sum())
        counted += found.max() == truth.max()  # one label per cell: the nuclei split touching cells
    assert np.mean(ious) > 0.75 and counted >= 5


def test_bad_labels_are_refused_with_the_fix():
    image = cell_image(np.zeros((SIZE, SIZE)))
    with pytest.raises(PhenotwinError, match="same height and width"):
        cell_features(image, np.ones((10, 10), np.int32), NAMES, RANGES)
    with pytest.raises(PhenotwinError, match="integer cell labels"):
        cell_features(image, disc(10).astype(float), NAMES, RANGES)
    with pytest.raises(PhenotwinError, match="one name per channel"):
        cell_features(image, disc(10).astype(np.int32), ("golgi",), RANGES)
