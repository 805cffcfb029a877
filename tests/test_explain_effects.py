"""Effect sizes with bootstrap intervals, their agreement, the forest plot and the models of the condition,
on synthetic per-cell tables whose true shifts are known (explain/effects.py, explain/models.py)."""

from __future__ import annotations

import numpy as np
import pytest

from phenotwin.errors import PhenotwinError
from phenotwin.explain import effects
from phenotwin.explain.features import Feature
from phenotwin.explain.models import fit_models

FEATURES = [Feature("fragments", "golgi fragments per cell", "count", "golgi"),
            Feature("distance", "golgi distance from the nucleus", "px", "golgi"),
            Feature("area", "cell area", "px²")]


def populations(n=200, seed=0):
    """Source cells and their 'translations': fragments +2.3 per cell, distance +31%, area unchanged."""
    rng = np.random.default_rng(seed)
    fragments = rng.poisson(7.5, n).astype(float)
    distance = rng.normal(4.0, 0.8, n)
    area = rng.normal(600, 80, n)
    before = [{"fragments": f, "distance": d, "area": a} for f, d, a in zip(fragments, distance, area)]
    after = [{"fragments": f + 2.3 + rng.normal(0, 0.8), "distance": d * 1.31 + rng.normal(0, 0.1),
              "area": a + rng.normal(0, 5)} for f, d, a in zip(fragments, distance, area)]
    return before, after


def by_key(found):
    return {e.key: e for e in found}


def test_paired_effects_recover_the_planted_shifts_and_an_unshifted_feature_contains_zero():
    before, after = populations()
    found = effects.compare(before, after, FEATURES, paired=True, seed=1)
    e = by_key(found)
    low, high = e["fragments"].difference_ci
    assert low < 2.3 < high and high - low < 0.5 and e["fragments"].difference == pytest.approx(2.3, abs=0.15)
    low, high = e["distance"].relative_ci
    assert low < 0.31 < high and e["distance"].relative == pytest.approx(0.31, abs=0.03)
    assert e["area"].difference_ci[0] < 0 < e["area"].difference_ci[1] and not e["area"].excludes_zero()
    assert [x.key for x in found][-1] == "area"  # ranked by standardised size: the unchanged one last
    assert e["fragments"].text().startswith(f"golgi fragments per cell: {e['fragments'].difference:+.3g} [")
    assert "%" in e["distance"].text() and e["distance"].n_before == 200


def test_bootstrap_is_seeded_and_intervals_cover_the_truth_about_95_percent():
    before, after = populations(n=60)
    assert effects.compare(before, after, FEATURES, True, seed=3) == effects.compare(before, after, FEATURES, True, seed=3)
    covered = 0
    for seed in range(40):
        b, a = populations(n=60, seed=100 + seed)
        low, high = effects.compare(b, a, FEATURES[:1], True, n_resamples=500, seed=seed)[0].difference_ci
        covered += low < 2.3 < high
    assert covered >= 33  # 95% nominal; 40 draws: at least 33 expected unless the interval is far too narrow


def test_between_populations_and_agreement_with_the_translation():
    rng = np.random.default_rng(5)
    real_a = [{"fragments": rng.poisson(7.5), "distance": rng.normal(4, 0.8), "area": rng.normal(600, 80)}
              for _ in range(150)]
    real_b = [{"fragments": rng.poisson(9.8), "distance": rng.normal(5.2, 0.8), "area": rng.normal(600, 80)}
              for _ in range(150)]
    between = effects.compare(real_a, real_b, FEATURES, paired=False, seed=0)
    e = by_key(between)
    assert e["fragments"].difference_ci[0] < 2.3 < e["fragments"].difference_ci[1]
    assert e["area"].difference_ci[0] < 0 < e["area"].difference_ci[1]
    paired = effects.compare(*populations(), FEATURES, paired=True, seed=0)
    agree = effects.agreement(paired, between)
    assert agree["spearman"] == pytest.approx(1.0) and agree["sign_agreement"] == 1.0
    assert agree["clear_real_differences"] == 2 and agree["features"] == 3
    flipped = [effects.Effect(**{**x.to_dict(), "standardised": -x.standardised}) for x in paired]
    assert effects.agreement(flipped, between)["sign_agreement"] == 0.0


def test_too_few_cells_are_refused():
    before, after = populations(n=5)
    with pytest.raises(PhenotwinError, match="at least 2 cells"):
        effects.compare(before[:1], after[:1], FEATURES, paired=True)
    with pytest.raises(PhenotwinError, match="same cells"):
        effects.compare(before, after[:3], FEATURES, paired=True)
    with pytest.raises(PhenotwinError, match="at least 10 cells"):
        fit_models(before, after, FEATURES, ("control", "treated"), formula=False)


def test_forest_plot_draws_one_row_per_effect(tmp_path):
    from skimage.io import imread

    before, after = populations()
    found = effects.compare(before, after, FEATURES, paired=True)
    path = effects.forest_plot(tmp_path / "forest.png", found, reference=found)
    pixels = imread(path)[..., :3].astype(int)
    blue = (np.abs(pixels - [31, 119, 180]).sum(axis=-1) < 40)  # matplotlib's tab:blue markers
    orange = (np.abs(pixels - [255, 127, 14]).sum(axis=-1) < 40)
    blue_rows = np.flatnonzero(blue.any(axis=1))
    bands = 1 + int((np.diff(blue_rows) > 5).sum())  # separate rows of markers, one per effect
    assert blue.sum() > 50 and orange.sum() > 50 and 3 <= bands <= 4  # (the legend may add one)


def test_sparse_model_recovers_the_planted_feature_and_matches_the_black_box():
    rng = np.random.default_rng(0)
    features = [Feature(f"f{j}", f"feature {j}", "units") for j in range(12)]
    rows = {c: [{f.key: rng.normal() for f in features} for _ in range(150)] for c in (0, 1)}
    for row in rows[1]:
        row["f7"] += 2.5  # the only feature that differs
    models = fit_models(rows[0], rows[1], features, ("control", "treated"), k=3, seed=0, population=300,
                        generations=6)
    black_box, sparse, formula = models
    assert black_box.n_features == 12
    assert sparse.features[0] == "f7" and sparse.n_features <= 3
    assert sparse.accuracy > 0.85 and sparse.relative_to_black_box >= 0.95
    assert "z(feature 7)" in sparse.formula and sparse.formula.startswith("treated when")
    assert "f7" in formula.features and formula.accuracy > 0.8
    assert "x" in formula.formula and "feature 7" in formula.formula
