"""The models loaded in this napari process, and the open Translate widgets that use them.

A model is loaded once per process and shared by every widget and every run (reloading
it on each click is the anti-pattern this avoids); the Train widget hands a new model to
the open Translate widget of its viewer. Neither Qt nor torch is imported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from phenotwin.pipeline.translator import Translator

_loaded_translators: dict[str, Translator] = {}
_open_widgets: list[Any] = []  # Translate widgets, so the Train widget can hand a new model over
_remembered: list[str] = []  # model folders met in this process (loaded or trained), newest first


def load_translator(path: str | Path) -> Translator:
    """Load once per process; every widget and every run reuses the same model."""
    from phenotwin import Translator

    key = str(Path(path).resolve())
    if key not in _loaded_translators:
        from phenotwin.cost import time_one_call

        translator = _loaded_translators[key] = Translator(key)
        time_one_call(translator)  # the cost estimate before a run: seconds per model call on this machine
    remember_model(key)
    return _loaded_translators[key]


def remember_model(path: str | Path) -> None:
    """A model folder this process has met (loaded, or trained by the Train widget): a candidate when the
    layers show conditions the loaded model does not know."""
    key = str(Path(path).resolve())
    if key in _remembered:
        _remembered.remove(key)
    _remembered.insert(0, key)


def model_for_conditions(conditions, exclude: str | Path | None = None) -> Path | None:
    """A model that knows all of `conditions`: one met in this process first, then a shipped one."""
    from phenotwin.assets import model_for_conditions as knows
    from phenotwin.assets import shipped_models

    if not conditions:
        return None
    skip = str(Path(exclude).resolve()) if exclude else None
    candidates = dict.fromkeys([*_remembered, *(str(p.resolve()) for p in shipped_models())])
    return knows(conditions, [path for path in candidates if path != skip and Path(path).is_dir()])


def forget_translator(path: str | Path) -> None:
    """Drop a cached model so the next load reads the folder again (after retraining it)."""
    _loaded_translators.pop(str(Path(path).resolve()), None)


def register_widget(widget) -> None:
    _open_widgets.append(widget)


def unregister_widget(widget) -> None:
    if widget in _open_widgets:
        _open_widgets.remove(widget)


def translate_widget_of(viewer):
    """The open Translate widget of `viewer`, if any."""
    # napari hands plugins a proxy of the viewer, so compare what the proxies wrap.
    def unwrapped(v):
        return getattr(v, "__wrapped__", v)

    return next((widget for widget in _open_widgets if unwrapped(widget.viewer) is unwrapped(viewer)), None)


def channel_names(translator: Translator) -> list[str]:
    """The model's channel names, or 'channel 1', ... ('image' for a one-channel model)."""
    info = translator.info
    if info.channel_names:
        return list(info.channel_names)
    return [f"channel {i + 1}" for i in range(info.channels)] if info.channels > 1 else ["image"]


def describe(translator: Translator) -> str:
    """One sentence on the loaded model: what the Translate widget says under Load model."""
    info = translator.info
    names = channel_names(translator)
    return (f"{translator.checkpoint_id}: {info.kind} model, {info.image_size}x{info.image_size} px, "
            f"{info.channels} channel(s) ({', '.join(names)}), conditions: {', '.join(info.classes)}"
            f"{training_summary(info.provenance)}. Device: {translator.device.type}.")


def training_summary(provenance: dict[str, Any]) -> str:
    """', trained 3000 steps', or for a fine-tuning ', fine-tuned 2000 steps from a 3000-step base'."""
    steps = provenance.get("steps")
    if not steps:
        return ""
    base_steps = provenance.get("base", {}).get("provenance", {}).get("steps")
    return f", fine-tuned {steps} steps from a {base_steps}-step base" if base_steps else f", trained {steps} steps"
