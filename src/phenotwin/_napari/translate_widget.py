"""The "Translate cells" dock widget: load a model once, translate image layers, scrub strength.

All model work runs in napari generator workers that yield after each diffusion step, so the
viewer never freezes, Cancel stops at the next step and progress shows in the activity
panel. The widget calls the same `Translator` as the CLI and the tests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal
from qtpy.QtCore import QTimer

from phenotwin.errors import PhenotwinError

if TYPE_CHECKING:
    import napari

    from phenotwin.translate import Inversion, Translation, Translator

POOR_RECONSTRUCTION_DB = 25.0
FAIR_RECONSTRUCTION_DB = 32.0
SCRUB_DEBOUNCE_MS = 120
ROLE_KEY = "phenotwin"

_loaded_translators: dict[str, Translator] = {}
_open_widgets: list[TranslateWidget] = []  # so the Train widget can hand a new model over


def forget_translator(path) -> None:
    """Drop a cached model so the next load reads the folder again (after retraining it)."""
    _loaded_translators.pop(str(Path(path).resolve()), None)


def translate_widget_of(viewer) -> TranslateWidget | None:
    """The open Translate widget of `viewer`, if any."""
    # napari hands plugins a proxy of the viewer, so compare what the proxies wrap.
    def unwrapped(v):
        return getattr(v, "__wrapped__", v)

    return next((widget for widget in _open_widgets if unwrapped(widget.viewer) is unwrapped(viewer)), None)


def _load_translator(path: str) -> Translator:
    """Load once per process; every widget and every run reuses the same model."""
    from phenotwin.translate import Translator

    key = str(Path(path).resolve())
    if key not in _loaded_translators:
        _loaded_translators[key] = Translator(key)
    return _loaded_translators[key]


def quality_hint(psnr: float) -> str:
    """Plain-language verdict on the reconstruction PSNR."""
    if not np.isfinite(psnr):
        return "Reconstruction: not measured"
    if psnr < POOR_RECONSTRUCTION_DB:
        return (f"Reconstruction {psnr:.1f} dB: POOR. The model cannot reproduce this image, so do not trust the "
                "translation. Is it like the training images (magnification, channels, intensities)?")
    if psnr < FAIR_RECONSTRUCTION_DB:
        return f"Reconstruction {psnr:.1f} dB: fair. Small changes in the translation may be reconstruction error."
    return f"Reconstruction {psnr:.1f} dB: good. The model reproduces this image faithfully."


@dataclass
class SourcePlanes:
    """What a run translates: a copy of the selected plane(s), and how to place results."""

    layers: list[Image]
    image: np.ndarray  # (C, H, W) copy
    scale: tuple[float, float]
    translate: tuple[float, float]
    fingerprint: str


class TranslateWidget(Container):
    """Dock widget: model, layers per channel, conditions, strength slider, Run / Cancel."""

    model_loaded = Signal(object)  # the Translator, once a model is ready
    translated = Signal(object)  # each Translation shown

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.translator: Translator | None = None
        self.inversion: Inversion | None = None
        self._inversion_key: tuple | None = None
        self._sources: SourcePlanes | None = None
        self._worker = None
        self._pbar = None
        self._scrub_pending = False
        self._requested_model: str | None = None
        self._closed = False  # set when Qt destroys the widget; late worker results are then dropped
        self.last_result: Translation | None = None

        from phenotwin.models import demo_model_path

        demo = demo_model_path()
        self.model_path = FileEdit(mode="d", label="Model folder", value=str(demo) if demo else "")
        self.load_button = PushButton(text="Load model")
        self.model_info = Label(value="No model loaded.")
        self.channel_pickers = Container(labels=True, label="Image")
        self.source = ComboBox(label="From condition", choices=self._conditions)
        self.target = ComboBox(label="To condition", choices=self._conditions)
        self.strength = FloatSlider(label="Strength", min=0.02, max=1.0, step=0.01, value=1.0,
                                    tooltip="How far to invert: 1 = all the way to noise (strongest change).")
        self.steps = SpinBox(label="Steps", min=2, max=1000, value=50, tooltip="DDIM steps for inversion and generation")
        self.guidance = FloatSpinBox(label="Guidance", min=0.0, max=20.0, step=0.5, value=0.0,
                                     tooltip="Classifier-free guidance; 0 = none")
        self.seed = SpinBox(label="Seed", min=0, max=2**31 - 1, value=0)
        self.run_button = PushButton(text="Translate")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress_bar = ProgressBar(label="Progress", min=0, max=1, value=0, visible=False)
        self.status = Label(value="")
        self.quality = Label(value="")
        self.compare_button = PushButton(text="Before / after", enabled=False)
        self.side_by_side = CheckBox(text="Side by side (grid)", value=False)
        self.extend([
            self.model_path, self.load_button, self.model_info, self.channel_pickers, self.source, self.target,
            self.strength, self.steps, self.guidance, self.seed, self.run_button, self.cancel_button,
            self.progress_bar, self.status, self.quality, self.compare_button, self.side_by_side,
        ])
        for widget in (self.quality, self.model_info, self.status):
            widget.native.setWordWrap(True)

        self._scrub_timer = QTimer()
        self._scrub_timer.setSingleShot(True)
        self._scrub_timer.setInterval(SCRUB_DEBOUNCE_MS)
        self._scrub_timer.timeout.connect(self._scrub)

        self.load_button.changed.connect(lambda: self.load_model(str(self.model_path.value)))
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.strength.changed.connect(self._on_generation_setting)
        self.target.changed.connect(self._on_generation_setting)
        self.guidance.changed.connect(self._on_generation_setting)
        self.compare_button.changed.connect(self.toggle_before_after)
        self.side_by_side.changed.connect(self._on_side_by_side)
        events = self.viewer.layers.events
        events.inserted.connect(self._refresh_layer_choices)
        events.removed.connect(self._on_layer_removed)
        events.reordered.connect(self._refresh_layer_choices)
        self.native.destroyed.connect(self._on_destroyed)
        _open_widgets.append(self)
        self._build_channel_pickers(["image"])
        if demo:
            self.load_model(str(demo))

    # -- model ---------------------------------------------------------------------------

    def load_model(self, path: str) -> None:
        """Load a checkpoint in a worker (first time only), then fill the pickers from it."""
        if not path or not Path(path).is_dir():
            show_error(f"Model folder {path!r} does not exist. Choose the folder that contains phenotwin.json.")
            return
        self.model_info.value = f"Loading {Path(path).name}..."
        self.load_button.enabled = False
        self._requested_model = str(Path(path).resolve())
        worker = create_worker(_load_translator, path)
        worker.returned.connect(self._on_model_loaded)
        worker.errored.connect(lambda err: self._on_error(err, "Could not load the model"))
        worker.finished.connect(lambda: self._closed or setattr(self.load_button, "enabled", True))
        worker.start()
        self._loader = worker

    def _on_model_loaded(self, translator: Translator) -> None:
        if self._closed or str(translator.checkpoint_path.resolve()) != self._requested_model:
            return  # an earlier request finished after a newer one: keep the newer
        self.translator = translator
        self.inversion, self._inversion_key = None, None
        info = translator.info
        names = info.channel_names or ([f"channel {i + 1}" for i in range(info.channels)] if info.channels > 1 else ["image"])
        self.source.reset_choices()
        self.target.reset_choices()
        self.source.value, self.target.value = info.classes[0], info.classes[1]
        self._build_channel_pickers(list(names))
        self.strength.value = float(info.defaults.get("strength", 1.0))
        self.steps.value = int(info.defaults.get("steps", 50))
        self.guidance.value = float(info.defaults.get("guidance", 0.0))
        trained = info.provenance.get("steps")
        self.model_info.value = (
            f"{translator.checkpoint_id}: {info.kind} model, {info.image_size}x{info.image_size} px, "
            f"{info.channels} channel(s) ({', '.join(names)}), conditions: {', '.join(info.classes)}"
            + (f", trained {trained} steps" if trained else "") + f". Device: {translator.device.type}."
        )
        self._guess_source_condition()
        self.model_loaded.emit(translator)

    def _conditions(self, _widget=None) -> list[str]:
        return self.translator.classes if self.translator is not None else []

    def _build_channel_pickers(self, names: list[str]) -> None:
        self.channel_pickers.clear()
        for name in names:
            picker = ComboBox(label=name, choices=self._image_layers, nullable=False)
            picker.changed.connect(self._guess_source_condition)
            self.channel_pickers.append(picker)
        self._refresh_layer_choices()

    def _image_layers(self, _widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and layer.metadata.get(ROLE_KEY, {}).get("role") is None]

    def _refresh_layer_choices(self, event=None) -> None:
        pickers = list(self.channel_pickers)
        for picker in pickers:
            picker.reset_choices()
        self._default_channel_layers(pickers)

    def _default_channel_layers(self, pickers) -> None:
        """Pick distinct layers for the channels, matching channel names in layer names when possible."""
        layers = [layer for _, layer in self._image_layers()]
        if not layers:
            return
        taken = set()
        for picker in pickers:
            if picker.value is not None and picker.value in layers and len(pickers) == 1:
                return
            match = next((layer for layer in layers if picker.label.lower() in layer.name.lower()
                          and id(layer) not in taken), None)
            if match is None:
                match = next((layer for layer in layers if id(layer) not in taken), layers[0])
            taken.add(id(match))
            picker.value = match

    def _guess_source_condition(self, *_):
        """If the selected layer says which condition it shows (metadata), use it as the source."""
        if self.translator is None or not len(self.channel_pickers):
            return
        layer = self.channel_pickers[0].value
        condition = getattr(layer, "metadata", {}).get(ROLE_KEY, {}).get("condition") if layer is not None else None
        if condition in self.translator.classes:
            self.source.value = condition
            others = [c for c in self.translator.classes if c != condition]
            if self.target.value == condition and others:
                self.target.value = others[0]

    # -- reading the selected layers -----------------------------------------------------

    def _read_sources(self) -> SourcePlanes:
        layers = [picker.value for picker in self.channel_pickers]
        if any(layer is None for layer in layers):
            raise PhenotwinError("select an image layer for every channel the model needs.")
        planes = []
        for layer in layers:
            if not isinstance(layer, Image):
                raise PhenotwinError(f"layer {layer.name!r} is a {type(layer).__name__} layer; choose an image layer.")
            if layer.rgb:
                raise PhenotwinError(
                    f"layer {layer.name!r} is RGB but the model expects {self.translator.channels} fluorescence "
                    "channel(s). Split it into channels (right-click the layer > Split RGB) and pick them."
                )
            planes.append(self._current_plane(layer))
        shapes = {plane.shape for plane in planes}
        if len(shapes) > 1:
            raise PhenotwinError(f"the selected layers have different sizes {sorted(shapes)}; pick matching channels.")
        image = np.stack(planes)
        digest = hashlib.blake2b(image.tobytes(), digest_size=12).hexdigest()
        first = layers[0]
        return SourcePlanes(layers=layers, image=image, scale=tuple(first.scale[-2:]),
                            translate=tuple(first.translate[-2:]), fingerprint=digest)

    def _current_plane(self, layer: Image) -> np.ndarray:
        """The 2-D plane of `layer` shown now (a copy: the layer is never modified)."""
        data = layer.data
        if getattr(layer, "multiscale", False):
            data = data[0]
        if data.ndim > 2:
            point = layer.world_to_data(self.viewer.dims.point)
            index = tuple(int(np.clip(round(p), 0, n - 1)) for p, n in zip(point[:-2], data.shape[:-2]))
            data = data[index]
        return np.array(data, copy=True)

    # -- running ---------------------------------------------------------------------------

    def run(self, *_):
        """Translate the selected layers: invert (unless cached) then generate."""
        if self.translator is None:
            show_warning("Load a model first (Model folder, then Load model).")
            return
        if self._worker is not None:
            show_info("A translation is already running; Cancel it or wait.")
            return
        try:
            sources = self._read_sources()
            key = (self.translator.checkpoint_id, sources.fingerprint, self.source.value, self.steps.value)
            inverting = None
            if key != self._inversion_key or self.inversion is None:
                inverting = self.translator.invert_steps(sources.image, self.source.value, self.steps.value,
                                                         channel_axis=0)
            self.translator.check_settings(self.source.value, self.target.value, self.strength.value,
                                           self.steps.value, self.guidance.value)
        except (PhenotwinError, ValueError) as err:
            show_error(f"Cannot translate: {err}")
            return
        self._sources = sources
        self._start(self._job(inverting, key, self._generation_settings(reconstruct=True)), "Translating")

    def _generation_settings(self, reconstruct: bool) -> dict[str, Any]:
        """Read in the GUI thread: widgets must not be touched from the worker."""
        return {"target": self.target.value, "strength": self.strength.value, "guidance": self.guidance.value,
                "seed": self.seed.value, "reconstruct": reconstruct}

    def _job(self, inverting, key, settings):
        """Runs in the worker thread: invert if needed, then generate."""
        if inverting is not None:
            self.inversion = yield from inverting
            self._inversion_key = key
        return (yield from self.translator.generate_steps(self.inversion, **settings))

    def _start(self, job, description: str) -> None:
        worker = create_worker(_run_steps, job)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_result)
        worker.errored.connect(lambda err: self._on_error(err, "Translation failed"))
        worker.aborted.connect(lambda: self._closed or setattr(self.status, "value", "Cancelled."))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._stage = None
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress_bar.visible = True
        self.status.value = f"{description}..."
        worker.start()

    def _on_progress(self, event) -> None:
        if self._closed:
            return
        if event.stage != self._stage or self._pbar is None:
            self._stage = event.stage
            if self._pbar is not None:
                self._pbar.close()
            self._pbar = progress(total=event.total, desc=f"phenotwin: {event.stage}")
            self.progress_bar.max = event.total
        self._pbar.n = event.step
        self._pbar.refresh()
        self.progress_bar.value = event.step
        self.status.value = f"{event.stage.capitalize()} step {event.step}/{event.total}"

    def cancel(self, *_):
        """Stop the running translation at its next diffusion step."""
        self._scrub_pending = False
        if self._worker is not None:
            self._worker.quit()

    def _on_destroyed(self, *_):
        """napari is closing or the dock was removed: stop work, touch no (deleted) widget."""
        self._closed = True
        if self._worker is not None:
            self._worker.quit()
        if self in _open_widgets:
            _open_widgets.remove(self)

    def _on_finished(self) -> None:
        if self._closed:
            return
        self._worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        self.progress_bar.visible = False
        if self._scrub_pending:
            self._scrub_pending = False
            self._scrub()

    def _on_error(self, err: Exception, what: str) -> None:
        if self._closed:
            return
        self.status.value = f"{what}."
        if isinstance(err, PhenotwinError):
            show_error(f"{what}: {err}")
        else:
            show_error(f"{what}: {type(err).__name__}: {err}")

    # -- scrubbing -----------------------------------------------------------------------------

    def _on_generation_setting(self, *_):
        """Strength, target or guidance changed: regenerate from the cached inversion (debounced)."""
        if self.inversion is not None and self.last_result is not None:
            self._scrub_timer.start()

    def _scrub(self) -> None:
        if self.inversion is None or self.translator is None:
            return
        if self._worker is not None:
            self._scrub_pending = True  # run once more with the newest value when this one ends
            return
        try:
            self.translator.check_settings(None, self.target.value, self.strength.value, None, self.guidance.value)
        except PhenotwinError as err:
            show_error(str(err))
            return
        settings = self._generation_settings(reconstruct=False)
        self._start(self.translator.generate_steps(self.inversion, **settings), "Updating")

    # -- results ---------------------------------------------------------------------------

    def _on_result(self, result: Translation) -> None:
        if self._closed:
            return
        self.last_result = result
        sources = self._sources
        meta = {**result.metadata(), "source_layers": [layer.name for layer in sources.layers]}
        translated = result.image  # (C, H, W) in the layers' units
        for c, layer in enumerate(sources.layers):
            self._put_layer(
                f"{layer.name} → {result.target}", translated[c], "translation", meta,
                colormap=layer.colormap, blending=layer.blending, contrast_limits=layer.contrast_limits,
                gamma=layer.gamma,
            )
        heat = result.heatmap
        top = float(np.percentile(heat, 99.5)) if heat.size else 0.0
        base = _common_name([layer.name for layer in sources.layers])
        self._put_layer(f"{base} Δ", heat, "heatmap", meta, colormap="inferno", blending="additive", opacity=0.8,
                        contrast_limits=(0.0, max(top, 1e-3)))
        if np.isfinite(result.reconstruction_psnr):
            self.quality.value = quality_hint(result.reconstruction_psnr)
        self.status.value = (f"{result.source} → {result.target} at strength {result.strength:.2f} "
                             f"({result.steps} steps).")
        self.compare_button.enabled = True
        self.translated.emit(result)

    def _put_layer(self, name: str, data: np.ndarray, role: str, meta: dict[str, Any], **style) -> None:
        """Update our result layer in place if it still exists, else add it with the source's geometry."""
        metadata = {ROLE_KEY: {"role": role, **meta}}
        existing = self.viewer.layers[name] if name in self.viewer.layers else None
        if existing is not None and existing.metadata.get(ROLE_KEY, {}).get("role") == role:
            existing.data = data
            existing.metadata = metadata
            if role == "heatmap":
                existing.contrast_limits = style["contrast_limits"]
            return
        self.viewer.add_image(data, name=name, scale=self._sources.scale, translate=self._sources.translate,
                              metadata=metadata, **style)

    def result_layers(self, role: str | None = None) -> list[Image]:
        return [layer for layer in self.viewer.layers
                if layer.metadata.get(ROLE_KEY, {}).get("role") in ((role,) if role else ("translation", "heatmap"))]

    def toggle_before_after(self, *_):
        """Show either the input layers or their translations (the heatmap is left as it is)."""
        if self._sources is None:
            return
        translations = self.result_layers("translation")
        showing_after = any(layer.visible for layer in translations)
        for layer in translations:
            layer.visible = not showing_after
        for layer in self._sources.layers:
            if layer in self.viewer.layers:
                layer.visible = showing_after

    def _on_side_by_side(self, value: bool) -> None:
        """Grid view with input, translation and heatmap each in its own cell: napari's grid
        groups `stride` consecutive layers, so ours go first in the layer list, in that order."""
        if value and self._sources is not None:
            ordered = [layer for layer in self._sources.layers if layer in self.viewer.layers]
            ordered += self.result_layers("translation") + self.result_layers("heatmap")
            for position, layer in enumerate(ordered):
                self.viewer.layers.move(self.viewer.layers.index(layer), position)
        grid = self.viewer.grid
        grid.stride = max(1, len(self.channel_pickers))
        grid.enabled = bool(value)

    def _on_layer_removed(self, event) -> None:
        removed = event.value
        if self._sources is not None and removed in self._sources.layers:
            # The cached inversion belongs to a layer that is gone: the next Run inverts afresh.
            self._inversion_key = None
        self._refresh_layer_choices()


def _run_steps(steps):
    """A generator function for napari's worker: forwards every Progress, returns the result."""
    return (yield from steps)


def _common_name(names: list[str]) -> str:
    """'control nucleus', 'control golgi' -> 'control'."""
    if len(names) == 1:
        return names[0]
    words = [name.split() for name in names]
    common = []
    for group in zip(*words):
        if len(set(group)) > 1:
            break
        common.append(group[0])
    return " ".join(common) or names[0]
