"""The solver setting: DPM-Solver++ next to DDIM (issue 17).

A DPM-Solver++ inversion step needs the model output of the step before, so each stored state
keeps that output; every guarantee of DDIM's trajectory must hold all the same: a partial
inversion extended later, a state recomputed from a kept one and a full inversion give the same
bits; a generation starts a fresh history; the model calls are the ones counted up front."""

from __future__ import annotations

import json

import numpy as np
import pytest

from phenotwin.errors import PhenotwinError
from phenotwin.pipeline import TranslationSettings
from phenotwin.pipeline.edit_mask import CONFINE_CALLS
from phenotwin.pipeline.schedulers import generation_steps
from phenotwin.progress import drive

STEPS = 10
DPM = TranslationSettings(solver="dpm++", steps=STEPS)


def same(result, reference) -> None:
    """Bit-identical translations: every array and the reconstruction's PSNR."""
    for name in ("image", "heatmap", "normalised", "generated", "reconstruction"):
        assert np.array_equal(getattr(result, name), getattr(reference, name)), name
    assert result.reconstruction_psnr == reference.reconstruction_psnr
    assert result.settings == reference.settings


def same_states(inversion, full) -> None:
    import torch

    assert set(inversion.states) <= set(full.states)
    assert all(torch.equal(inversion.states[k], full.states[k]) for k in inversion.states)
    assert sorted(inversion.history) == [k for k in sorted(inversion.states) if k > 0]  # each state with its output
    assert all(torch.equal(inversion.history[k], full.history[k]) for k in inversion.history)


# -- settings (torch-free) ---------------------------------------------------------------------


def info(**defaults):
    from phenotwin.checkpoint_info import CheckpointInfo

    return CheckpointInfo(kind="pixel", classes=["control", "treated"], image_size=32, channels=2, defaults=defaults)


def test_resolve_refuses_an_unknown_solver_naming_the_allowed_ones():
    with pytest.raises(PhenotwinError, match=r"solver must be one of ddim, dpm\+\+, got 'euler'"):
        TranslationSettings(solver="euler").resolve(info(), 1000)
    with pytest.raises(PhenotwinError, match="solver must be one of"):
        TranslationSettings().resolve(info(solver=None), 1000)


def test_refinements_are_refused_with_dpm_solver_and_saying_why_not_ignored():
    refused = r"inversion_refinements work only with solver 'ddim'.*set inversion_refinements to 0"
    with pytest.raises(PhenotwinError, match=refused):
        TranslationSettings(solver="dpm++", inversion_refinements=1).resolve(info(), 1000)
    assert TranslationSettings(solver="ddim", inversion_refinements=1).resolve(info(), 1000).inversion_refinements == 1
    # A model calibrated to DDIM with a refinement (the shipped ones): asking for DPM-Solver++ drops the
    # refinement that came with the DDIM default instead of refusing what the caller never set.
    refined = info(solver="ddim", inversion_refinements=1)
    assert TranslationSettings(solver="dpm++").resolve(refined, 1000).inversion_refinements == 0
    assert TranslationSettings().resolve(refined, 1000).inversion_refinements == 1


def test_a_model_without_a_stored_solver_means_ddim_and_a_stored_one_is_its_default():
    assert TranslationSettings().resolve(info(steps=20), 1000).solver == "ddim"  # phenotwin.json from before
    assert TranslationSettings().resolve(info(solver="dpm++"), 1000).solver == "dpm++"
    assert TranslationSettings(solver="ddim").resolve(info(solver="dpm++"), 1000).solver == "ddim"


def test_the_cost_counts_one_generation_step_more_with_dpm_solver_below_full_strength():
    from phenotwin import cost

    def resolved(strength, solver):
        return TranslationSettings("control", "treated", strength=strength, steps=STEPS, solver=solver,
                                   confine=True).resolve(info(), 1000)

    assert cost.calls_per_image(resolved(0.5, "ddim")) == 5 + CONFINE_CALLS + 5
    assert cost.calls_per_image(resolved(0.5, "dpm++")) == 5 + CONFINE_CALLS + 6
    assert cost.calls_per_image(resolved(1.0, "dpm++")) == 10 + CONFINE_CALLS + 10
    assert cost.calls_per_image(resolved(0.5, "dpm++"), depth=3) == 2 + CONFINE_CALLS + 6


def test_a_batch_record_from_before_the_solver_setting_reads_as_ddim(tmp_path):
    from phenotwin.batch_jobs import Job, read_record

    job = Job(tmp_path / "a.tif", "a_t.tif", "a_h.tif", "a.json")
    (tmp_path / "a.json").write_text(json.dumps({"status": "done", "settings": {"steps": 6}}))
    # and, written before batches too, as translated with no batch given
    assert read_record(tmp_path, job)["settings"] == {"steps": 6, "solver": "ddim", "batch": None}


def test_phenotwin_translate_takes_a_solver_flag():
    from phenotwin.cli import build_parser

    base = ["translate", "--checkpoint", "m", "--input", "x.tif", "--source", "a", "--target", "b", "--output", "o"]
    assert build_parser().parse_args(base + ["--solver", "dpm++"]).solver == "dpm++"
    assert build_parser().parse_args(base).solver is None  # the model's
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["--solver", "euler"])


