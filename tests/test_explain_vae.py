"""The image models of the condition (explain/crops.py, vae.py, models.py): the β-VAE's factors, its
traversal figure, the sparse model on its factors and the CNN black box, on planted discs of two sizes."""

from __future__ import annotations

import numpy as np
import pytest

from phenotwin.explain.crops import CROP_SIZE, cell_crops, crop_window
from phenotwin.explain.models import CNN, ConditionModel, cnn_black_box, latent_model, relate, split
from phenotwin.explain.vae import TRAVERSAL, train_vae_steps, vae_figure
from phenotwin.progress import Progress, drive

N = 100  # cells, half of each condition
RADII = (6.0, 9.0)  # px: the planted factor, the cell's size; everything else is noise shared by both


def discs(n=N, seed=0):
    """(n, 2, 32, 32) crops: a small nucleus and a cell disc whose radius tells the condition apart;
    position and brightness vary in both conditions alike."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices((CROP_SIZE, CROP_SIZE))
    y = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    crops = np.zeros((n, 2, CROP_SIZE, CROP_SIZE), np.float32)
    for i in range(n):
        cy, cx = 16 + rng.normal(0, 1.5, 2)
        distance = np.hypot(yy - cy, xx - cx)
        crops[i, 0] = 0.8 * (distance < 4)
        crops[i, 1] = rng.uniform(0.3, 0.6) * (distance < RADII[y[i]] + rng.normal(0, 0.7))
    return crops, y


@pytest.fixture(scope="module")
def trained():
    crops, y = discs()
    train, test = split(y, seed=0)
    events = []
    summary = drive(train_vae_steps(crops, train, ["nucleus", "cell"], steps=150, seed=0), events.append)
    return crops, y, train, test, summary, events


def test_the_vae_reports_progress_and_its_traversals_change_the_cell(trained, tmp_path):
    _, _, _, _, summary, events = trained
    assert events[0] == Progress("train β-VAE", 0, 150) and events[-1] == Progress("train β-VAE", 150, 150)
    assert len(events) >= 150 // 25  # the napari dock can cancel between stretches
    assert summary.latents.shape == (N, 8) and summary.traversals.shape == (8, len(TRAVERSAL), 2, 32, 32)
    top = summary.order()[0]
    assert summary.kl[top] > 0.5  # at least one factor carries information
    # along the most informative factor the decoded cell grows or shrinks: its area differs at the two ends
    areas = (summary.traversals[top, :, 1] > 0.15).sum(axis=(1, 2))
    assert abs(int(areas[-1]) - int(areas[0])) > 40, areas
    assert np.abs(summary.traversals[top, -1] - summary.traversals[top, 0]).mean() > 0.02
    assert summary.reconstructions.shape == summary.examples.shape == (6, 2, 32, 32)
    assert list(summary.active()) == [j for j in summary.order() if summary.kl[j] >= 0.1] and top in summary.active()
    path = vae_figure(tmp_path / "vae.png", summary)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_a_sparse_model_on_the_vae_factors_finds_the_planted_size(trained):
    _, y, train, test, summary, _ = trained
    model = latent_model(summary.latents, y, train, test, ("small", "large"), k=2, seed=0, factors=summary.active())
    assert model.accuracy >= 0.9  # chance is 0.5
    assert 1 <= model.n_features <= 2 and model.features[0].startswith("vae_z")
    used = [int(key[len("vae_z"):]) - 1 for key in model.features]
    assert set(used) <= set(summary.active()) and all(summary.kl[used] >= 0.1)  # informative factors only
    assert "β-VAE factor" in model.formula


def test_the_cnn_black_box_is_scored_on_the_held_out_cells_and_is_the_reference(trained):
    crops, y, train, test, _, _ = trained
    cnn = cnn_black_box(crops, y, train, test, ("small", "large"), seed=0)  # evaluate's 20 epochs: ~1 s
    assert cnn.kind == CNN and cnn.n_features == 2 * 32 * 32 and cnn.terms > 10_000
    assert cnn.accuracy >= 0.8
    forest = ConditionModel("forest", 0.8, 27, kind="forest")
    sparse = ConditionModel("sparse", 0.6, 2, kind="sparse")
    relate([forest, cnn, sparse])
    assert sparse.relative_to_cnn == pytest.approx(0.6 / cnn.accuracy)
    assert sparse.relative_to_black_box == pytest.approx(0.6 / 0.8)
    assert cnn.relative_to_cnn == 1.0
    assert np.isnan(relate([sparse])[0].relative_to_cnn)  # no CNN trained: no ratio, not a made-up one


def test_crops_keep_the_cells_size_and_blank_their_neighbours():
    labels = np.zeros((64, 64), np.int32)
    yy, xx = np.indices(labels.shape)
    labels[np.hypot(yy - 20, xx - 20) < 6] = 1
    labels[np.hypot(yy - 36, xx - 34) < 12] = 2  # its edge 3 px from cell 1's: inside cell 1's window
    image = np.stack([np.where(labels > 0, 100.0, 0.0), np.where(labels == 2, 50.0, 10.0)])
    window = crop_window([labels])
    assert 24 <= window <= 30  # the larger cell (24 px across) fits
    ranges = np.array([[0.0, 100.0], [0.0, 50.0]])
    crops = cell_crops(image, labels, [1, 2], ranges, window)
    assert crops.shape == (2, 2, 32, 32) and crops.dtype == np.float32
    small, large = ((crops[i, 0] > 0.5).sum() for i in range(2))
    assert 3.0 < large / small < 5.0  # areas in the ratio of the cells' (12/6)^2 = 4: one scale for every cell
    assert crops[0, 0, 16, 16] == pytest.approx(1.0) and crops[0, 0, 0, 0] == 0  # centred
    assert crops[0, 1].max() <= 0.2 + 1e-6 and crops[1, 1].max() == pytest.approx(1.0)  # cell 2 blanked in 1's crop
