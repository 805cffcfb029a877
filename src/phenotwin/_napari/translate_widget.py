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
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal
from qtpy.QtCore import QObject, QTimer
from qtpy.QtCore import Signal as QtSignal

from phenotwin._napari.workers import ActivityBar, Throttle, call, run_steps
from phenotwin.errors import PhenotwinError

if TYPE_CHECKING:
    import napari

    from phenotwin.percell import CellTranslation
    from phenotwin.translate import Inversion, Translation, Translator

POOR_RECONSTRUCTION_DB = 25.0
FAIR_RECONSTRUCTION_DB = 32.0
SCRUB_DEBOUNCE_MS = 120
# After a translation, strengths this far either side of the slider are generated in the
# background (nearest first), so that scrubbing to them is instant.
PREFETCH_RADIUS = 0.25
ROLE_KEY = "phenotwin"
CURRENT_PLANE, ALL_PLANES = "current plane", "all planes"
RGB_NAMES = ("R", "G", "B")
RGB_COLORMAPS = ("red", "green", "blue")
TOP_CELLS = 5

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


@dataclass(frozen=True)
class RGBChannel:
    """One colour channel of an RGB layer, offered as a channel choice of its own."""

    layer: Image
    index: int

    @property
    def name(self) -> str:
        return f"{self.layer.name} [{RGB_NAMES[self.index]}]"

    @property
    def metadata(self) -> dict:
        return self.layer.metadata


@dataclass
class SourcePlanes:
    """What a run translates: a copy of the selected plane(s), and how to place results."""

    layers: list[Image]  # the layer behind each channel (an RGB layer may feed several)
    names: list[str]  # one per channel: the layer's name, or 'photo [G]' for an RGB channel
    rgb_index: list[int | None]  # which RGB channel feeds each model channel, None for grey layers
    image: np.ndarray  # (C, H, W), or (C, *leading, H, W) for all planes of a stack: a copy
    scale: tuple[float, ...]  # of the result layers: the last two axes, or all for a stack
    translate: tuple[float, ...]
    fingerprint: str


@dataclass
class StackTranslation:
    """Every plane of a stack translated: results with the stack's shape."""

    image: np.ndarray  # (C, *leading, H, W) in the layers' units
    heatmap: np.ndarray  # (*leading, H, W)
    metadata: dict[str, Any]
    reconstruction_psnr: float  # the worst plane's