# -- the trajectory ------------------------------------------------------------------------------


@pytest.fixture
def translator(translators, torch_one_thread):
    return translators["pixel"]


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_a_partial_dpm_inversion_extended_later_is_bit_identical_to_a_full_one(translators, torch_one_thread,
                                                                               cells, kind):
    translator = translators[kind]
    full = translator.invert(cells, "control", channel_axis=0, settings=DPM)
    assert full.complete and full.solver == "dpm++" and sorted(full.history) == list(range(1, STEPS + 1))
    for strength in (0.2, 0.5, 0.9, 1.0):
        used = max(1, round(strength * STEPS))
        before = translator.denoiser.calls
        result = translator.translate(cells, "control", "treated", strength=strength, channel_axis=0, settings=DPM)
        # `used` inversion steps, then the generation (the reconstruction in the same batch)
        assert translator.denoiser.calls - before == used + generation_steps("dpm++", used, STEPS)
        assert result.inversion.depth == used
        same(result, translator.generate(full, "treated", strength=strength))
        same_states(result.inversion, full)
    # From 2 steps deep: a deeper scrub extends it (no step twice), then the rest in the background.
    inversion = translator.invert(cells, "control", channel_axis=0, settings=DPM, strength=0.2)
    before = translator.denoiser.calls
    scrubbed = translator.generate(inversion, "treated", strength=0.7)
    assert translator.denoiser.calls - before == 5 + 8 and inversion.depth == 7
    same(scrubbed, translator.generate(full, "treated", strength=0.7))
    translator.extend(inversion)
    assert inversion.complete
    same_states(inversion, full)
    assert inversion.kept_states() == full.kept_states()


def test_a_bounded_dpm_trajectory_recomputes_a_dropped_state_with_its_history(checkpoints, cells, torch_one_thread):
    from phenotwin import Translator

    bounded = Translator(checkpoints["pixel"], device="cpu", solver="dpm++")
    bounded.trajectory_budget = 3 * 2 * cells.size * 4  # three states with their outputs: 0, 5 and 10 of 10
    full = Translator(checkpoints["pixel"], device="cpu", solver="dpm++").invert(cells, "control", steps=STEPS,
                                                                                   channel_axis=0)
    inversion = bounded.invert(cells, "control", steps=STEPS, channel_axis=0, strength=0.3)
    assert inversion.kept_states() == [0, 3] and sorted(inversion.history) == [3]
    bounded.extend(inversion, strength=0.7)
    assert inversion.kept_states() == [0, 5, 7] and sorted(inversion.history) == [5, 7]
    before = bounded.denoiser.calls
    partial = bounded.generate(inversion, "treated", strength=0.4)  # state 4 rebuilt from state 0
    assert bounded.denoiser.calls - before == 4 + 5
    deeper = bounded.generate(inversion, "treated", strength=0.6)  # state 6 rebuilt from state 5 and its output
    assert bounded.denoiser.calls - before == 4 + 5 + 1 + 7
    bounded.extend(inversion)
    assert inversion.kept_states() == [0, 5, 10]
    same_states(inversion, full)
    same(partial, bounded.generate(full, "treated", strength=0.4))
    same(deeper, bounded.generate(full, "treated", strength=0.6))


def test_the_steps_equal_diffusers_own_multistep_loop(translator, cells):
    """The pure step (history handed in, scheduler copied) does diffusers' arithmetic: an
    uninterrupted run of diffusers' schedulers gives the same bits, inversion and generation."""
    import copy

    import torch

    full = translator.invert(cells, "control", channel_axis=0, settings=DPM)
    diffusion, den = translator.diffusion, translator.denoiser
    inverse, sampler = (copy.deepcopy(s) for s in diffusion.schedulers(STEPS, "dpm++"))
    labels = diffusion.labels([0])
    sample = full.states[0]
    with torch.inference_mode():
        for k, t in enumerate(inverse.timesteps, start=1):
            sample = inverse.step(den.predict(sample, t, labels, 0.0), t, sample).prev_sample
            assert torch.equal(sample, full.states[k]), k
        used = 4
        count = generation_steps("dpm++", used, STEPS)
        sampler.set_begin_index(STEPS - count)
        generated = full.states[used].repeat(2, 1, 1, 1)
        labels = diffusion.labels([1, 0])
        for t in sampler.timesteps[STEPS - count:]:
            generated = sampler.step(den.predict(generated, t, labels, 0.0), t, generated).prev_sample
        expected = den.decode(generated).clamp(-1, 1).cpu().numpy()
    result = translator.generate(full, "treated", strength=used / STEPS)
    assert np.array_equal(result.generated, expected[0][:, :32, :32])
    assert np.array_equal(result.reconstruction, expected[1][:, :32, :32])


