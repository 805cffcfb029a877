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
