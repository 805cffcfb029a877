"""The "Explain change" dock: what changed in each cell between an image and its translation.

Pick the source image, its translation and (optionally) the cells' Labels layer; the dock runs
`phenotwin.explain.cells` in a worker (progress, Cancel) and shows the ranked paired effects as
a table and a forest plot. Selecting a feature's row marks the cells where that feature changed
most in a Labels layer of their own. With a folder of real images of both conditions, the model
of the condition (sparse model, formula, against a black box) is fitted on them too.
The Translate dock's "Explain change…" (per-cell runs) opens this dock on its run: the source's
channel layers, their translations and the run's cells, each side offered as one choice 'a + b'.
The layers are read, never changed; the results are new layers.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, PushButton, SpinBox
from napari.utils.notifications import show_error, show_warning
from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem

from phenotwin._napari.layout import PLOT_MIN_HEIGHT, ScrollableDock, explain
from phenotwin._napari.workers import DockProgress, DockRun
from phenotwin.errors import PhenotwinError

if TYPE_CHECKING:
    import napari

SEGMENT = "(segment here)"
NUCLEAR = re.compile(r"nucle|dapi|hoechst|dna", re.IGNORECASE)  # channel names of a nuclear stain
HIGHLIGHT_LAYER = "Explain: largest change"
CELLS_LAYER = "Explain: cells (check)"
TOOLTIPS = {
    "source": "The real image (channels first or last, or grayscale); 'a + b': one layer per channel.",
    "translated": "Its translation (e.g. a result of Translate cells; its Explain change… fills this dock in).",
    "cells": "Cell labels of the source; '(segment here)' segments it and adds the labels to check.",
    "channel_names": "One name per channel, used in the feature names (e.g. nucleus golgi).",
    "nucleus_channel": "Index of the nuclear stain; -1 for none.",
    "real_data": "Optional: DIR/<condition>/*.tif of real images of both conditions, for the model of the condition "
                 "(with a CNN black box and a β-VAE of the cell crops: about a minute more of CPU).",
    "run_button": "Measure every cell of both images in the background.",
    "cancel_button": "Stop at the next step.",
}


_open_docks: weakref.WeakSet[ExplainWidget] = weakref.WeakSet()  # of every viewer; holds none alive


def _unwrapped(obj):
    """napari hands each plugin widget a proxy of the viewer (and of its layers): compare what they wrap."""
    return getattr(obj, "__wrapped__", obj)


def _channel_layer(choice):
    """The layer behind a choice (an RGB channel's layer)."""
    return getattr(choice, "layer", choice)


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Several one-channel layers (or RGB channels) read as one image, a channel each: how Translate
    shows a multichannel source and its translation. Offered in the pickers as 'a + b'."""

    members: tuple

    @property
    def name(self) -> str:
        return " + ".join(member.name for member in self.members)

    def key(self) -> tuple:
        return tuple((id(_unwrapped(_channel_layer(m))), getattr(m, "index", None)) for m in self.members)

    def layer_ids(self) -> set[int]:
        return {id(_unwrapped(_channel_layer(m))) for m in self.members}


def as_channels_first_layer(layer) -> np.ndarray:
    from phenotwin.explain.pipeline import as_channels_first

    return as_channels_first(np.asarray(layer.data), Path(layer.name))


def explain_dock(viewer: napari.Viewer) -> ExplainWidget:
    """The viewer's Explain change dock, shown and raised; opened through the plugin when there is none."""
    widget = next((w for w in _open_docks if _unwrapped(w.viewer) is _unwrapped(viewer)), None)
    if widget is None:
        _, widget = viewer.window.add_plugin_dock_widget("napari-phenotwin", "Explain change")
    dock = widget.native.parent()
    while dock is not None and not hasattr(dock, "setFloating"):  # the QDockWidget around it
        dock = dock.parent()
    if dock is not None:
        dock.show()
        dock.raise_()
    return widget


class ExplainWidget(ScrollableDock, Container):
    def __init__(self, napari_viewer: napari.Viewer):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        super().__init__(labels=True, scrollable=True)
        self.viewer = napari_viewer
        self._groups: list[ChannelGroup] = []  # several layers as one multichannel image (a Translate run's)
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
        self._run = DockRun(DockProgress(self.status), self.run_button, self.cancel_button, "Explain change failed",
                            notify=lambda text: show_error(text), returned=self._on_done)
        self._dock = self._run.dock
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self._run.cancel)
        self.table.itemSelectionChanged.connect(self._on_row)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_choices)
        _open_docks.add(self)
        self.native.destroyed.connect(self._on_destroyed)

    _worker = property(lambda self: self._run.worker)  # None when nothing runs

    def _on_destroyed(self, *_) -> None:
        """The dock was closed: stop the run, touch no (deleted) control, and be found no more."""
        self._run.close()
        _open_docks.discard(self)

    def _image_layers(self, _=None):
        from napari.layers import Image

        present = {id(_unwrapped(layer)) for layer in self.viewer.layers}
        groups = [(group.name, group) for group in self._groups if group.layer_ids() <= present]
        return groups + [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _label_layers(self, _=None):
        from napari.layers import Labels

        return [(SEGMENT, None)] + [(layer.name, layer) for layer in self.viewer.layers
                                    if isinstance(layer, Labels) and layer.name != HIGHLIGHT_LAYER]

    def _refresh_choices(self, *_) -> None:
        present = {id(_unwrapped(layer)) for layer in self.viewer.layers}
        self._groups = [group for group in self._groups if group.layer_ids() <= present]  # a layer gone: the group too
        for combo in (self.source, self.translated, self.cells):
            combo.reset_choices()

    # -- running ---------------------------------------------------------------------------

    def _job(self):
        from phenotwin.explain.cells import explain_cells_steps
        from phenotwin.explain.pipeline import explain_steps, feature_key

        if self.source.value is None or self.translated.value is None:
            raise PhenotwinError("choose the source image and its translation (image layers).")
        if self.source.value is self.translated.value:
            raise PhenotwinError("the source and the translation are the same layer; choose the translation's layer.")
        source, translated = (self._read(combo.value) for combo in (self.source, self.translated))
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

    def _read(self, choice) -> np.ndarray:
        """(C, H, W) of a layer (channels first or last), or of a group of one-channel layers."""
        if isinstance(choice, ChannelGroup):
            from phenotwin._napari.layers import read_sources

            return read_sources(self.viewer, list(choice.members)).image  # the plane shown, as Translate reads it
        return as_channels_first_layer(choice)

    def start(self, *_) -> bool:
        """Measure in the background; False when a run is under way or the choices are refused."""
        return self._run.start(self._job, "Cannot explain", "Measuring cells...")

    def cancel(self, *_) -> None:
        self._run.cancel()

    def explain_run(self, sources: list, translations: list, cells, channel_names: list[str]) -> bool:
        """Choose a Translate run's layers (its source channels, their translations, its cells) and
        explain them; False (nothing changed) while a run of this dock is under way.

        Several one-channel layers become one choice, 'a + b', read as one image (as Translate read
        them); `channel_names` are the model's. A layer of this viewer is looked up by name (napari
        hands each dock its own proxy of the viewer), and refused if it is gone."""
        from phenotwin.explain.pipeline import feature_key

        if self._worker is not None:
            show_warning("Explain change is still measuring; Cancel it or wait, then press Explain change again.")
            return False
        source, translated = (self._choose(members) for members in (sources, translations))
        cell_layer = self._own(cells)
        self._refresh_choices()
        self.source.value, self.translated.value, self.cells.value = source, translated, cell_layer
        self.channel_names.value = " ".join(feature_key(name) for name in channel_names)  # one word each
        nucleus = next((c for c, name in enumerate(channel_names) if NUCLEAR.search(name)), None)
        if nucleus is not None and nucleus <= self.nucleus_channel.max:  # else the dock's setting stays
            self.nucleus_channel.value = nucleus
        return self.start()

    def _own(self, layer):
        """The layer of this dock's viewer that `layer` (maybe from another proxy) is."""
        from phenotwin._napari.layers import RGBChannel

        if isinstance(layer, RGBChannel):
            return RGBChannel(self._own(layer.layer), layer.index)
        mine = self.viewer.layers[layer.name] if layer.name in self.viewer.layers else None
        if mine is None or _unwrapped(mine) is not _unwrapped(layer):
            raise PhenotwinError(f"layer {layer.name!r} of that result is gone; translate again.")
        return mine

    def _choose(self, members: list):
        """One 2-D layer as itself; several (or a plane of a stack, an RGB channel) as a group, read as
        Translate read them: the plane shown. A group is kept, and offered while its layers exist."""
        from napari.layers import Image

        members = [self._own(member) for member in members]
        if len(members) == 1 and isinstance(members[0], Image) and members[0].ndim == 2 and not members[0].rgb:
            return members[0]
        group = ChannelGroup(tuple(members))
        same = next((g for g in self._groups if g.key() == group.key()), None)
        if same is None:
            self._groups.append(group)
        return same or group

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
            lines = [f"{m.name}: held-out accuracy {m.accuracy:.2f} ({m.relative_to_black_box:.2f} of the random forest"
                     + (f", {m.relative_to_cnn:.2f} of the CNN" if np.isfinite(m.relative_to_cnn) else "") + ")"
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
