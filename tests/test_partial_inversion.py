"""Partial inversion: a translation inverts only as deep as its strength needs, and a deeper
strength extends the inversion from where it stopped. Every output must be bit-identical to
one from a full inversion at the same settings, and the model calls exactly those counted."""

from __future__ import annotations

import numpy as np
import pytest

from phenotwin.pipeline.edit_mask import CONFINE_CALLS

STEPS = 10


@pytest.fixture
def translator(translators, torch_one_thread):
    return translators["pixel"]


def same(result, reference) -> None:
    """Bit-identical translations: every array and the reconstruction's PSNR."""
    for name in ("image", "heatmap", "normalised", "generated", "reconstruction"):
        assert np.array_equal(getattr(result, name), getattr(reference, name)), name
    assert result.reconstruction_psnr == reference.reconstruction_psnr
    assert result.settings == reference.settings


def full_reference(translator, cells, strength, **settings):
    inversion = translator.invert(cells, "control", steps=STEPS, channel_axis=0)
    assert inversion.complete
    return translator.generate(inversion, "treated", strength=strength, **settings)


@pytest.mark.parametrize("strength", [0.1, 0.3, 0.5, 0.8, 1.0])
def test_a_translation_inverts_only_as_deep_as_its_strength_and_matches_a_full_inversion(translator, cells, strength):
    used = max(1, round(strength * STEPS))
    before = translator.denoiser.calls
    result = translator.translate(cells, "control", "treated", strength=strength, steps=STEPS, channel_axis=0)
    # `used` inversion steps, then `used` generation steps (the reconstruction in the same batch)
    assert translator.denoiser.calls - before == 2 * used
    assert result.inversion.depth == used and result.inversion.kept_states() == list(range(used + 1))
    assert result.inversion.complete == (used == STEPS)
    same(result, full_reference(translator, cells, strength))


@pytest.mark.parametrize("kind", ["latent", "stable-diffusion"])
def test_partial_inversion_matches_a_full_one_for_latent_models(translators, torch_one_thread, cells, kind):
    translator = translators[kind]
    result = translator.translate(cells, "control", "treated", strength=0.4, steps=STEPS, channel_axis=0)
    assert result.inversion.depth == 4
    same(result, full_reference(translator, cells, 0.4))


def test_extending_then_scrubbing_never_redoes_a_step_and_matches_a_full_inversion(translator, cells):
    import torch

    full = translator.invert(cells, "control", steps=STEPS, channel_axis=0)
    result = translator.translate(cells, "control", "treated", strength=0.3, steps=STEPS, channel_axis=0)
    inversion = result.inversion
    events = []

    def scrub(strength, expected_calls, **settings):
        before = translator.denoiser.calls
        events.clear()
        scrubbed = translator.generate(inversion, "treated", strength=strength, progress=events.append, **settings)
        assert translator.denoiser.calls - before == expected_calls, strength
        same(scrubbed, translator.generate(full, "treated", strength=strength, **settings))
        return scrubbed

    scrub(0.7, 4 + 7)  # deeper than inverted: states 4-7 first (4 calls), then 7 generation steps
    assert inversion.depth == 7 and [(e.stage, e.total) for e in events] == [("invert", 4)] * 4 + [("generate", 7)] * 7
    scrub(0.5, 5)  # below the depth: no inversion step
    scrub(0.7, 0)  # cached
    before = translator.denoiser.calls
    translator.extend(inversion)  # the rest of the way, as the widget does in the background
    assert translator.denoiser.calls - before == 3 and inversion.complete
    before = translator.denoiser.calls
    translator.extend(inversion)  # nothing left to do
    assert translator.denoiser.calls == before
    scrub(1.0, 10)
    scrub(0.9, CONFINE_CALLS + 9, guidance=2.0, confine=True)  # guidance and the edit mask: the same states
    assert inversion.kept_states() == full.kept_states()
    assert all(torch.equal(inversion.states[k], full.states[k]) for k in full.states)


def test_a_bounded_trajectory_keeps_its_states_and_the_deepest_while_extending(checkpoints, cells, torch_one_thread):
    import torch

    from phenotwin import Translator

    bounded = Translator(checkpoints["pixel"], device="cpu")
    bounded.trajectory_budget = 3 * cells.size * 4  # keeps states 0, 5 and 10 of 10
    full = Translator(checkpoints["pixel"], device="cpu").invert(cells, "control", steps=STEPS, channel_axis=0)
    inversion = bounded.invert(cells, "control", steps=STEPS, channel_axis=0, strength=0.3)
    assert inversion.kept_states() == [0, 3]  # the deepest is kept to extend from
    bounded.extend(inversion, strength=0.7)
    assert inversion.kept_states() == [0, 5, 7]  # 3 was not one the budget keeps
    before = bounded.denoiser.calls
    partial = bounded.generate(inversion, "treated", strength=0.4)  # state 4 rebuilt from state 0
    assert bounded.denoiser.calls - before == 4 + 4
    bounded.extend(inversion)
    assert inversion.kept_states() == [0, 5, 10]
    assert all(torch.equal(inversion.states[k], full.states[k]) for k in inversion.states)
    assert np.array_equal(partial.generated, bounded.generate(full, "treated", strength=0.4).generated)


def test_a_cancelled_extension_keeps_the_depth_it_reached(translator, cells):
    from phenotwin import Cancelled

    inversion = translator.invert(cells, "control", steps=STEPS, channel_axis=0, strength=0.2)
    seen = []
    with pytest.raises(Cancelled):
        translator.extend(inversion, progress=seen.append, cancel=lambda: len(seen) >= 3)
    assert inversion.depth == 2 + 3 and inversion.kept_states() == list(range(6))
    same(translator.generate(inversion, "treated", strength=0.8), full_reference(translator, cells, 0.8))


def test_refined_partial_inversions_count_every_refinement(checkpoints, cells, torch_one_thread):
    from phenotwin import Translator

    refined = Translator(checkpoints["pixel"], device="cpu", inversion_refinements=1)
    before = refined.denoiser.calls
    result = refined.translate(cells, "control", "treated", strength=0.4, steps=STEPS, channel_axis=0)
    assert refined.denoiser.calls - before == 4 * 2 + 4  # two evaluations per inversion step
    before = refined.denoiser.calls
    deeper = refined.generate(result.inversion, "treated", strength=0.6)
    assert refined.denoiser.calls - before == 2 * 2 + 6
    reference = refined.generate(refined.invert(cells, "control", steps=STEPS, channel_axis=0), "treated", strength=0.6)
    same(deeper, reference)
