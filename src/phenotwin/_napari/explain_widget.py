"""The "Explain change" dock: what changed in each cell between an image and its translation.

Pick the source image, its translation and (optionally) the cells' Labels layer; the dock runs
`phenotwin.explain.cells` in a worker (progress, Cancel) and shows the ranked paired effects as
a table and a forest plot. Selecting a feature's row marks the cells where that feature changed
most in a Labels layer of their own. With a folder of real images of both conditions, the model
of the condition (sparse model, formula, against a black box) is fitted on them too.
The layers are read, never changed; the results are new layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, PushButton, SpinBox
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem

from phenotwin._napari.layout import PLOT_MIN_HEIGHT, ScrollableDock, explain
from phenotwin._napari.workers import DockProgress, start_worker
from phenotwin.errors import PhenotwinError

if TYPE_CHECKING:
    import napari

SEGMENT = "(segment here)"
HIGHLIGHT_LAYER = "Explain: largest change"
CELLS_LAYER = "Explain: cells (check)"
TOOLTIPS = {
    "source": "The real image (channels first or last, or grayscale).",
    "translated": "Its translation (e.g. a result of Translate cells).",
    "cells": "Cell labels of the source; '(segment here)' segments it and adds the labels to check.",
    "channel_names": "One name per channel, used in the feature names (e.g. nucleus golgi).",
    "nucleus_channel": "Index of the nuclear stain; -1 for none.",
    "real_data": "Optional: DIR/<condition>/*.tif of real images of both conditions, for the model of the condition.",
    "run_button": "Measure every cell of both images in the background.",
    "cancel_button": "Stop at the next step.",
}


class ExplainWidget(ScrollableDock, Container):
    def __init__(self, napari_viewer: napari.Viewer):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        super().__init__(labels=True, scrollable=True)
        self.viewer = napari_viewer
        self.source = ComboBox(label="Source image", choices=self._image_layers)
        self.translated = ComboBox(label="Translation", choices=self._image_layers)
        self.cells = ComboBox(label="Cells", choices=self._label_layers)
        self.channel_names = LineEdit(label="Channel names", value="")
        self.nucleus_channel = SpinBox(label="Nucleus channel", min=-1, max=3, value=0)
        self.real_data = FileEdit(mode="d", label="Real images (optional)")
        self.run_button = PushButton(text="Explain change")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.formula = Label(value="")
        self.extend([self.source, self.translated, self.cells, self.channel_names, self.nucleus_channel,
                     self.real_data, self.run_button, self.cancel_button, self.status, self.formula])
        explain(self, TOOLTIPS)
        for label in (self.status, self.formula):
            label.native.setWordWrap(True)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["feature", "change [95% CI]", "relative", "standardised"])
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setMinimumHeight(PLOT_MIN_HEIGHT)
        self.add_native(self.table)
        self.figure = Figure(figsize=(4, 3), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(PLOT_MIN_HEIGHT)
        self.add_native(self.canvas)
        self.changes = None  # explain.cells.CellChanges of the last run
        self.explanation = None  # explain.pipeline.Explanation of the real images, if given
        self._worker = None
        self._dock = DockProgress(self.status)
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        self.table.itemSelectionChanged.connect(self._on_row)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_choices)

    def _image_layers(self, _=None):
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _label_layers(self, _=None):
        from napari.layers import Labels

        return [(SEGMENT, None)] + [(layer.name, layer) for layer in self.viewer.layers
                                    if isinstance(layer, Labels) and layer.name != HIGHLIGHT_LAYER]

    def _refresh_choices(self, *_) -> None:
        for combo in (self.source, self.translated, self.cells):
            combo.reset_choices()

    # -- running ---------------------------------------------------------------------------

    def _job(self):
        from phenotwin.explain.cells import explain_cells_steps
        from phenotwin.explain.pipeline import as_channels_first, explain_steps, feature_key

        if self.source.value is None or self.translated.value is None:
            raise PhenotwinError("choose the source image and its translation (image layers).")
        if self.source.value is self.translated.value:
            raise PhenotwinError("the source and the translation are the same layer; choose the translation's layer.")
        source = as_channels_first(np.asarray(self.source.value.data), Path(self.source.value.name))
        translated = as_channels_first(np.asarray(self.translated.value.data), Path(self.translated.value.name))
        labels = None if self.cells.value is None else np.asarray(self.cells.value.data)
        names = self.channel_names.value.split() or [f"channel {c + 1}" for c in range(source.shape[0])]
        if len(names) != source.shape[0]:
            raise PhenotwinError(f"{len(names)} channel name(s) for a {source.shape[0]}-channel image; give one per channel.")
        nucleus = None if self.nucleus_channel.value < 0 else self.nucleus_channel.value
        folder = str(self.real_data.value)
        folder = None if folder in ("", ".") else Path(folder)

        def job():
            changes = yield from explain_cells_steps(source, translated, labels, [feature_key(n) for n in names], nucleus)
            real = (yield from explain_steps(folder, channel_names=names, nucleus_channel=nucleus)) if folder else None
            return changes, real

        return job()

    def start(self, *_) -> None:
        if self._worker is not None:
            return
        try:
            job = self._job()
        except PhenotwinError as err:
            show_error(f"Cannot explain: {err}")
            return
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = "Measuring cells..."
        self._worker = start_worker(job, yielded=self._dock.step, returned=self._on_done, errored=self._on_error,
                                    aborted=self._on_cancelled, finished=self._on_finished)

    def cancel(self, *_) -> None:
        if self._worker is not None:
            self._dock.say("Cancelling...")
            self._worker.quit()

    def _on_error(self, err) -> None:
        self._dock.say(f"Failed: {err}")
        show_error(f"Explain change failed: {err}")

    def _on_cancelled(self) -> None:
        self._dock.say("Cancelled.")

    def _on_finished(self) -> None:
        self._worker = None
        self.run_button.enabled, self.cancel_button.enabled = True, False

    def _on_done(self, result) -> None:
        from phenotwin.explain.effects import draw_forest

        self.changes, self.explanation = result
        changes = self.changes
        if changes.segmented:
            self._put_labels(CELLS_LAYER, changes.labels)
        self.table.setRowCount(len(changes.effects))
        for row, e in enumerate(changes.effects):
            relative = f"{100 * e.relative:+.0f}%" if np.isfinite(e.relative) else "–"
            cells = [f"{e.words} ({e.unit})", f"{e.difference:+.3g} [{e.difference_ci[0]:.3g}, {e.difference_ci[1]:.3g}]",
                     relative, f"{e.standardised:+.2f}"]
            for column, text in enumerate(cells):
                self.table.setItem(row, column, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()
        draw_forest(self.figure, changes.effects, top=10, title="Translation vs source, same cells")
        self.canvas.draw_idle()
        lines = []
        if self.explanation is not None:
            lines = [f"{m.name}: held-out accuracy {m.accuracy:.2f} ({m.relative_to_black_box:.2f} of the black box)"
                     + (f"; {m.formula}" if m.formula else "") for m in self.explanation.models]
        self.formula.value = "\n".join(lines)
        self._dock.say(f"{len(changes.before)} cells measured; select a row to mark the cells that changed most.")

    # -- highlighting -----------------------------------------------------------------------

    def _put_labels(self, name: str, data: np.ndarray) -> None:
        if name in self.viewer.layers:
            self.viewer.layers[name].data = data
        else:
            self.viewer.add_labels(data, name=name, opacity=0.7)

    def _on_row(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if self.changes is not None and rows:
            self.highlight(self.changes.effects[rows[0].row()].key)

    def highlight(self, key: str) -> list[int]:
        """Mark the cells where `key` changed most in the highlight layer; return their labels."""
        from phenotwin.explain.cells import largest_changes

        chosen = largest_changes(self.changes, key)
        labels = self.changes.labels
        self._put_labels(HIGHLIGHT_LAYER, np.where(np.isin(labels, chosen), labels, 0).astype(labels.dtype))
        change = self.changes.change(key)
        words = next(f.words for f in self.changes.features if f.key == key)
        self.status.value = (f"{words}: changed most in cell(s) " + ", ".join(f"{c} ({change[c]:+.3g})" for c in chosen)
                             if chosen else f"{words}: no cell changed")
        return chosen
