"""Translator: inversion, cached regeneration, progress, cancellation, units and bad input."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

from phenotwin import Cancelled, PhenotwinError, PhenotwinWarning, TranslationSettings
from phenotwin.pipeline.heatmap import psnr

from .conftest import KINDS


def autoencoder_roundtrip(translator, model_input):
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(model_input)[None]
        return translator.denoiser.decode(translator.denoiser.encode(x))[0].clamp(-1, 1).numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_invert_then_regenerate_reconstructs_the_input(translators, cells, kind):
    translator = translators[kind]
    inversion = translator.invert(cells, "control", steps=50, channel_axis=0)
    assert inversion.kept_states() == list(range(51))  # a small field keeps every state
    again = translator.generate(inversion, "control", strength=1.0)
    # Pixel models must give the image back; latent models the image as their autoencoder sees it.
    reference = inversion.normalised if kind == "pixel" else autoencoder_roundtrip(translator, inversion.model_input)
    assert psnr(reference, again.generated) > 30
    np.testing.assert_array_equal(again.normalised, inversion.normalised)  # relative to its own rendering: unchanged


def test_reconstruction_improves_with_more_steps(translators, cells):
    translator = translators["pixel"]
    coarse = translator.translate(cells, "control", "treated", steps=5, channel_axis=0).reconstruction_psnr
    fine = translator.translate(cells, "control", "treated", steps=50, channel_axis=0).reconstruction_psnr
    assert fine > coarse + 3


def test_fixed_point_refinement_sharpens_the_inversion(checkpoints, cells):
    from phenotwin import Translator

    plain = Translator(checkpoints["pixel"], device="cpu")
    refined = Translator(checkpoints["pixel"], device="cpu", inversion_refinements=2)
    coarse = plain.translate(cells, "control", "treated", steps=10, channel_axis=0).reconstruction_psnr
    before = refined.denoiser.calls
    inversion = refined.invert(cells, "control", steps=10, channel_axis=0)
    assert refined.denoiser.calls - before == 30  # three model evaluations per inversion step
    sharp = refined.generate(inversion, "treated").reconstruction_psnr
    assert sharp > coarse + 3


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_refinement_converges_to_the_exact_inverse_for_epsilon_and_v_prediction(tmp_path, cells, prediction):
    """The refinement must read the model's output at the state it moves to as the generation
    step will: a v-prediction read against the state it starts from drifts instead (it lost
    1.4 dB on the subtle model), and every scratch model predicts v."""
    from phenotwin import Translator
    from phenotwin.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / prediction, prediction_type=prediction, beta_schedule="linear",
                                beta_start=0.0001, beta_end=0.02, timestep_spacing="trailing",
                                rescale_betas_zero_snr=prediction == "v_prediction")
    psnrs = [Translator(path, device="cpu", inversion_refinements=n)
             .translate(cells, "control", "control", steps=10, strength=0.5, channel_axis=0).reconstruction_psnr
             for n in (0, 1, 4)]
    assert psnrs[1] > psnrs[0] + 3, psnrs
    assert psnrs[2] > psnrs[1] + 3, psnrs  # each iteration closer to the fixed point: no drift


def test_scrubbing_reuses_the_inversion(translators, cells):
    translator = translators["pixel"]
    result = translator.translate(cells, "control", "treated", steps=20, channel_axis=0)
    inversion = result.inversion
    before = translator.denoiser.calls
    half = translator.generate(inversion, "treated", strength=0.5)
    assert translator.denoiser.calls - before == 10  # only the 10 generation steps, batched with the reconstruction
    assert half.strength == 0.5
    before = translator.denoiser.calls
    translator.generate(inversion, "treated", strength=0.25, reconstruct=False)
    assert translator.denoiser.calls - before == 5
    before = translator.denoiser.calls
    same = translator.generate(inversion, "control", strength=0.5)  # cached with the first scrub
    assert translator.denoiser.calls == before
    assert same.reconstruction_psnr == half.reconstruction_psnr

    before = translator.denoiser.calls
    again = translator.generate(inversion, "treated", strength=0.5)  # scrubbing back to a strength seen
    assert translator.denoiser.calls == before
    np.testing.assert_array_equal(again.normalised, half.normalised)


def test_a_bounded_trajectory_recomputes_missing_states_exactly(checkpoints, cells):
    import torch

    from phenotwin import Translator
    from phenotwin.pipeline.trajectory import kept_states

    full = Translator(checkpoints["pixel"], device="cpu")
    bounded = Translator(checkpoints["pixel"], device="cpu")
    state_bytes = cells.size * 4
    bounded.trajectory_budget = 3 * state_bytes
    assert kept_states(10, state_bytes, bounded.trajectory_budget) == [0, 5, 10]
    inversion = bounded.invert(cells, "control", steps=10, channel_axis=0)
    assert inversion.kept_states() == [0, 5, 10]
    assert all(s.dtype == torch.float32 for s in inversion.states.values())
    reference = full.invert(cells, "control", steps=10, channel_axis=0)
    events = []
    before = bounded.denoiser.calls
    result = bounded.generate(inversion, "treated", strength=0.4, progress=events.append)
    # State 4 is rebuilt from state 0 (4 inversion calls), then 4 generation calls.
    assert bounded.denoiser.calls - before == 8
    assert [(e.stage, e.total) for e in events] == [("invert", 4)] * 4 + [("generate", 4)] * 4
    np.testing.assert_array_equal(result.generated, full.generate(reference, "treated", strength=0.4).generated)


def test_the_generation_cache_stays_within_its_budget(checkpoints, cells):
    from phenotwin import Translator

    translator = Translator(checkpoints["pixel"], device="cpu")
    translator.cache_budget = 3 * cells.size * 4  # three images
    inversion = translator.invert(cells, "control", steps=10, channel_axis=0)
    for strength in (0.2, 0.4, 0.6):
        translator.generate(inversion, "treated", strength=strength)
    # the translation and reconstruction at 0.6 and the reconstruction at 0.4
    held = [(c, s) for c in ("control", "treated") for s in (0.2, 0.4, 0.6) if inversion.is_cached(c, s)]
    assert held == [("control", 0.4), ("control", 0.6), ("treated", 0.6)]


def test_prefetched_strengths_cost_nothing_later_and_match_a_fresh_generation(checkpoints, cells):
    from phenotwin import Translator
    from phenotwin.progress import drive

    translator = Translator(checkpoints["pixel"], device="cpu")
    inversion = translator.invert(cells, "control", steps=10, channel_axis=0)
    translator.generate(inversion, "treated", strength=0.5)  # the first translation: 0.5 is cached already
    events = []
    before = translator.denoiser.calls
    made = drive(translator.prefetch_steps(inversion, [0.5, 0.6, 0.4, 0.62, 0.3], target="treated"), events.append)
    # 0.5 was cached, 0.62 rounds to 0.6's 6 steps: three new strengths, 6 + 4 + 3 batched calls.
    assert made == 3
    assert translator.denoiser.calls - before == 13
    assert [(e.item, e.items, e.unit, e.total) for e in events] == \
        [(1, 3, "strength", 6)] * 6 + [(2, 3, "strength", 4)] * 4 + [(3, 3, "strength", 3)] * 3
    before = translator.denoiser.calls
    scrubbed = translator.generate(inversion, "treated", strength=0.4, reconstruct=False)
    assert translator.denoiser.calls == before
    fresh = Translator(checkpoints["pixel"], device="cpu")
    expected = fresh.generate(fresh.invert(cells, "control", steps=10, channel_axis=0), "treated", strength=0.4)
    np.testing.assert_array_equal(scrubbed.normalised, expected.normalised)
    assert scrubbed.reconstruction_psnr == expected.reconstruction_psnr


def test_prefetch_stops_before_the_cache_forgets_what_it_made(checkpoints, cells):
    from phenotwin import Translator
    from phenotwin.progress import drive

    translator = Translator(checkpoints["pixel"], device="cpu")
    translator.cache_budget = 5 * cells.size * 4  # five images: two strengths and their reconstructions
    inversion = translator.invert(cells, "control", steps=10, channel_axis=0)
    assert drive(translator.prefetch_steps(inversion, [0.5, 0.6, 0.4, 0.3], target="treated")) == 2
    held = [(c, s) for c in ("control", "treated") for s in (0.3, 0.4, 0.5, 0.6) if inversion.is_cached(c, s)]
    assert held == [("control", 0.5), ("control", 0.6), ("treated", 0.5), ("treated", 0.6)]


def test_lower_strength_keeps_more_of_the_image(translators, cells):
    translator = translators["pixel"]
    inversion = translator.invert(cells, "control", steps=20, channel_axis=0)
    changes = [translator.generate(inversion, "treated", strength=s).heatmap.mean() for s in (0.1, 0.5, 1.0)]
    assert changes[0] < changes[1] < changes[2]


def test_target_class_changes_the_result_and_guidance_counts(translators, cells):
    translator = translators["stable-diffusion"]
    inversion = translator.invert(cells, "control", steps=10, channel_axis=0)
    to_treated = translator.generate(inversion, "treated")
    to_control = translator.generate(inversion, "control")
    assert np.abs(to_treated.normalised - to_control.normalised).mean() > 1e-3
    guided = translator.generate(inversion, "treated", guidance=3.0, reconstruct=False)
    assert np.abs(guided.normalised - to_treated.normalised).mean() > 1e-4
    assert guided.guidance == 3.0


def test_progress_is_reported_per_step(translators, cells):
    events = []
    translators["pixel"].translate(cells, 0, 1, steps=8, strength=0.5, channel_axis=0, progress=events.append)
    # Half strength inverts only half the way (4 of 8 steps), then generates back down.
    assert [(e.stage, e.step, e.total) for e in events] == [("invert", i, 4) for i in range(1, 5)] + [
        ("generate", i, 4) for i in range(1, 5)
    ]


def test_trailing_timesteps_have_as_many_levels_as_steps_and_none_below_zero():
    """diffusers' "trailing" spacing (zero-SNR models, the demo model) adds a level t = -1 for
    some step counts; the schedulers phenotwin uses must not."""
    import json

    from phenotwin.assets import demo_model_path
    from phenotwin.pipeline.schedulers import inference_schedulers

    config = json.loads((demo_model_path() / "scheduler" / "scheduler_config.json").read_text())
    assert config["timestep_spacing"] == "trailing"
    for steps in [61, 103, 121, 201, *range(1, 60, 7), 100]:
        inverse, sampler = inference_schedulers(config, steps)
        levels = sampler.timesteps.tolist()
        assert len(levels) == steps and min(levels) >= 0 and levels == sorted(set(levels), reverse=True), steps
        assert inverse.timesteps.flip(0).tolist() == levels


def test_an_odd_step_count_on_the_demo_model_reports_and_runs_the_steps_it_says():
    from phenotwin import Translator
    from phenotwin.assets import demo_model_path
    from phenotwin.synthetic import make_pairs

    translator = Translator(demo_model_path(), device="cpu")
    image = make_pairs(1, size=64, channels=2, seed=0).control[0]
    events = []
    translator.translate(image, "control", "nocodazole", steps=61, strength=0.5, channel_axis=0,
                         progress=events.append)
    assert all(e.step <= e.total for e in events)  # a widget's progress bar refuses anything else
    assert [e.step for e in events if e.stage == "invert"] == list(range(1, round(0.5 * 61) + 1))  # as deep as needed
    assert [e.step for e in events if e.stage == "generate"] == list(range(1, round(0.5 * 61) + 1))


def test_cancel_stops_within_one_step(translators, cells):
    translator = translators["pixel"]
    cancel = threading.Event()
    seen = []

    def progress(event):
        seen.append(event)
        if len(seen) == 3:
            cancel.set()

    before = translator.denoiser.calls
    with pytest.raises(Cancelled):
        translator.translate(cells, "control", "treated", steps=50, channel_axis=0, progress=progress, cancel=cancel)
    assert translator.denoiser.calls - before == 3


def test_generator_form_returns_the_result(translators, cells):
    steps = translators["pixel"].translate_steps(cells, "control", "treated", steps=4, channel_axis=0)
    events = []
    while True:
        try:
            events.append(next(steps))
        except StopIteration as done:
            result = done.value
            break
    assert len(events) == 8
    assert result.target == "treated" and result.image.shape == cells.shape


def test_units_dtype_and_layout_come_back(translators, cells):
    translator = translators["pixel"]
    raw = (cells.transpose(1, 2, 0) * 4000 + 100).astype(np.uint16)  # channels last, 16-bit
    result = translator.translate(raw, "control", "treated", steps=10, channel_axis=-1)
    assert result.image.dtype == np.uint16 and result.image.shape == raw.shape
    assert result.heatmap.shape == raw.shape[:2] and result.heatmap_channels.shape == (2, 32, 32)
    # fixed normalisation [0, 1]: uint16 values above 1 saturate, so compare in model units
    assert result.heatmap.dtype == np.float32 and np.isfinite(result.heatmap).all()
    meta = result.metadata()
    assert meta["source"] == "control" and meta["target"] == "treated" and meta["steps"] == 10
    assert meta["checkpoint"] == translator.checkpoint_id


def test_percentile_normalisation_maps_back_to_input_units(tmp_path, cells):
    from phenotwin import Translator
    from phenotwin.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "m", channels=1, normalization={"mode": "percentile", "low": 0.5, "high": 99.5})
    translator = Translator(path, device="cpu")
    raw = (cells[0] * 3000 + 500).astype(np.uint16)
    result = translator.translate(raw, "control", "control", steps=20)
    assert result.image.dtype == np.uint16 and result.image.shape == raw.shape
    assert abs(float(result.image.mean()) - float(raw.mean())) < 100
    assert result.image.min() >= np.percentile(raw, 0.5) - 1 and result.image.max() <= np.percentile(raw, 99.5) + 1


def test_input_is_never_modified(translators, cells):
    image = (cells * 255).astype(np.uint8)
    copy = image.copy()
    image.flags.writeable = False  # would raise if anything wrote into it
    translators["pixel"].translate(image, "control", "treated", steps=4, channel_axis=0)
    np.testing.assert_array_equal(image, copy)


def test_small_images_are_padded_with_a_warning(translators, cells):
    image = cells[:, :24, :20]  # model is 32 x 32
    with pytest.warns(PhenotwinWarning, match="padded"):
        result = translators["pixel"].translate(image, "control", "treated", steps=4, channel_axis=0)
    assert result.image.shape == image.shape and result.heatmap.shape == (24, 20)


@pytest.mark.parametrize("kind", ["pixel", "latent", "stable-diffusion"])
def test_large_fields_are_translated_by_tiles(translators, kind):
    from scipy.ndimage import gaussian_filter

    translator = translators[kind]
    rng = np.random.default_rng(1)
    field = np.stack([gaussian_filter(rng.random((80, 72)), 2) for _ in range(2)]).astype(np.float32)
    field = (field - field.min()) / (field.max() - field.min())
    with warnings.catch_warnings():
        warnings.simplefilter("error", PhenotwinWarning)  # no resizing, no padding warning
        inversion = translator.invert(field, "control", steps=50, channel_axis=0)
    same = translator.generate(inversion, "control")
    assert same.image.shape == field.shape
    if kind == "pixel":
        assert same.reconstruction_psnr > 30


def test_tiles_agree_with_an_untiled_translation_and_leave_no_seams(checkpoints):
    """Tiled translation of a 96 x 96 field against the UNet run on the whole field at once."""
    from scipy.ndimage import gaussian_filter

    from phenotwin import Translator
    from phenotwin.modeling.denoiser import tile_starts

    tiled_translator = Translator(checkpoints["pixel"], device="cpu")
    whole_translator = Translator(checkpoints["pixel"], device="cpu")
    whole_translator.denoiser.tiling = False
    rng = np.random.default_rng(2)
    field = np.stack([gaussian_filter(rng.random((96, 96)), 2) for _ in range(2)]).astype(np.float32)
    field = (field - field.min()) / (field.max() - field.min())
    tiled = tiled_translator.translate(field, "control", "treated", steps=10, channel_axis=0)
    whole = whole_translator.translate(field, "control", "treated", steps=10, channel_axis=0)
    starts = tile_starts(96, 32, tiled_translator.denoiser.tile_overlap)
    tiles = len(starts) ** 2
    batches = -(-tiles // 8) + -(-2 * tiles // 8)  # inversion; generation of target + reconstruction
    assert tiled_translator.denoiser.calls == 10 * batches
    assert whole_translator.denoiser.calls == 20
    source = field * 2 - 1
    change = np.abs(whole.normalised - source).mean()
    disagreement = np.abs(tiled.normalised - whole.normalised)[:, 8:-8, 8:-8].mean()
    assert disagreement < 0.5 * change
    # seams: the change jumps no more across tile borders than across any other column
    jumps = np.abs(np.diff(tiled.normalised - source, axis=2)).mean(axis=(0, 1))
    borders = [s + 32 - 1 for s in starts[:-1]] + [s - 1 for s in starts[1:]]
    assert jumps[borders].mean() < 1.5 * np.median(jumps)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda im: im[:1], "1 channel.*trained on 2"),
        (lambda im: np.concatenate([im, im[:1]]), "3 channel.*trained on 2"),
        (lambda im: np.where(np.arange(32) == 5, np.nan, im), "NaN"),
        (lambda im: np.where(np.arange(32) == 5, np.inf, im), "infinite"),
        (lambda im: np.full_like(im, 0.3), "constant"),
        (lambda im: im[:, :12, :12], "at least 16x16"),
        (lambda im: im[None], "4-D"),
        (lambda im: im.astype(bool), "dtype bool"),
    ],
)
def test_bad_images_are_rejected_clearly(translators, cells, change, message):
    with pytest.raises(PhenotwinError, match=message):
        translators["pixel"].translate(change(cells), "control", "treated", channel_axis=0)


def test_three_d_without_channel_axis_explains_both_readings(translators, cells):
    with pytest.raises(PhenotwinError, match="channel_axis.*stack"):
        translators["pixel"].translate(cells, "control", "treated")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "mutant"}, "unknown condition 'mutant'.*'control', 'treated'"),
        ({"target": "Treated"}, "unknown condition 'Treated'"),
        ({"strength": 0.0}, r"strength must be in \(0, 1\]"),
        ({"strength": 1.5}, r"strength must be in \(0, 1\]"),
        ({"steps": 0}, "steps must be a whole number"),
        ({"guidance": -1.0}, "guidance must be a number from 0"),
    ],
)
def test_bad_settings_are_rejected_before_any_work(translators, cells, kwargs, message):
    translator = translators["pixel"]
    before = translator.denoiser.calls
    settings = {"source": "control", "target": "treated", **kwargs}
    with pytest.raises(PhenotwinError, match=message):
        translator.translate_steps(cells, channel_axis=0, **settings)
    assert translator.denoiser.calls == before


def test_inversion_from_another_model_is_refused(translators, cells):
    inversion = translators["pixel"].invert(cells, "control", steps=2, channel_axis=0)
    with pytest.raises(PhenotwinError, match="another model"):
        translators["latent"].generate(inversion, "treated")


def test_device_auto_prefers_cuda_then_mps(monkeypatch):
    import torch

    from phenotwin.modeling.denoiser import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto").type == "cpu"
    assert pick_device("cpu").type == "cpu"


def test_no_warning_at_native_size(translators, cells):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PhenotwinWarning)
        translators["pixel"].translate(cells, "control", "treated", steps=2, channel_axis=0)


def test_reference_modes(checkpoints, cells):
    from phenotwin import Translator

    relative = Translator(checkpoints["pixel"], device="cpu")
    plain = Translator(checkpoints["pixel"], device="cpu", reference="input")
    inversion = relative.invert(cells, "control", steps=8, channel_axis=0)
    shown = relative.generate(inversion, "treated")
    reconstruction = shown.reconstruction  # the source class (control) at 8 steps
    np.testing.assert_array_equal(reconstruction, inversion.rendering("control", 1.0))
    expected = np.clip(inversion.normalised + shown.generated - reconstruction, -1, 1)
    np.testing.assert_allclose(shown.normalised, expected, atol=1e-6)
    np.testing.assert_allclose(shown.heatmap, np.abs(expected - inversion.normalised).sum(0) / 2, atol=1e-5)
    raw = plain.translate(cells, "control", "treated", steps=8, channel_axis=0)
    np.testing.assert_allclose(raw.normalised, raw.generated)
    np.testing.assert_allclose(raw.generated, shown.generated, atol=1e-5)  # same model output either way
    assert raw.metadata()["reference"] == "input" and shown.metadata()["reference"] == "reconstruction"
    with pytest.raises(PhenotwinError, match="reference must be one of"):
        Translator(checkpoints["pixel"], device="cpu", reference="source")


def test_confine_keeps_what_the_condition_leaves_alone_on_the_demo_model(torch_one_thread):
    """The edit mask of the demo model: high where the Golgi changes, low elsewhere and in the
    nucleus channel, which the condition does not touch; the confined translation changes the
    nucleus far less than an unconfined one and keeps most of the Golgi's change."""
    from phenotwin import Translator
    from phenotwin.assets import demo_model_path
    from phenotwin.pipeline.edit_mask import CONFINE_CALLS
    from phenotwin.synthetic import as_camera_units, make_pairs

    translator = Translator(demo_model_path(), device="cpu")
    pairs = make_pairs(2, size=64, channels=2, seed=0, start=100_000)
    for i in range(2):
        inversion = translator.invert(as_camera_units(pairs.control[i]), "control", steps=50, channel_axis=0)
        free = translator.generate(inversion, "nocodazole", strength=0.5, confine=False)
        before = translator.denoiser.calls
        assert not translator.is_generated(inversion, "nocodazole", 0.5, confine=True)
        confined = translator.generate(inversion, "nocodazole", strength=0.5, confine=True)
        assert translator.denoiser.calls - before == CONFINE_CALLS  # the mask; the generations were cached
        assert translator.is_generated(inversion, "nocodazole", 0.5, confine=True)
        mask, changed = confined.edit_mask, pairs.change_mask[i]
        assert mask.shape == inversion.normalised.shape and mask.min() >= 0 and mask.max() == 1
        assert mask[1][changed].mean() > 5 * mask[1][~changed].mean()
        assert mask[0].mean() < 0.2 * mask[1][changed].mean()  # the nucleus channel
        change = np.abs(confined.normalised - inversion.normalised)
        free_change = np.abs(free.normalised - inversion.normalised)
        assert change[0].mean() < 0.5 * free_change[0].mean()  # the nucleus channel
        assert change[1][changed].mean() > 0.5 * free_change[1][changed].mean()  # the phenotype stays
        assert confined.metadata()["confine"] and not free.metadata()["confine"]


