"""The cost estimate before a run: model calls counted up front (partial inversion included) and
what `phenotwin translate` prints before a batch, checked against the calls the model makes."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile

from phenotwin import cost
from phenotwin.pipeline import TranslationSettings
from phenotwin.pipeline.edit_mask import CONFINE_CALLS


@pytest.fixture
def translator(translators, torch_one_thread):
    return translators["pixel"]


def settings(**changes) -> TranslationSettings:
    return TranslationSettings("control", "treated", strength=0.5, steps=6, guidance=0.0, confine=True,
                               seed=0).replace(**changes)


def test_a_runs_calls_count_only_the_inversion_its_strength_needs(translator, cells):
    resolved = translator.resolve(settings(strength=0.5, steps=10))
    assert cost.calls_per_image(resolved) == 5 + CONFINE_CALLS + 5
    assert cost.calls_per_image(resolved, depth=3) == 2 + CONFINE_CALLS + 5  # a cached inversion 3 deep
    assert cost.calls_per_image(resolved, depth=10) == CONFINE_CALLS + 5
    refined = translator.resolve(settings(strength=0.5, steps=10, inversion_refinements=2))
    assert cost.calls_per_image(refined) == 5 * 3 + CONFINE_CALLS + 5
    before = translator.denoiser.calls
    result = translator.translate(cells, settings=settings(strength=0.5, steps=10), channel_axis=0)
    assert translator.denoiser.calls - before == cost.calls_per_image(resolved)
    # A scrub deeper than the inversion went: the missing inversion steps, then the generation.
    deeper = settings(strength=0.8, steps=10)
    plan = cost.plan_scrub(translator, result.inversion, deeper)
    before = translator.denoiser.calls
    translator.generate(result.inversion, settings=deeper)
    assert plan.calls == 3 + 8 == translator.denoiser.calls - before
    assert cost.plan_scrub(translator, result.inversion, deeper).calls == 0  # cached now


def test_a_batch_estimate_says_the_tiles_of_large_fields(translator):
    translator.resolve(settings())
    per_plane = 3 + CONFINE_CALLS + 3
    nine = cost.tiles_for(80, 80, 32)
    assert nine == 9
    cost.SECONDS_PER_CALL[translator.checkpoint_id] = 0.5
    text = cost.describe_batch(translator, settings(), 2, [(1, 80, 80), (2, 80, 80)])
    assert text == f"2 images, {3 * per_plane} model calls (x 9 tiles), {cost.about(3 * per_plane * 9 * 0.5)} on this machine"
    mixed = cost.describe_batch(translator, settings(), 2, [(1, 32, 32), (1, 80, 80)])
    assert mixed == (f"2 images, {2 * per_plane} model calls ({per_plane * 10} model-sized tiles in all), "
                     f"{cost.about(per_plane * 10 * 0.5)} on this machine")


def test_phenotwin_translate_prints_the_estimate_before_it_starts_and_the_count_is_the_models(
        checkpoints, tmp_path, capsys, monkeypatch, torch_one_thread):
    import phenotwin
    from phenotwin.batch import run_batch

    made = []

    class Counted(phenotwin.Translator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(phenotwin, "Translator", Counted)
    rng = np.random.default_rng(1)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for k in range(2):
        tifffile.imwrite(inputs / f"cell_{k}.tif", rng.integers(200, 3000, (2, 32, 32), dtype=np.uint16),
                         metadata={"axes": "CYX"})
    tifffile.imwrite(inputs / "stack.tif", rng.integers(200, 3000, (3, 2, 32, 32), dtype=np.uint16),
                     metadata={"axes": "ZCYX"})
    run_batch(checkpoints["pixel"], [str(inputs)], tmp_path / "out", settings(), device="cpu")
    lines = [line for line in capsys.readouterr().err.splitlines() if "model calls" in line]
    assert len(lines) == 1
    found = re.fullmatch(r"3 images, (\d+) model calls, about (\d+) (s|min) on this machine", lines[0])
    assert found, lines[0]
    planes, per_plane = 1 + 1 + 3, 3 + CONFINE_CALLS + 3
    (translator,) = made
    assert int(found[1]) == planes * per_plane == translator.denoiser.calls  # the timing calls are not counted
    seconds = cost.SECONDS_PER_CALL[translator.checkpoint_id]  # timed at load
    assert found[0].endswith(f"{cost.about(planes * per_plane * seconds)} on this machine")
