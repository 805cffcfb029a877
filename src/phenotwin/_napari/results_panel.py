"""The Translate dock's result section: whether to believe it, how it is shown, what to keep.

Two lines judge the result in the library's words (`verdict`): the input's fit and the
model's trust verdict; a bad fit is also a napari notification, once per run. The view
controls are one `views.ResultView` state: Before / after (two states), the heatmap's own
toggle, side by side. Per-cell runs add their most changed cells, a CSV export, and "Explain change…",
which hands the run's layers to the Explain change dock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from magicgui import widgets
from napari.utils.notifications import show_error, show_info, show_warning

from phenotwin._napari import layers, saving
from phenotwin._napari.verdict import Verdict, verdict
from phenotwin._napari.views import ResultView
from phenotwin.errors import PhenotwinError

if TYPE_CHECKING:
    import napari

BEFORE, AFTER = "Before (input)", "After (translation)"


class ResultsPanel(widgets.Container):
    """Verdict lines, view controls and exports of the result shown."""

    def __init__(self, viewer: napari.Viewer, stride: Callable[[], int]) -> None:
        super().__init__(labels=False)
        self.viewer, self._stride = viewer, stride
        self.view = ResultView()
        self.sources: layers.SourcePlanes | None = None  # of the result shown
        self.result = None  # the result shown (its settings are saved with it)
        self.cell_result = None
        self._cell_run: tuple | None = None  # (sources, Shown, channel names) of the per-cell result shown
        self.verdict: Verdict | None = None
        self._notified: tuple | None = None
        self.fit_line = widgets.Label(value="", visible=False)
        self.quality = widgets.Label(value="")
        self.top_cells = widgets.Label(value="", visible=False)
        self.before_after = widgets.RadioButtons(
            choices=[BEFORE, AFTER], value=AFTER, orientation="horizontal", enabled=False,
            tooltip="Show the input layers or their translation in the same place (Ctrl+Shift+B).")
        self.heatmap = widgets.CheckBox(
            text="Heatmap (where the translation differs from the input)", value=False, enabled=False,
            tooltip="Show the difference heatmap over the image, with its colour scale.")
        self.side_by_side = widgets.CheckBox(
            text="Side by side: input | translation | heatmap", value=False, enabled=False,
            tooltip="napari's grid: the input, the translation and the heatmap each in a labelled panel, fitted "
                    "to the window. Your other layers are hidden meanwhile and shown again afterwards.")
        self.export_button = widgets.PushButton(
            text="Export CSV…", enabled=False, tooltip="Save the per-cell scores, with the settings, as CSV.")
        self.explain_button = widgets.PushButton(
            text="Explain change…", enabled=False,
            tooltip="What changed in each cell (size, shape, intensity, texture, fragments...), with confidence "
                    "intervals: opens the Explain change dock on this run's images, translation and cells.")
        self.keep_button = widgets.PushButton(
            text="Keep this result", enabled=False,
            tooltip="Pin the result as layers of its own: the next run makes new layers instead of updating these.")
        self.save_button = widgets.PushButton(
            text="Save results…", enabled=False,
            tooltip="Save the translation and the heatmap as one OME-TIFF with every setting and the provenance; "
                    "File › Open (this plugin's reader) shows it again, styled, with its metadata.")
        self.extend([self.fit_line, self.quality, self.top_cells, self.before_after, self.heatmap, self.side_by_side,
                     self.export_button, self.explain_button, self.keep_button, self.save_button])
        for label in (self.fit_line, self.quality, self.top_cells):
            label.native.setWordWrap(True)
        self.before_after.changed.connect(lambda value: self._set(after=value == AFTER))
        self.heatmap.changed.connect(lambda on: self._set(heatmap=on))
        self.side_by_side.changed.connect(lambda on: self._set(grid=on))
        self.export_button.changed.connect(self._ask_csv_path)
        self.explain_button.changed.connect(self.explain)
        self.keep_button.changed.connect(self.keep)
        self.save_button.changed.connect(self._ask_tiff_path)

    def show_result(self, result, sources: layers.SourcePlanes, several: bool) -> None:
        """After result layers were put in place: judge the result, apply the view."""
        self.sources, self.result = sources, result
        self.verdict = judged = verdict(result, several)
        self.fit_line.value, self.fit_line.visible = judged.fit_line, bool(judged.fit_line)
        if judged.quality_line is not None:
            self.quality.value = judged.quality_line
        key = (id(sources), judged.fit_level, judged.trust_level)  # once per run, not at every slider move
        if judged.notify and key != self._notified:
            self._notified = key
            show_warning(judged.fit_line or judged.quality_line)
        for control in (self.before_after, self.heatmap, self.side_by_side, self.keep_button, self.save_button):
            control.enabled = True
        if self.cell_result is not result:  # a whole image or a stack: nothing cell by cell to explain
            self._cell_run = None
        self.explain_button.enabled = self._cell_run is not None
        self.apply()

    def show_cells(self, result, shown: layers.Shown, sources: layers.SourcePlanes, channel_names: list[str]) -> None:
        """A per-cell result (before `show_result`): its most changed cells, and what Explain will need."""
        self.cell_result = result
        self._cell_run = (sources, shown, list(channel_names))
        self.top_cells.value, self.top_cells.visible = shown.top_cells, True
        self.export_button.enabled = True

    def explain(self, *_):
        """Open (or reuse) the viewer's Explain change dock on the per-cell run shown; the dock, or None.

        It starts at once rather than waiting for its own button: the user asked to explain this
        result, everything the dock needs is known from the run (its layers, cells and the model's
        channel names), and measuring the cells is quick, runs in the background and can be
        cancelled. Real images of both conditions, for the model of the condition, can be added
        there and the dock run again."""
        from phenotwin._napari.explain_widget import explain_dock

        if self._cell_run is None:
            show_warning("Explain change needs a per-cell result: choose a Cells (labels) layer and press Translate.")
            return None
        sources, shown, names = self._cell_run
        choices = [layer if index is None else layers.RGBChannel(layer, index)
                   for layer, index in zip(sources.layers, sources.rgb_index)]
        try:
            dock = explain_dock(self.viewer)
            dock.explain_run(choices, shown.translations, shown.cells, names)
        except PhenotwinError as err:
            show_error(f"Cannot explain: {err}")
            return None
        return dock

    def _set(self, **state) -> None:
        for name, value in state.items():
            setattr(self.view, name, value)
        self.apply()

    def apply(self) -> None:
        self.view.apply(self.viewer, self.sources, self._stride())

    def toggle_before_after(self, *_) -> None:
        """The other of the two states (the Ctrl+Shift+B shortcut)."""
        if self.sources is not None:
            self.before_after.value = BEFORE if self.before_after.value == AFTER else AFTER

    def keep(self, *_) -> list:
        """Pin the result shown: its layers are renamed and no longer ours to update (their metadata
        keeps the provenance, with role 'kept <role>'); the view controls let go of them."""
        kept = layers.keep_results(self.viewer)
        if self.view.grid:
            self.side_by_side.value = False
        self.keep_button.enabled = False
        return kept

    def _ask_csv_path(self, *_) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(self.native, "Export per-cell scores", "cell-scores.csv", "CSV (*.csv)")
        if path:
            self.save_scores(path)

    def save_scores(self, path) -> None:
        """Write the last per-cell scores as CSV (atomically)."""
        layers.save_scores(self.cell_result, path)

    def _ask_tiff_path(self, *_) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(self.native, "Save results", "translation.ome.tif",
                                              "OME-TIFF (*.ome.tif *.ome.tiff)")
        if path:
            self.save(path)

    def save(self, path):
        """Write the result shown as OME-TIFF with its settings and provenance (atomically); the path, or None."""
        try:
            written = saving.save_results(self.viewer, path, self.result)
        except (PhenotwinError, OSError) as err:
            show_error(f"Could not save the results: {err}")
            return None
        show_info(f"Results saved to {written}")
        return written