@pytest.mark.parametrize("kind", ["pixel", "latent", "stable-diffusion"])
def test_confine_works_for_every_kind_and_tiled_inputs(translators, kind):
    from scipy.ndimage import gaussian_filter

    from phenotwin.pipeline.edit_mask import CONFINE_CALLS

    translator = translators[kind]
    rng = np.random.default_rng(2)
    field = np.stack([gaussian_filter(rng.random((40, 48)), 2) for _ in range(2)]).astype(np.float32)
    inversion = translator.invert(field, "control", steps=6, channel_axis=0)
    events = []
    result = translator.generate(inversion, "treated", confine=True, progress=events.append)
    assert [e.step for e in events if e.stage == "edit mask"] == list(range(1, CONFINE_CALLS + 1))
    mask = result.edit_mask
    assert mask.shape == (2, 40, 48) and 0 <= mask.min() < mask.max() == 1
    expected = np.clip(inversion.normalised + mask * (result.generated - result.reconstruction), -1, 1)
    np.testing.assert_allclose(result.normalised, expected, atol=1e-6)


def test_a_rough_edit_mask_is_completed_later_into_the_full_one_bit_for_bit(translators, cells):
    """`mask_draws=1` (the widget's preview) costs one call per noise level and is rougher; the full mask
    made later on the same inversion, or on another one that adopted its terms (the translation after
    its preview), adds only the missing draws and equals a full mask made at once."""
    from phenotwin.pipeline.edit_mask import CONFINE_CALLS, CONFINE_LEVELS, adopt_edit_masks, mask_calls_left

    translator = translators["pixel"]
    alone = translator.invert(cells, "control", steps=6, channel_axis=0)
    full = translator.generate(alone, "treated", confine=True).edit_mask

    rough_inversion = translator.invert(cells, "control", steps=6, channel_axis=0)
    events = []
    rough = translator.generate(rough_inversion, "treated", confine=True, progress=events.append,
                                settings=TranslationSettings(mask_draws=1))
    assert [e.step for e in events if e.stage == "edit mask"] == list(range(1, len(CONFINE_LEVELS) + 1))
    assert not np.array_equal(rough.edit_mask, full)  # other draws, another mask
    assert rough.edit_mask.max() == 1 and rough.metadata()["mask_draws"] == 1
    assert mask_calls_left(rough_inversion, 1, 1) == 0  # the rough mask is kept as its terms: no call again
    assert mask_calls_left(rough_inversion, 1, 4) == CONFINE_CALLS - len(CONFINE_LEVELS)

    other = translator.invert(cells, "control", steps=8, channel_axis=0)  # another inversion of the same image
    adopt_edit_masks(rough_inversion, other)
    events = []
    completed = translator.generate(other, "treated", confine=True, progress=events.append)
    assert [e.step for e in events if e.stage == "edit mask"] == list(range(1, CONFINE_CALLS - len(CONFINE_LEVELS) + 1))
    np.testing.assert_array_equal(completed.edit_mask, full)
    assert not other.mask_terms  # the full mask is cached, its terms let go
    again = translator.generate(rough_inversion, "treated", confine=True, settings=TranslationSettings(mask_draws=1))
    np.testing.assert_array_equal(again.edit_mask, rough.edit_mask)  # the rough mask is the same each time


@pytest.mark.parametrize("draws", [0, 5, 1.5, True])
def test_mask_draws_out_of_range_are_refused(translators, draws):
    with pytest.raises(PhenotwinError, match="mask_draws must be a whole number from 1 to 4"):
        translators["pixel"].resolve(mask_draws=draws)


def test_confine_to_the_source_condition_changes_nothing_and_costs_nothing(translators, cells):
    translator = translators["pixel"]
    inversion = translator.invert(cells, "control", steps=6, channel_axis=0)
    translator.generate(inversion, "control")
    before = translator.denoiser.calls
    same = translator.generate(inversion, "control", confine=True)
    assert translator.denoiser.calls == before
    np.testing.assert_array_equal(same.normalised, inversion.normalised)
    assert not same.edit_mask.any()
    with pytest.raises(PhenotwinError, match="confine must be true or false"):
        translator.generate(inversion, "treated", confine="yes")