def test_a_dpm_inversion_is_not_reused_for_a_ddim_generation(translator, cells):
    inversion = translator.invert(cells, "control", channel_axis=0, settings=DPM, strength=0.5)
    before = translator.denoiser.calls
    with pytest.raises(PhenotwinError, match=r"made with solver 'dpm\+\+', not 'ddim'.*Invert the image again"):
        translator.generate(inversion, "treated", settings=TranslationSettings(solver="ddim"))
    with pytest.raises(PhenotwinError, match="made with solver 'ddim', not 'dpm"):
        translator.generate(translator.invert(cells, "control", steps=STEPS, channel_axis=0, strength=0.5), "treated",
                            settings=DPM)
    assert translator.denoiser.calls - before == 5  # only the DDIM inversion ran
    result = translator.generate(inversion, "treated")  # no solver asked: the inversion's
    assert result.settings.solver == "dpm++"


def test_the_solver_is_recorded_and_the_counted_calls_are_the_cost(translator, cells):
    from phenotwin import cost

    for solver, strength in (("dpm++", 0.5), ("dpm++", 1.0), ("ddim", 0.5)):
        settings = TranslationSettings("control", "treated", strength=strength, steps=STEPS, solver=solver,
                                       confine=True, guidance=1.0)
        before = translator.denoiser.calls
        result = translator.translate(cells, settings=settings, channel_axis=0)
        assert translator.denoiser.calls - before == cost.calls_per_image(translator.resolve(settings))
        assert result.metadata()["solver"] == result.solver == solver
    deeper = settings.replace(solver="dpm++", strength=0.8, confine=False)
    inversion = translator.invert(cells, "control", settings=DPM, channel_axis=0, strength=0.3)
    plan = cost.plan_scrub(translator, inversion, deeper)
    before = translator.denoiser.calls
    translator.generate(inversion, settings=deeper)
    assert plan.calls == 5 + 9 == translator.denoiser.calls - before


def test_a_checkpoint_may_default_to_dpm_solver_and_a_bad_one_is_refused_at_load(tmp_path, torch_one_thread):
    from phenotwin import CheckpointError, Translator
    from phenotwin.testing import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "m")
    stored = json.loads((model / "phenotwin.json").read_text())
    stored["defaults"]["solver"] = "dpm++"
    (model / "phenotwin.json").write_text(json.dumps(stored))
    assert Translator(model, device="cpu").solver == "dpm++"
    stored["defaults"]["solver"] = "heun"
    (model / "phenotwin.json").write_text(json.dumps(stored))
    with pytest.raises(CheckpointError, match=r"defaults in .*solver must be one of ddim, dpm\+\+"):
        Translator(model, device="cpu")


def test_dpm_solver_reconstructs_better_than_ddim_at_ten_steps_on_a_trained_model(torch_one_thread):
    """Measured first. On the shipped demo model (trained, v-prediction, zero terminal SNR) three
    held-out cells reconstructed at 10 steps at 32.2 / 31.9 / 29.8 dB with DPM-Solver++ against
    17.5 / 16.6 / 17.6 dB with DDIM at strength 1, and 29.7 / 31.9 / 29.8 against 18.1 / 20.0 /
    17.6 dB at strength 0.5 (the first cell is the one below). On the
    tiny random models the reverse holds (pixel: 21-25 dB against 28-31 dB at strength 1; latent:
    equal within 0.1 dB): the inverse solver starts from its first noise level, which the clean
    image is not at, and only a trained denoiser forgives that. So the claim is asserted on the
    trained model only, with a margin well inside the measured 12-15 dB."""
    from phenotwin import Translator
    from phenotwin.assets import demo_model_path
    from phenotwin.synthetic import as_camera_units, make_pairs

    demo = demo_model_path()
    if demo is None:
        pytest.skip("no demo model in this install")
    translator = Translator(demo, device="cpu")
    cell = as_camera_units(make_pairs(1, size=64, channels=2, phenotype="obvious", seed=3, start=800_000).control)[0]
    for strength in (1.0, 0.5):
        psnr = {solver: translator.translate(cell, "control", "nocodazole", strength=strength, steps=STEPS, guidance=0.0,
                                             confine=False, channel_axis=0,
                                             settings=TranslationSettings(solver=solver)).reconstruction_psnr
                for solver in ("ddim", "dpm++")}
        assert psnr["dpm++"] >= psnr["ddim"] + 5.0, (strength, psnr)


def test_the_edit_mask_is_the_same_whatever_the_solver_steps_and_refinements(translator, cells):
    """The calibration's cost search reuses each image's edit mask across solvers and step counts
    (`calibration_cost.cost_search`): it compares clean-image estimates at fixed noise levels only."""
    masks = []
    for solver, steps, refinements in (("ddim", 6, 0), ("ddim", 3, 1), ("dpm++", 4, 0)):
        settings = translator.resolve(source="control", steps=steps, solver=solver, inversion_refinements=refinements)
        inversion = translator.invert(cells, channel_axis=0, settings=settings, strength=0.5)
        masks.append(drive(translator.edit_mask_steps(inversion, "treated")))
    assert masks[0].max() > 0 and all(np.array_equal(masks[0], mask) for mask in masks[1:])
