"""TranslationSettings: one object, one validator, defaults in one place (torch-free)."""

from __future__ import annotations

import math

import pytest

from phenotwin import PhenotwinError, TranslationSettings
from phenotwin.checkpoint import CheckpointInfo
from phenotwin.pipeline.settings import MODEL_DEFAULTS, model_defaults

INFO = CheckpointInfo(kind="pixel", classes=["control", "treated"], image_size=32, channels=1,
                      defaults={"steps": 100, "strength": 0.4, "confine": True})


def test_unset_fields_take_the_model_defaults_then_the_built_in_ones():
    resolved = TranslationSettings(target=1).resolve(INFO, 1000)
    assert resolved.target == "treated" and resolved.source is None  # an index comes back as its name
    assert (resolved.steps, resolved.strength, resolved.confine) == (100, 0.4, True)  # phenotwin.json
    assert (resolved.guidance, resolved.reference, resolved.inversion_refinements) == (0.0, "reconstruction", 0)
    assert resolved.used_steps == 40
    explicit = TranslationSettings(strength=1.0, confine=False, steps=10).resolve(INFO, 1000)
    assert (explicit.strength, explicit.confine, explicit.steps, explicit.used_steps) == (1.0, False, 10, 10)


def test_a_checkpoint_without_defaults_gets_the_one_set_written_in_settings():
    bare = CheckpointInfo(kind="pixel", classes=["a", "b"], image_size=32, channels=1, defaults={})
    assert bare.defaults == MODEL_DEFAULTS
    assert TranslationSettings().resolve(bare, 1000) == model_defaults().resolve(bare, 1000)


def test_replace_keeps_a_value_when_given_none():
    settings = TranslationSettings(source="control", strength=0.5)
    assert settings.replace(strength=None, target="treated") == TranslationSettings("control", "treated", 0.5)


def test_the_used_steps_round_like_the_cache_keys_and_never_reach_zero():
    steps = [TranslationSettings(strength=s, steps=61).resolve(INFO, 1000).used_steps for s in (0.001, 0.5, 1.0)]
    assert steps == [1, 30, 61]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("strength", 0.0, r"strength must be in \(0, 1\]"),
    ("strength", math.nan, r"strength must be in \(0, 1\]"),
    ("strength", True, r"strength must be in \(0, 1\]"),
    ("steps", 1001, "steps must be a whole number from 1 to 1000"),
    ("steps", 2.5, "steps must be a whole number"),
    ("guidance", math.inf, "guidance must be a number from 0"),
    ("guidance", -0.5, "guidance must be a number from 0"),
    ("confine", "yes", "confine must be true or false"),
    ("seed", -1, "seed must be a whole number >= 0"),
    ("reference", "source", "reference must be one of reconstruction, input"),
    ("inversion_refinements", 1.5, "inversion_refinements must be a whole number, 0 or more"),
    ("inversion_refinements", -1, "inversion_refinements must be a whole number, 0 or more"),
    ("sigma", -1.0, "sigma .* must be a number >= 0"),
    ("sigma", math.nan, "sigma .* must be a number >= 0"),
    ("source", "Control", "unknown condition 'Control'"),
    ("target", 2, "unknown condition 2"),
])
def test_every_bad_value_is_refused_with_the_fix(field, value, message):
    with pytest.raises(PhenotwinError, match=message):
        TranslationSettings(**{field: value}).resolve(INFO, 1000)


def test_stored_defaults_with_an_unknown_key_are_refused_not_dropped():
    with pytest.raises(PhenotwinError, match="unknown setting.*strenght"):
        model_defaults({"strenght": 0.3})


def test_settings_round_trip_through_a_dict():
    settings = TranslationSettings("control", "treated", 0.5, 20, 1.0, True, 3, "input", 1, True, 2.0, True)
    assert TranslationSettings.from_dict(settings.to_dict()) == settings


def test_a_model_whose_stored_defaults_are_bad_is_refused_at_load_naming_its_file(tmp_path):
    import json

    from phenotwin import CheckpointError, Translator
    from phenotwin.testing import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "m")
    info = json.loads((model / "phenotwin.json").read_text())
    info["defaults"]["strength"] = 0
    (model / "phenotwin.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="defaults in .*m.*strength must be in"):
        Translator(model, device="cpu")
    with pytest.raises(PhenotwinError, match="reference must be one of") as caught:
        Translator(make_tiny_checkpoint(tmp_path / "ok"), device="cpu", reference="raw")
    assert not isinstance(caught.value, CheckpointError)  # the argument was wrong, not the model