class _TileSignal(QObject):
    """Carries tile progress from the worker thread to the GUI thread (a queued Qt signal)."""

    progressed = QtSignal(int, int)


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
        self._prefetcher = None  # background worker filling the strength cache
        self._prefetched = False  # it finished (was not stopped early)
        self._prefetch_failed: Inversion | None = None  # no retries for an inversion it failed on
        self._cancelled = False
        self._after_prefetch = None  # what runs once it has stopped
        self._activity = ActivityBar()
        self._scrub_pending = False
        self._scrubbing = False  # the running worker is a scrub, which Translate may interrupt
        self._run_pending = False
        self._requested_model: str | None = None
        self._closed = False  # set when Qt destroys the widget; late worker results are then dropped
        self.last_result: Translation | CellTranslation | StackTranslation | None = None
        self.cell_result: CellTranslation | None = None
        self._step_text = ""
        self._stage = None  # of the running job, for its progress lines
        self._tiles = _TileSignal()
        self._updates = Throttle()  # progress and tile lines in the dock
        self._tiles.progressed.connect(self._on_tiles)

        from phenotwin.assets import demo_model_path

        demo = demo_model_path()
        self.model_path = FileEdit(mode="d", label="Model folder", value=str(demo) if demo else "")
        self.load_button = PushButton(text="Load model")
        self.model_info = Label(value="No model loaded.")
        self.channel_pickers = Container(labels=True, label="Image")
        # callable choices: static ones are reset when the widget is docked
        self.planes = ComboBox(label="Stack", choices=lambda _w: [CURRENT_PLANE, ALL_PLANES],
                               tooltip="For layers with time, z or well axes: the plane shown, or every plane")
        self.cells = ComboBox(label="Cells (labels)", choices=self._labels_layers, nullable=True,
                              tooltip="A Labels layer of segmented cells: translate and score cell by cell; "
                                      "empty = the whole image")
        self.source = ComboBox(label="From condition", choices=self._conditions)
        self.target = ComboBox(label="To condition", choices=self._conditions)
        self.strength = FloatSlider(label="Strength", min=0.02, max=1.0, step=0.01, value=1.0,
                                    tooltip="How far to invert: 1 = all the way to noise (strongest change).")
        self.prefetch = CheckBox(text="Precompute nearby strengths", value=True,
                                 tooltip="After a translation, generate the strengths around the slider's in the "
                                         "background so that moving the slider there is instant. It gives way to "
                                         "anything you start.")
        self.prefetch_info = Label(value="", visible=False)
        self.steps = SpinBox(label="Steps", min=2, max=1000, value=50, tooltip="DDIM steps for inversion and generation")
        self.guidance = FloatSpinBox(label="Guidance", min=0.0, max=20.0, step=0.5, value=0.0,
                                     tooltip="Classifier-free guidance; 0 = none")
        self.confine = CheckBox(text="Confine changes to where the conditions differ", value=False,
                                tooltip="Keep the change only where the model's predictions under the two conditions "
                                        "disagree (a soft mask per channel): what the condition does not touch stays "
                                        "(almost) as it was. Switching it costs no new diffusion steps.")
        self.seed = SpinBox(label="Seed", min=0, max=2**31 - 1, value=0)
        self.run_button = PushButton(text="Translate")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress_bar = ProgressBar(label="Progress", min=0, max=1, value=0, visible=False)
        self.status = Label(value="")
        self.quality = Label(value="")
        self.top_cells = Label(value="", visible=False)
        self.export_button = PushButton(text="Export CSV…", enabled=False)
        self.compare_button = PushButton(text="Before / after", enabled=False)
        self.side_by_side = CheckBox(text="Side by side (grid)", value=False)
        self.extend([
            self.model_path, self.load_button, self.model_info, self.channel_pickers, self.planes, self.cells,
            self.source, self.target, self.strength, self.prefetch, self.prefetch_info, self.steps, self.guidance,
            self.confine, self.seed, self.run_button, self.cancel_button, self.progress_bar, self.status, self.quality,
            self.top_cells, self.export_button, self.compare_button, self.side_by_side,
        ])
        for widget in (self.quality, self.model_info, self.status, self.top_cells, self.prefetch_info):
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
        self.confine.changed.connect(self._on_generation_setting)
        self.prefetch.changed.connect(lambda on: self._start_prefetch() if on else self._stop_prefetch_then(None))
        self.compare_button.changed.connect(self.toggle_before_after)
        self.export_button.changed.connect(self._ask_csv_path)
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
        worker = create_worker(call, _load_translator, path,
                               _connect={"errored": lambda err: self._on_error(err, "Could not load the model")},
                               _start_thread=False)
        worker.returned.connect(self._on_model_loaded)
        worker.finished.connect(lambda: self._closed or setattr(self.load_button, "enabled", True))
        worker.start()
        self._loader = worker

    def _on_model_loaded(self, translator: Translator) -> None:
        if self._closed or str(translator.checkpoint_path.resolve()) != self._requested_model:
            return  # an earlier request finished after a newer one: keep the newer
        self._stop_prefetch_then(None)
        self.prefetch_info.visible = False
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
        self.confine.value = bool(info.defaults.get("confine", False))
        self.model_info.value = (
            f"{translator.checkpoint_id}: {info.kind} model, {info.image_size}x{info.image_size} px, "
            f"{info.channels} channel(s) ({', '.join(names)}), conditions: {', '.join(info.classes)}"
            f"{_training_summary(info.provenance)}. Device: {translator.device.type}."
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

    def _image_layers(self, _widget=None) -> list[tuple[str, Image | RGBChannel]]:
        """Image layers (not our results); an RGB layer is offered as its three channels."""
        choices = []
        for layer in self.viewer.layers:
            if not isinstance(layer, Image) or layer.metadata.get(ROLE_KEY, {}).get("role") is not None:
                continue
            if layer.rgb:
                choices += [(channel.name, channel) for channel in (RGBChannel(layer, i) for i in range(3))]
            else:
                choices.append((layer.name, layer))
        return choices

    def _labels_layers(self, _widget=None) -> list[tuple[str, Labels]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Labels) and layer.metadata.get(ROLE_KEY, {}).get("role") is None]

    def _refresh_layer_choices(self, event=None) -> None:
        pickers = list(self.channel_pickers)
        for picker in pickers:
            picker.reset_choices()
        self.cells.reset_choices()
        self._default_channel_layers(pickers)

    def _default_channel_layers(self, pickers) -> None:
        """Pick distinct layers for the channels, matching channel names in layer names when possible."""
        layers = [layer for _, layer in self._image_layers()]
        if not layers:
            return
        chosen = [picker.value for picker in pickers]
        if all(value is not None and value in layers and chosen.count(value) == 1 for value in chosen):
            return  # a distinct, existing layer per channel: keep the user's choice (e.g. when results are added)
        taken = set()
        for picker in pickers:
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

    def _read_sources(self, all_planes: bool = False) -> SourcePlanes:
        layers, names, rgb_index, planes = [], [], [], []
        for choice in (picker.value for picker in self.channel_pickers):
            if choice is None:
                raise PhenotwinError("select an image layer for every channel the model needs.")
            layer, index = (choice.layer, choice.index) if isinstance(choice, RGBChannel) else (choice, None)
            if not isinstance(layer, Image):
                raise PhenotwinError(f"layer {layer.name!r} is a {type(layer).__name__} layer; choose an image layer.")
            data = self._all_planes(layer) if all_planes else self._current_plane(layer)
            planes.append(data if index is None else data[..., index])
            layers.append(layer)
            names.append(choice.name)
            rgb_index.append(index)
        shapes = {plane.shape for plane in planes}
        if len(shapes) > 1:
            raise PhenotwinError(f"the selected layers have different sizes {sorted(shapes)}; pick matching channels.")
        image = np.stack(planes)
        digest = hashlib.blake2b(image.tobytes(), digest_size=12).hexdigest()
        first, axes = layers[0], image.ndim - 1  # result layers have the planes' axes
        return SourcePlanes(layers=layers, names=names, rgb_index=rgb_index, image=image,
                            scale=tuple(first.scale[-axes:]), translate=tuple(first.translate[-axes:]),
                            fingerprint=digest)

    def _current_plane(self, layer: Image | Labels) -> np.ndarray:
        """The 2-D plane of `layer` shown now (a copy: the layer is never modified); RGB keeps its colours."""
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        leading = data.ndim - 2 - int(getattr(layer, "rgb", False))
        if leading > 0:
            point = layer.world_to_data(self.viewer.dims.point)
            index = tuple(int(np.clip(round(p), 0, n - 1)) for p, n in zip(point[:leading], data.shape[:leading]))
            data = data[index]
        return np.array(data, copy=True)

    @staticmethod
    def _all_planes(layer: Image) -> np.ndarray:
        """The whole stack (a copy), leading axes (T, Z, wells) first."""
        return np.array(layer.data[0] if layer.multiscale else layer.data, copy=True)

    # -- running ---------------------------------------------------------------------------

    def run(self, *_):
        """Translate the selected layers: invert (unless cached) then generate."""
        if self.translator is None:
            show_warning("Load a model first (Model folder, then Load model).")
            return
        if self._worker is not None and self._scrubbing:
            # a slider update under way: Translate wins, it reads the slider too
            self._scrub_pending, self._run_pending = False, True
            self._worker.quit()
            return
        if self._worker is not None:
            show_info("A translation is already running; Cancel it or wait.")
            return
        if self._stop_prefetch_then(self.run):
            return
        try:
            cells = self.cells.value
            all_planes = self.planes.value == ALL_PLANES
            if cells is not None and all_planes:
                raise PhenotwinError("per-cell mode translates the plane shown; set Stack to 'current plane', "
                                     "or empty Cells (labels) to translate every plane.")
            sources = self._read_sources(all_planes)
            self.translator.check_settings(self.source.value, self.target.value, self.strength.value,
                                           self.steps.value, self.guidance.value)
            if cells is not None:
                job = self._cells_job(sources, cells)
            elif sources.image.ndim > 3:
                job = self._stack_job(sources.image, self._translation_settings())
            else:
                key = (self.translator.checkpoint_id, sources.fingerprint, self.source.value, self.steps.value)
                inverting = None
                if key != self._inversion_key or self.inversion is None:
                    inverting = self.translator.invert_steps(sources.image, self.source.value, self.steps.value,
                                                             channel_axis=0)
                job = self._job(inverting, key, self._generation_settings(reconstruct=True))
        except (PhenotwinError, ValueError) as err:
            show_error(f"Cannot translate: {err}")
            return
        if cells is not None or sources.image.ndim > 3:
            # results of many inversions: the strength slider cannot scrub them, Translate again instead
            self.inversion, self._inversion_key = None, None
        self._sources = sources
        self._start(job, "Translating")

    def _translation_settings(self) -> dict[str, Any]:
        return {"source": self.source.value, "target": self.target.value, "strength": self.strength.value,
                "steps": self.steps.value, "guidance": self.guidance.value, "seed": self.seed.value,
                "confine": self.confine.value}

    def _cells_job(self, sources: SourcePlanes, cells: Labels):
        """Per-cell translation of the plane shown; inputs are checked here, before the worker starts."""
        from phenotwin.percell import translate_cells_steps

        labels = self._current_plane(cells)
        self._cells_source = (cells.name, labels)
        return translate_cells_steps(self.translator, sources.image, labels, channel_axis=0,
                                     **self._translation_settings())

    def _stack_job(self, image: np.ndarray, settings: dict[str, Any]):
        """Runs in the worker thread: every plane of a (C, *leading, H, W) stack, one after the other."""
        from phenotwin.progress import tagged

        leading = image.shape[1:-2]
        count = int(np.prod(leading))
        translated, heat, worst, result = None, None, float("inf"), None
        for k, index in enumerate(np.ndindex(*leading)):
            plane = image[(slice(None), *index)]
            try:
                result = yield from tagged(self.translator.translate_steps(plane, channel_axis=0, **settings),
                                           k + 1, count, "plane")
            except PhenotwinError as err:
                raise PhenotwinError(f"plane {index}: {err}") from err
            if translated is None:
                translated = np.empty(image.shape, dtype=result.image.dtype)
                heat = np.empty(image.shape[1:], dtype=np.float32)
            translated[(slice(None), *index)] = result.image
            heat[index] = result.heatmap
            worst = min(worst, result.reconstruction_psnr)
        meta = {**result.metadata(), "reconstruction_psnr": worst, "planes": count}
        return StackTranslation(image=translated, heatmap=heat, metadata=meta, reconstruction_psnr=worst)

    def _generation_settings(self, reconstruct: bool) -> dict[str, Any]:
        """Read in the GUI thread: widgets must not be touched from the worker."""
        return {"target": self.target.value, "strength": self.strength.value, "guidance": self.guidance.value,
                "seed": self.seed.value, "reconstruct": reconstruct, "confine": self.confine.value}

    def _job(self, inverting, key, settings):
        """Runs in the worker thread: invert if needed, then generate."""
        if inverting is not None:
            self.inversion = yield from inverting
            self._inversion_key = key
        return (yield from self.translator.generate_steps(self.inversion, **settings))

    def _start(self, job, description: str, scrub: bool = False) -> None:
        worker = create_worker(run_steps, job,
                               _connect={"errored": lambda err: self._on_error(err, "Translation failed")},
                               _start_thread=False)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_result)
        worker.aborted.connect(lambda: self._closed or setattr(self.status, "value", "Cancelled."))
        worker.finished.connect(self._on_finished)
        self._worker, self._cancelled, self._scrubbing = worker, False, scrub
        self.translator.denoiser.tile_progress = self._tiles.progressed.emit
        self._stage = None
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress_bar.visible = True
        self.prefetch_info.visible = False  # about the previous result
        self.status.value = f"{description}..."
        worker.start()

    def _on_progress(self, event) -> None:
        if self._closed:
            return
        new_stage = event.stage != self._stage
        if not self._updates.ready(last=new_stage or event.step == event.total):
            return
        if new_stage:
            self._stage = event.stage
            self.progress_bar.max = event.total
        self.progress_bar.value = event.step
        self._step_text = event.describe()
        self.status.value = self._step_text
        self._activity.show(f"phenotwin: {event.stage}", event.step, event.total)  # last: it runs other slots

    def _on_tiles(self, done: int, total: int) -> None:
        """Tiles of the step under way, for fields larger than the model (queued from the worker)."""
        if self._closed or self._worker is None or not self._updates.ready(last=done == total):
            return
        self.status.value = f"{self._step_text or 'Starting'}, tile {done}/{total}"

    def cancel(self, *_):
        """Stop the running translation at its next diffusion step."""
        self._scrub_pending = self._run_pending = False
        self._cancelled = True  # and leave the machine alone afterwards: no prefetch
        if self._worker is not None:
            self._worker.quit()

    def _on_destroyed(self, *_):
        """napari is closing or the dock was removed: stop work, touch no (deleted) widget."""
        self._closed = True
        if self._prefetcher is not None:
            self._prefetcher.quit()
        if self._worker is not None:
            self._worker.quit()
            self.translator.denoiser.tile_progress = None  # the model is shared: report tiles to no one
        if self in _open_widgets:
            _open_widgets.remove(self)

    def _on_finished(self) -> None:
        self._activity.close()  # first, even when closed, so no bar stays in the dock
        if self._closed:
            return
        self._worker = None
        if self.translator is not None:
            self.translator.denoiser.tile_progress = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        self.progress_bar.visible = False
        if self._run_pending:
            self._run_pending = False
            self.run()
        elif self._scrub_pending:
            self._scrub_pending = False
            self._scrub()
        elif not self._cancelled:
            self._start_prefetch()

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
        """Strength, target, guidance or confine changed: regenerate from the cached inversion (debounced,
        unless it is cached: then there is nothing to wait for)."""
        if self.inversion is None or self.last_result is None:
            return
        try:
            cached = self.translator.is_generated(self.inversion, self.target.value, self.strength.value,
                                                  self.guidance.value, self.confine.value)
        except PhenotwinError:
            cached = False  # _scrub reports it
        if cached:
            self._scrub_timer.stop()
            self._scrub()
        else:
            self._scrub_timer.start()

    def _scrub(self) -> None:
        if self.inversion is None or self.translator is None:
            return
        if self._stop_prefetch_then(self._scrub):
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
        self._start(self.translator.generate_steps(self.inversion, **settings), "Updating", scrub=True)

    # -- precomputing strengths in the background ------------------------------------------

    def _prefetch_ladder(self) -> list[float]:
        """The slider's strengths within PREFETCH_RADIUS of the current one, nearest first."""
        step, current = self.strength.step, self.strength.value
        ladder = [current + sign * k * step for k in range(1, round(PREFETCH_RADIUS / step) + 1) for sign in (1, -1)]
        return [round(s, 6) for s in ladder if self.strength.min - 1e-9 <= s <= self.strength.max + 1e-9]

    def _start_prefetch(self) -> None:
        """When idle after a translation of one model-sized image: fill the strength cache."""
        from phenotwin.translate import Translation

        result = self.last_result
        if (self._closed or not self.prefetch.value or self._worker is not None or self._prefetcher is not None
                or self.inversion is None or not isinstance(result, Translation) or result.inversion is not self.inversion
                or self._prefetch_failed is self.inversion):
            return
        if max(self.inversion.normalised.shape[1:]) > self.translator.image_size:
            return  # a tiled field: each step takes seconds, too slow to give way to the user at once
        ladder = self._prefetch_ladder()
        job = self.translator.prefetch_steps(self.inversion, self.target.value, ladder, self.guidance.value)
        worker = create_worker(run_steps, job, _connect={"errored": self._on_prefetch_error}, _start_thread=False)
        worker.yielded.connect(self._on_prefetch_progress)
        worker.returned.connect(lambda _: setattr(self, "_prefetched", True))
        worker.finished.connect(self._on_prefetch_finished)
        self._prefetcher, self._prefetched = worker, False
        worker.start()

    def _stop_prefetch_then(self, action) -> bool:
        """Give way to the user: a running prefetch stops at its next step, then `action` runs
        (a queued Translate wins over a queued scrub: it reads the slider too). False when none
        was running: the caller goes on at once."""
        if self._prefetcher is None:
            return False
        if action is not None and self._after_prefetch != self.run:
            self._after_prefetch = action
        self._prefetcher.quit()
        return True

    def _on_prefetch_progress(self, event) -> None:
        if self._closed or self._prefetcher is None or not self._updates.ready(last=event.item == event.step == 1):
            return
        self.prefetch_info.visible = True
        self.prefetch_info.value = f"Precomputing nearby strength {event.item} of {event.items} in the background..."

    def _on_prefetch_error(self, err: Exception) -> None:
        if self._closed:
            return
        self._prefetch_failed = self.inversion
        self.prefetch_info.visible = True
        self.prefetch_info.value = f"Precomputing strengths stopped: {err}"

    def _on_prefetch_finished(self) -> None:
        if self._closed:
            return
        self._prefetcher = None
        action, self._after_prefetch = self._after_prefetch, None
        if self._prefetched and self.inversion is not None:
            low, high = self._ready_strengths()
            self.prefetch_info.visible = high > low
            self.prefetch_info.value = f"Strengths {low:.2f}–{high:.2f} are ready: moving the slider there is instant."
        elif self._prefetch_failed is not self.inversion:  # (a failure keeps its message)
            self.prefetch_info.visible = False  # stopped early: what it said no longer holds
        if action is not None:
            action()
        elif not self._prefetched:
            self._start_prefetch()  # stopped for nothing queued (the box unticked and ticked again)

    def _ready_strengths(self) -> tuple[float, float]:
        """The slider's range around its value that the cache holds (the budget may have cut the prefetch)."""
        def cached(strength: float) -> bool:
            return self.translator.is_generated(self.inversion, self.target.value, strength, self.guidance.value,
                                                self.confine.value)

        step, value = self.strength.step, self.strength.value
        low = high = value
        while low - step >= self.strength.min - 1e-9 and cached(round(low - step, 6)):
            low = round(low - step, 6)
        while high + step <= self.strength.max + 1e-9 and cached(round(high + step, 6)):
            high = round(high + step, 6)
        return low, high

    # -- results ---------------------------------------------------------------------------

    def _on_result(self, result: Translation | CellTranslation | StackTranslation) -> None:
        from phenotwin.percell import CellTranslation

        if self._closed:
            return
        self.last_result = result
        if isinstance(result, CellTranslation):
            meta = {**result.settings, "cells_layer": self._cells_source[0]}
            self._show(result.image, result.heatmap, meta)
            self._show_cells(result, meta)
            worst = min((row["reconstruction_psnr"] for row in result.scores), default=float("nan"))
            described = f"{len(result.scores)} cells"
        else:
            meta = result.metadata() if callable(result.metadata) else result.metadata
            self._show(result.image, result.heatmap, meta)
            worst = result.reconstruction_psnr
            described = f"{meta['planes']} planes" if isinstance(result, StackTranslation) else "image"
        if np.isfinite(worst):
            self.quality.value = quality_hint(worst) + (" (worst of all)" if described != "image" else "")
        self.status.value = (f"{described.capitalize()}: {meta['source']} → {meta['target']} at strength "
                             f"{meta['strength']:.2f} ({meta['steps']} steps).")
        self.compare_button.enabled = True
        self.translated.emit(result)

    def _show(self, translated: np.ndarray, heat: np.ndarray, meta: dict[str, Any]) -> None:
        """Translation layers (one per channel, styled like its source) and the heatmap."""
        sources = self._sources
        meta = {**meta, "source_layers": sources.names}
        for c, (layer, name, rgb) in enumerate(zip(sources.layers, sources.names, sources.rgb_index)):
            style = {"colormap": layer.colormap, "blending": layer.blending} if rgb is None else \
                {"colormap": RGB_COLORMAPS[rgb], "blending": "additive"}
            self._put_layer(f"{name} → {meta['target']}", translated[c], "translation", meta,
                            contrast_limits=layer.contrast_limits, gamma=layer.gamma, **style)
        top = float(np.percentile(heat, 99.5)) if heat.size else 0.0
        self._put_layer(f"{_common_name(sources.names)} Δ", heat, "heatmap", meta, colormap="inferno",
                        blending="additive", opacity=0.8, contrast_limits=(0.0, max(top, 1e-3)))

    def _show_cells(self, result: CellTranslation, meta: dict[str, Any]) -> None:
        """A new Labels layer (the user's is never touched) with the scores as features, coloured by change."""
        from matplotlib import colormaps
        from napari.utils.colormaps import DirectLabelColormap

        name, labels = self._cells_source
        features = {"index": [row["label"] for row in result.scores],
                    **{column: [row[column] for row in result.scores] for column in result.columns}}
        top = max(max(features["change"]), 1e-6)
        viridis = colormaps["viridis"]
        colors = {None: np.zeros(4), 0: np.zeros(4)}
        colors.update({label: np.asarray(viridis(change / top)) for label, change in
                       zip(features["index"], features["change"])})
        layer_name = f"{name} scores"
        metadata = {ROLE_KEY: {"role": "cell-scores", **meta}}
        existing = self.viewer.layers[layer_name] if layer_name in self.viewer.layers else None
        if existing is not None and existing.metadata.get(ROLE_KEY, {}).get("role") == "cell-scores":
            self.viewer.layers.remove(existing)
        self.viewer.add_labels(labels, name=layer_name, features=features, metadata=metadata, opacity=0.6,
                               colormap=DirectLabelColormap(color_dict=colors), scale=self._sources.scale,
                               translate=self._sources.translate)
        self.cell_result = result
        ranked = sorted(result.scores, key=lambda row: row["change"], reverse=True)[:TOP_CELLS]
        self.top_cells.value = "Most changed cells (label: change):\n" + "\n".join(
            f"{row['label']}: {row['change']:.3f}" for row in ranked)
        self.top_cells.visible = True
        self.export_button.enabled = True

    def _ask_csv_path(self, *_) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(self.native, "Export per-cell scores", "cell-scores.csv", "CSV (*.csv)")
        if path:
            self.save_scores(path)

    def save_scores(self, path) -> None:
        """Write the last per-cell scores as CSV (atomically)."""
        if self.cell_result is None:
            show_warning("No per-cell scores yet: choose a Cells (labels) layer and press Translate.")
            return
        try:
            written = self.cell_result.write_csv(path)
        except OSError as err:
            show_error(f"Could not write {path}: {err}. Choose a folder you can write to.")
            return
        show_info(f"Per-cell scores written to {written}")

    def _put_layer(self, name: str, data: np.ndarray, role: str, meta: dict[str, Any], **style) -> None:
        """Update our result layer in place if it still exists, else add it with the source's geometry."""
        metadata = {ROLE_KEY: {"role": role, **meta}}
        existing = self.viewer.layers[name] if name in self.viewer.layers else None
        if existing is not None and existing.metadata.get(ROLE_KEY, {}).get("role") != role:
            existing = None  # the user's layer of that name: never touched, ours gets a new name
        if existing is not None and existing.data.shape != data.shape:  # a plane before, a stack now
            self.viewer.layers.remove(existing)
            existing = None
        if existing is not None:
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
        grid = _grid(self.viewer)
        grid.stride = max(1, len(self.channel_pickers))
        grid.enabled = bool(value)

    def _on_layer_removed(self, event) -> None:
        removed = event.value
        if self._sources is not None and removed in self._sources.layers:
            # The cached inversion belongs to a layer that is gone: no more slider updates or
            # prefetch from it, and the next Run inverts afresh.
            self.inversion, self._inversion_key = None, None
            self._stop_prefetch_then(None)
        self._refresh_layer_choices()


def _grid(viewer):
    """The viewer's grid settings: `viewer.canvas.grid` since napari 0.9 (`viewer.grid` is deprecated there)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


def _training_summary(provenance: dict[str, Any]) -> str:
    """', trained 3000 steps', or for a fine-tuning ', fine-tuned 2000 steps from a 3000-step base'."""
    steps = provenance.get("steps")
    if not steps:
        return ""
    base_steps = provenance.get("base", {}).get("provenance", {}).get("steps")
    return f", fine-tuned {steps} steps from a {base_steps}-step base" if base_steps else f", trained {steps} steps"


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
