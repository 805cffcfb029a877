"""The "Phenotype map" dock: cells in the batch-robust feature space, and where translated cells went.

Thin over `phenotwin.embed.phenomap.map_steps`, run in a worker with progress and Cancel. It adds
three new layers (the user's layers are never touched): the cells as an image stack, the map as
points coloured by condition (placed to the right of the cells) and the translations as arrows
from each source cell. Selecting points shows the first selected cell in the stack and all of
them side by side in a "Selected cells" layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import Container, FileEdit, Label, PushButton
from napari.utils.notifications import show_error

from phenotwin._napari.workers import start_worker
from phenotwin.errors import PhenotwinError

if TYPE_CHECKING:
    import napari

MAP_GAP = 20  # pixels between the cell stack and the map


def _path(edit: FileEdit) -> Path | None:
    value = str(edit.value)
    return None if value in ("", ".") else Path(value)


class PhenotypeMapWidget(Container):
    """Dock widget: choose an encoder and a folder of cells (and translations), see the map."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.encoder = FileEdit(mode="d", label="Encoder", tooltip="a folder of `phenotwin embed train`")
        self.data = FileEdit(mode="d", label="Cells", tooltip="DIR/<condition>/*.tif: the cells to map")
        self.translations = FileEdit(mode="d", label="Translations",
                                     tooltip="optional: translated cells, named after their source image")
        self.run_button = PushButton(text="Show map")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.extend([self.encoder, self.data, self.translations, self.run_button, self.cancel_button, self.status])
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        self._worker = None
        self.result = None
        self.points = None

    def start(self) -> None:
        from phenotwin.embed.phenomap import map_steps

        encoder, data = _path(self.encoder), _path(self.data)
        if encoder is None or data is None:
            show_error("Choose the encoder folder and the folder of cells first.")
            return
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self._worker = start_worker(map_steps(encoder, data, _path(self.translations)),
                                    yielded=lambda p: setattr(self.status, "value", p.describe()),
                                    returned=self._show, errored=self._failed, finished=self._finished)

    def cancel(self) -> None:
        if self._worker is not None:
            self._worker.quit()
            self.status.value = "Cancelled."

    def _finished(self) -> None:
        self._worker = None
        self.run_button.enabled, self.cancel_button.enabled = True, False

    def _failed(self, error: Exception) -> None:
        self.status.value = "Failed."
        show_error(str(error) if isinstance(error, PhenotwinError) else f"The map failed: {error}")

    def _show(self, result) -> None:
        self.result = result
        height, width = result.images.shape[-2:]
        self.viewer.add_image(result.images[:, 0], name="Map cells", colormap="gray")
        offset = np.array([0.0, width + MAP_GAP])
        self.points = self.viewer.add_points(
            result.coords + offset, name="Phenotype map", size=10, features={"condition": result.conditions},
            face_color="condition", border_width=0, ndim=2)
        if len(result.arrows):
            arrows = result.arrows.copy()
            arrows[:, 0] += offset
            self.viewer.add_vectors(arrows, name="Translations", edge_width=1.5, edge_color="white", vector_style="arrow")
        self.points.selected_data.events.items_changed.connect(self._selected)
        self.points.mode = "select"
        self.status.value = f"Done: {len(result.coords)} cells" + (f", {len(result.arrows)} translations."
                                                                   if len(result.arrows) else ".")

    def _selected(self, event=None) -> None:
        chosen = sorted(self.points.selected_data)
        if not chosen:
            return
        self.viewer.dims.set_current_step(0, chosen[0])
        row = np.concatenate([self.result.images[i, 0] for i in chosen], axis=1)
        if "Selected cells" in self.viewer.layers:
            self.viewer.layers["Selected cells"].data = row
        else:
            self.viewer.add_image(row, name="Selected cells", colormap="magma",
                                  translate=(self.result.images.shape[-2] + MAP_GAP, 0))
