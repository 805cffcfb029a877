"""The benchmark script runs end to end (quick mode, tiny models) and reports every section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def test_quick_benchmark_reports_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["machine"]["torch"] and results["matmul_peak_gflop_per_s"]["median"] > 0
    assert [m["model"] for m in results["models"]] == ["demo", "sd-width"]
    for model in results["models"]:
        first = model["first_translation_s"]
        assert 0 < first["min"] <= first["median"] <= first["max"] and first["runs"] == 2
        for comparison in model["vs_plain_diffusers"].values():
            assert comparison["max_abs_diff"] < 1e-4  # the plain loop computes the same images
            assert comparison["speedup"] > 0
        scrub = model["scrub"]
        assert scrub["cached_s"]["median"] < scrub["cold_0.5_s"]["median"]
        assert model["throughput"]["translation_gflop_per_s"] > 0
        defaults = model["defaults"]  # partial inversion: the steps the strength leaves out are not run
        unused = defaults["settings"]["steps"] - defaults["settings"]["used_steps"]
        assert defaults["unet_calls_full_inversion_first"] - defaults["unet_calls"] == unused * (
            1 + defaults["settings"]["inversion_refinements"])
        above = defaults["scrub_above"]
        assert above["unet_calls"] >= round(above["strength"] * defaults["settings"]["steps"])
        assert {"1", "2"} <= set(model["throughput"]["unet_forward"])
    fields = results["fields"]
    assert set(fields["native"]) == {"demo", "sd-width"}
    for field in fields["scaling"].values():
        assert field["peak_rss_bytes"]["median"] > 100 * 2**20 and field["state_dtype"] == "torch.float32"
        assert field["states_kept"] == field["steps"] + 1  # small fields keep the whole trajectory
    assert fields["time_per_area_ratio"] >= 1
    gui = results["gui"]
    assert "skipped" in gui or gui["max_gap_ms"]["median"] >= 5
    if "skipped" not in gui:  # a prefetched strength is shown without generating: faster than a new one
        assert gui["scrub"]["prefetched_s"]["median"] < gui["scrub"]["new_s"]["median"]
        assert gui["scrub"]["prefetch_s"] >= 0
    assert "| 1 | first translation" in done.stdout and "napari responsiveness" in done.stdout


def test_change_direction_separates_the_size_of_a_change_from_its_direction():
    """benchmarks/change_direction.py: a change along the true one, twice too large, has cosine 1 and
    a best gain of 0.5 that reaches ratio 0; a change across it has cosine 0 and no gain helps."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("change_direction", BENCH.parent / "change_direction.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    sources = rng.random((3, 2, 8, 8))
    masks = np.zeros((3, 8, 8), bool)
    masks[:, 2:6, 2:6] = True
    true_change = np.where(masks[:, None], rng.random((3, 2, 8, 8)), 0.0)
    along = module.direction_figures(sources + 2 * true_change, sources, sources + true_change, masks)
    assert along["cosine_with_true_change"] == pytest.approx(1.0)
    assert along["counterfactual_ratio"] == pytest.approx(1.0)  # (2 - 1)^2: as far off as doing nothing
    assert along["best_gain"] == pytest.approx(0.5) and along["ratio_at_best_gain"] == pytest.approx(0.0, abs=1e-9)
    assert along["change_size"] == pytest.approx(2.0) and along["share_of_change_inside_true_mask"] == pytest.approx(1.0)
    across = np.where(masks[:, None], 0.0, rng.random((3, 2, 8, 8)))  # outside the true change only
    wrong = module.direction_figures(sources + across, sources, sources + true_change, masks)
    assert wrong["cosine_with_true_change"] == pytest.approx(0.0)
    assert wrong["ratio_at_best_gain"] == pytest.approx(1.0) and wrong["counterfactual_ratio"] > 1.0
    assert wrong["ratio_inside_true_mask_only"] == pytest.approx(1.0)  # an oracle mask removes it all


def test_reconstruction_levers_synthetic_cells_fit_the_demo_model():
    """benchmarks/reconstruction_levers.py without --data: the held-out cells were converted to
    camera units twice, so every cell was the same saturated field (mean 65 471 of 65 535) and its
    numbers meant nothing; they must fit the model's training range and differ by condition."""
    import importlib.util

    import numpy as np

    from phenotwin import Translator
    from phenotwin.assets import demo_model_path

    spec = importlib.util.spec_from_file_location("reconstruction_levers", BENCH.parent / "reconstruction_levers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    translator = Translator(demo_model_path(), device="cpu")
    images = module.held_out(translator, None, 2)
    control, treated = (np.stack(images[c]) for c in translator.classes)
    assert not np.array_equal(control, treated) and not np.array_equal(control[0], control[1])
    assert translator.processor.preprocess(control[0], 0).fit.level == "ok"
