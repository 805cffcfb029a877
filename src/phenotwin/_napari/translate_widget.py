"""The "Translate cells" dock widget: its controls, and the wiring between them, the layers and the session.

What runs when is the Qt-free `TranslationSession`'s business, reading layers and showing results is
`layers`'; the widget reads its controls into one `TranslationSettings` and shows what the session reports.
Model work runs in napari workers, step by step: the viewer never freezes and Cancel stops at the next step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui import widgets
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal
from superqt.utils import qdebounced

from phenotwin._napari import confirm, layers, model_match, model_registry
from phenotwin._napari.layout import ScrollableDock, explain, help_button, shortcut
from phenotwin._napari.results_panel import ResultsPanel
from phenotwin._napari.session import STRENGTH_MAX, STRENGTH_MIN, STRENGTH_STEP, RunRequest, TranslationSession
from phenotwin._napari.workers import DockProgress, TileSignal, start_worker
from phenotwin.errors import PhenotwinError
from phenotwin.pipeline.settings import TranslationSettings, model_defaults  # torch-free

if TYPE_CHECKING:
    import napari

SCRUB_DEBOUNCE_MS = 120
UNKNOWN_BATCH = "unknown"  # the batch picker's "no batch given" (`TranslationSettings.batch` None)
TRANSLATE_KEYS, CANCEL_KEYS, BEFORE_AFTER_KEYS = "Ctrl+Shift+T", "Ctrl+Shift+X", "Ctrl+Shift+B"
TOOLTIPS = {
    "model_path": "A phenotwin model folder (with phenotwin.json). The shipped demo model is filled in.",
    "load_button": "Load the model in the folder above (once per napari session; shared by every widget).",
    "source": "The condition the cells are in now (read from the layer's metadata when it says).",
    "target": "The condition to show them in.",
    "batch": "The plate, day or microscope this image comes from, for a model trained with batches: the translation "
             "changes the condition and keeps that batch's look. 'unknown': an image from a batch the model never saw.",
    "seed": "Random seed of the generation: the same seed and settings give the same result.",
    "run_button": f"Translate the selected layers with these settings ({TRANSLATE_KEYS}).",
    "cancel_button": f"Stop the translation at its next diffusion step ({CANCEL_KEYS}).",
    "progress_bar": "Model calls of this run over all its stages, and the time left at the rate measured so far.",
}
CURRENT_PLANE, ALL_PLANES = "current plane", "all planes"
SLIDER_OFF = ("Strength is off: the slider cannot re-score a result of many cells or planes (each has its own "
              "inversion). Change Cells, Stack or a layer to set it again, then press Translate.")


class TranslateWidget(ScrollableDock, widgets.Container):
    """Dock widget: model, layers per channel, conditions, strength slider, Run / Cancel."""

    model_loaded = Signal(object)  # the Translator, once a model is ready
    translated = Signal(object)  # each result shown

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__(labels=True, scrollable=True)  # scrolls inside its dock: three docks fit a screen
        self.viewer = napari_viewer
        self.session = TranslationSession(start_worker)
        self._requested_model: str | None = None
        self._closed = False  # set when Qt destroys the widget; late worker results are then dropped
        self._preview = layers.StagedLayers()
        self._tiles = TileSignal()
        self._scrub_later = qdebounced(self._scrub, timeout=SCRUB_DEBOUNCE_MS)

        from phenotwin.assets import demo_model_path

        demo = demo_model_path()
        self.model_path = widgets.FileEdit(mode="d", label="Model folder", value=str(demo) if demo else "")
        self.load_button = widgets.PushButton(text="Load model")
        self.model_info = widgets.Label(value="No model loaded.")
        self.conditions_note = model_match.ConditionsNote()  # the layers' conditions, when this model lacks them
        self.channel_pickers = layers.ChannelPickers(self.viewer, on_change=self._on_layers_picked, warn=show_warning)
        self.axes_info = widgets.Label(value="", visible=False)
        # callable choices: static ones are reset when the widget is docked
        self.planes = widgets.ComboBox(label="Stack", choices=lambda _w: [CURRENT_PLANE, ALL_PLANES],
                                       tooltip="For layers with time, z or well axes: the plane shown, or every plane")
        self.cells = widgets.ComboBox(
            label="Cells (labels)", choices=lambda _w: layers.labels_choices(self.viewer), nullable=True,
            tooltip="A Labels layer of segmented cells: translate and score cell by cell; empty = the whole image")
        self.source = widgets.ComboBox(label="From condition", choices=self._conditions)
        self.target = widgets.ComboBox(label="To condition", choices=self._conditions)
        self.batch = widgets.ComboBox(label="Batch", visible=False, choices=lambda _w: [UNKNOWN_BATCH] + (
            self.translator.batches if self.translator is not None else []))  # shown for models with batches
        # Strength, steps, guidance and confine show the defaults (`_show_defaults`), then the model's when it loads.
        self.strength = widgets.FloatSlider(label="Strength", min=STRENGTH_MIN, max=STRENGTH_MAX, step=STRENGTH_STEP,
                                            tooltip="How far to invert: 1 = all the way to noise (strongest change).")
        self.prefetch = widgets.CheckBox(
            text="Precompute nearby strengths", value=False,
            tooltip="After a translation, generate the strengths around the slider's in the background so that "
                    "moving the slider there is instant. Off by default on a CPU, on for a GPU; it gives way to "
                    "anything you start, and Cancel stops it.")
        self.slider_info = widgets.Label(value="", visible=False)
        self.prefetch_info = widgets.Label(value="", visible=False)
        self.steps = widgets.SpinBox(label="Steps", min=2, max=1000, tooltip="DDIM steps for inversion and generation")
        self.guidance = widgets.FloatSpinBox(label="Guidance", min=0.0, max=20.0, step=0.5,
                                             tooltip="Classifier-free guidance; 0 = none")
        self.confine = widgets.CheckBox(text="Confine changes to where the conditions differ",
            tooltip="Keep the change only where the model's predictions under the two conditions disagree (a soft "
                    "mask per channel): what the condition does not touch stays (almost) as it was. Switching it "
                    "costs no new diffusion steps.")
        self.match_intensities = widgets.CheckBox(text="Match intensities to the training images", tooltip=(
            "For an image from another microscope setting that does not fit: map its percentiles onto the training range."))
        self.seed = widgets.SpinBox(label="Seed", min=0, max=2**31 - 1)
        self.run_button = widgets.PushButton(text="Translate")
        self.cancel_button = widgets.PushButton(text="Cancel", enabled=False)
        self.progress_bar = widgets.ProgressBar(label="Progress", min=0, max=1, value=0, visible=False)
        self.status = widgets.Label(value="")
        self.results = ResultsPanel(self.viewer, lambda: len(self.channel_pickers))
        self._dock = DockProgress(self.status, self.progress_bar, clock=lambda: self.session.clock)
        self._prefetch_line = DockProgress(self.prefetch_info, reveal=True)
        self.help = help_button("Translate cells", "Translate layers to another condition and read the result.")
        self.extend([self.help, self.model_path, self.load_button, self.model_info, self.conditions_note,
                     self.channel_pickers, self.channel_pickers.note, self.axes_info, self.planes, self.cells, self.source,
                     self.target, self.batch, self.strength, self.slider_info, self.prefetch, self.prefetch_info, self.steps,
                     self.guidance, self.confine, self.match_intensities, self.seed, self.run_button,
                     self.cancel_button, self.progress_bar, self.status, self.results])
        for label in (self.model_info, self.status, self.prefetch_info, self.axes_info, self.slider_info):
            label.native.setWordWrap(True)
        self._show_defaults(model_defaults())
        explain(self, TOOLTIPS)
        self.shortcuts = [shortcut(self.native, keys, action) for keys, action in (
            (TRANSLATE_KEYS, self.run), (CANCEL_KEYS, self.cancel), (BEFORE_AFTER_KEYS, self.results.toggle_before_after))]

        self.load_button.changed.connect(lambda: self.load_model(str(self.model_path.value), chosen=True))
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        for control in (self.strength, self.target, self.guidance, self.confine):
            control.changed.connect(self._on_generation_setting)
        self.prefetch.changed.connect(self.session.set_prefetch)
        for control in (self.planes, self.cells):
            control.changed.connect(self._on_layers_picked)
        events = self.session.events
        events.started.connect(self._on_started)
        events.progress.connect(self._dock.step)
        tiles = self._tiles.progressed
        events.tiles.connect(lambda done, total: tiles.emit(done, total))  # worker thread -> queued to the GUI
        tiles.connect(lambda done, total: self.session.running and self._dock.tiles(done, total))
        events.result.connect(self._on_result)
        events.preview.connect(self._on_preview)
        events.error.connect(self._on_error)
        events.cancelled.connect(lambda: self._dock.say("Cancelled."))
        events.finished.connect(self._on_finished)
        events.prefetch_progress.connect(lambda k, n: self.session.prefetching and self._prefetch_line.show(
            f"Precomputing nearby strength {k} of {n} in the background (Cancel stops it)...", None))
        events.prefetch_info.connect(self._prefetch_line.say)
        for event in (events.prefetch_progress, events.prefetch_info):  # Cancel stops the precompute too
            event.connect(lambda *_: self._closed or setattr(self.cancel_button, "enabled", bool(
                self.session.running or self.session.prefetching)))
        self.viewer.layers.events.inserted.connect(self._refresh_layer_choices)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.layers.events.reordered.connect(self._refresh_layer_choices)
        self.native.destroyed.connect(self._on_destroyed)
        model_registry.register_widget(self)
        self.channel_pickers.build(["image"])
        if demo:
            self.load_model(str(demo))

    translator = property(lambda self: self.session.translator)
    requested_model = property(lambda self: self._requested_model)  # the model loading or loaded
    last_result = property(lambda self: self.session.last_result)

    def settings(self) -> TranslationSettings:
        """The controls as the one settings object (read on the GUI thread, never from a worker)."""
        return TranslationSettings(source=self.source.value, target=self.target.value, strength=self.strength.value,
                                   steps=self.steps.value, guidance=self.guidance.value, confine=self.confine.value,
                                   seed=self.seed.value, match_intensities=self.match_intensities.value,
                                   batch=None if self.batch.value in (None, UNKNOWN_BATCH) else self.batch.value)

    # -- model and layer choices --------------------------------------------------------------

    def load_model(self, path: str, chosen: bool = False) -> None:
        """Load a checkpoint in a worker (first time only); one `chosen` by the user stays for these layers."""
        if not path or not Path(path).is_dir():
            show_error(f"Model folder {path!r} does not exist. Choose the folder that contains phenotwin.json.")
            return
        self.model_info.value, self.load_button.enabled = f"Loading {Path(path).name}...", False
        self._requested_model = str(Path(path).resolve())
        self.conditions_note.chosen_path = self._requested_model if chosen else self.conditions_note.chosen_path
        self._loader = start_worker(model_registry.load_translator, path, returned=self._on_model_loaded,
                                    errored=lambda err: self._on_error(err, "Could not load the model"),
                                    finished=lambda: self._closed or setattr(self.load_button, "enabled", True))

    def _on_model_loaded(self, translator) -> None:
        if self._closed or str(translator.checkpoint_path.resolve()) != self._requested_model:
            return  # an earlier request finished after a newer one: keep the newer
        self.session.set_translator(translator)
        classes, defaults = translator.classes, translator.defaults
        for combo, condition in ((self.source, classes[0]), (self.target, classes[1])):
            combo.reset_choices()
            combo.value = condition
        self.batch.reset_choices()
        self.batch.value, self.batch.visible = UNKNOWN_BATCH, bool(translator.batches)
        self.channel_pickers.build(model_registry.channel_names(translator))
        self._show_defaults(defaults)
        self.prefetch.value = self.session.prefetch_enabled  # the session's default for this device
        self.model_info.value = model_registry.describe(translator)
        self._on_layers_picked()
        self.model_loaded.emit(translator)

    def _show_defaults(self, defaults: TranslationSettings) -> None:
        self.strength.value, self.steps.value = defaults.strength, defaults.steps
        self.guidance.value, self.confine.value = defaults.guidance, defaults.confine

    def _conditions(self, _widget=None) -> list[str]:
        return self.translator.classes if self.translator is not None else []

    def _refresh_layer_choices(self, *_) -> None:
        self.channel_pickers.refresh()
        self.cells.reset_choices()
        self.conditions_note.check(self)

    def _on_layers_picked(self, *_):
        self.strength.enabled, self.slider_info.visible = True, False  # new inputs: the slider sets the next run
        note = layers.axes_note(self.viewer, self.channel_pickers.choices, self.planes.value == ALL_PLANES)
        self.axes_info.value, self.axes_info.visible = note, bool(note)
        if self.translator is not None and len(self.channel_pickers):  # the layer's condition, when it says
            conditions = layers.guess_conditions(self.translator.classes, self.channel_pickers[0].value,
                                                 self.target.value)
            if conditions is not None:
                self.source.value, self.target.value = conditions
        self.conditions_note.check(self)  # the layers name conditions this model lacks: another model, or say so

    def _on_layer_removed(self, event) -> None:
        context = self.session.context
        if context is not None and event.value in context.layers:
            self.session.drop_inversion()  # the inversion belongs to a layer that is gone
        self._refresh_layer_choices()

    # -- running -------------------------------------------------------------------------------

    def run(self, *_):
        """Translate the selected layers: invert (unless cached) then generate."""
        if self.translator is None:
            show_warning("Load a model first (Model folder, then Load model).")
            return
        if self.session.running == "run":
            show_info("A translation is already running; Cancel it or wait.")
            return
        try:
            sources = layers.read_sources(self.viewer, self.channel_pickers.choices, self.planes.value == ALL_PLANES,
                                          self.cells.value)
            request = confirm.checked(self, RunRequest(sources.image, self.settings(), sources.fingerprint,
                                                       sources.labels, sources))  # None: a long run declined
            request is not None and self.session.run(request)
        except (PhenotwinError, ValueError) as err:
            show_error(f"Cannot translate: {err}")

    def cancel(self, *_):
        """Stop the running translation (or the background precompute) at its next diffusion step."""
        self.session.cancel()

    def _on_generation_setting(self, *_):
        """Strength, target, guidance or confine changed: regenerate from the cached inversion (debounced,
        unless it is cached: then there is nothing to wait for)."""
        if self.session.inversion is None or self.session.last_result is None:
            return
        if self.session.is_ready(self.settings()):
            self._scrub_later.cancel()
            self._scrub()
        else:
            self._scrub_later()

    def _scrub(self) -> None:
        try:
            self.session.scrub(self.settings())
        except PhenotwinError as err:
            show_error(str(err))

    def _on_started(self, description: str) -> None:
        if self._closed:
            return
        self.run_button.enabled, self.cancel_button.enabled, self.progress_bar.visible = False, True, True
        self._dock.say(f"{description}...")

    def _on_finished(self) -> None:
        self._dock.close()  # first, even when closed, so no bar stays in the dock
        if self._closed:
            return
        self.run_button.enabled, self.cancel_button.enabled, self.progress_bar.visible = True, False, False

    def _on_error(self, err: Exception, what: str) -> None:
        if self._closed:
            return
        self._dock.say(f"{what}.")
        show_error(f"{what}: {err}" if isinstance(err, PhenotwinError) else f"{what}: {type(err).__name__}: {err}")

    def _on_destroyed(self, *_):
        """napari is closing or the dock was removed: stop work, touch no (deleted) widget."""
        self._closed = self._dock.closed = self._prefetch_line.closed = True
        self._preview.stop()
        self._scrub_later.cancel()
        self.session.close()
        model_registry.unregister_widget(self)

    # -- results ---------------------------------------------------------------------------------

    def _on_result(self, result, sources: layers.SourcePlanes) -> None:
        self._preview.stop()  # a preview layer still to show would overwrite the result
        if self._closed:
            return
        shown = layers.show_result(self.viewer, result, sources)
        self._dock.say(shown.status)
        # the slider scrubs one inversion: results of many (cells, planes) are not re-scored by it
        self.strength.enabled, self.slider_info.visible = not shown.several, shown.several
        self.slider_info.value = SLIDER_OFF
        if shown.top_cells is not None:
            self.results.show_cells(result, shown, sources, model_registry.channel_names(self.translator))
        self.results.show_result(result, sources, shown.several)
        self.translated.emit(result)

    def _on_preview(self, result, sources: layers.SourcePlanes) -> None:
        if not self._closed:  # in the result layers, until the translation itself replaces it
            self._preview.show(self.viewer, result, sources)
            show_info(f"Preview ({result.settings.steps} DPM-Solver++ steps) shown; the translation follows.")

    def result_layers(self, role: str | None = None):
        return layers.result_layers(self.viewer, role)
