"""The "Phenotype map" dock: cells in the batch-robust feature space (or an Affinity-VAE's latents),
and where translated cells went.

Thin over `phenotwin.embed.phenomap.map_steps` / `vae_map_steps`, run in a worker with progress and
Cancel. It adds new layers (the user's layers are never touched): the cells as an image stack, the
map as points coloured by condition (placed to the right of the cells) and the translations as
arrows from each source cell. Selecting points shows the first selected cell in the stack and all
of them side by side in a "Selected cells" layer; on a VAE map, also the first one's latent
traversal along the map's two axes ("Latent traversal", decoded in a worker).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton, SpinBox
from napari.utils.notifications import show_error, show_warning

from phenotwin._napari.workers import start_worker
from phenotwin.errors import PhenotwinError

if TYPE_CHECKING:
    import napari

MAP_GAP = 20  # pixels between the cell stack and the map
ENCODER, VAE, SAVED = "Batch-robust encoder", "Affinity-VAE (trained here)", "Saved VAE map"


def _path(edit: FileEdit) -> Path | None:
    value = str(edit.value)
    return None if value in ("", ".") else Path(value)


class PhenotypeMapWidget(Container):
    """Dock widget: choose an encoder and a folder of cells (and translations), see the map."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.features = ComboBox(label="Features", choices=[ENCODER, VAE, SAVED], value=ENCODER, tooltip=(
            "What places the cells: a trained encoder's features, an Affinity-VAE trained on these cells now "
            "(its latents; selecting a cell then shows what the map's axes change in it), or a VAE map saved by "
            "`phenotwin embed map --vae` (its VAE and axes: these cells land on that map)"))
        self.encoder = FileEdit(mode="d", label="Encoder", tooltip="a folder of `phenotwin embed train`")
        self.saved_map = FileEdit(mode="d", label="Map folder", visible=False,
                                  tooltip="the --out folder of `phenotwin embed map --vae` (holds vae.json)")
        self.vae_steps = SpinBox(label="VAE steps", min=20, max=20000, value=400, visible=False,
                                 tooltip="training steps of the VAE (400: some 15 s for 32 px cells on a 2-core CPU)")
        self.data = FileEdit(mode="d", label="Cells", tooltip="DIR/<condition>/*.tif: the cells to map")
        self.translations = FileEdit(mode="d", label="Translations",
                                     tooltip="optional: translated cells, named after their source image")
        self.run_button = PushButton(text="Show map")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self.extend([self.features, self.encoder, self.saved_map, self.vae_steps, self.data, self.translations,
                     self.run_button, self.cancel_button, self.status])
        self.features.changed.connect(lambda value: (setattr(self.encoder, "visible", value == ENCODER),
                                                     setattr(self.saved_map, "visible", value == SAVED),
                                                     setattr(self.vae_steps, "visible", value == VAE)))
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        self._worker = None
        self.result = None
        self.points = None

    def start(self) -> None:
        from phenotwin.embed.phenomap import map_steps, saved_vae_map_steps, vae_map_steps

        kind, data = self.features.value, _path(self.data)
        needed = {ENCODER: (self.encoder, "the encoder folder"), SAVED: (self.saved_map, "the map folder")}.get(kind)
        if data is None or (needed is not None and _path(needed[0]) is None):
            show_error(f"Choose {needed[1]} and the folder of cells first." if needed else
                       "Choose the folder of cells first.")
            return
        self.run_button.enabled, self.cancel_button.enabled = False, True
        translations = _path(self.translations)
        if kind == VAE:
            steps = vae_map_steps(data, translations, steps=self.vae_steps.value)
        elif kind == SAVED:
            steps = saved_vae_map_steps(_path(self.saved_map), data, translations)
        else:
            steps = map_steps(_path(self.encoder), data, translations)
        self._worker = start_worker(steps,
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
        if result.warning:  # a map the user cannot trust says so, in the dock and as a notification
            self.status.value += f" Warning: {result.warning}"
            show_warning(f"Phenotype map: {result.warning}")

    def _selected(self, event=None) -> None:
        chosen = sorted(self.points.selected_data)
        if not chosen:
            return
        self.viewer.dims.set_current_step(0, chosen[0])
        row = np.concatenate([self.result.images[i, 0] for i in chosen], axis=1)
        height = self.result.images.shape[-2]
        self._put("Selected cells", row, "magma", (height + MAP_GAP, 0))
        if self.result.traversal is not None:
            start_worker(self.result.traversal, chosen[0], returned=self._show_traversal, errored=self._failed)

    def _show_traversal(self, rows: np.ndarray) -> None:
        """Rows (2, count, C, S, S): one line per map axis, first channel, below the selected cells at their scale."""
        size, height = rows.shape[-1], self.result.images.shape[-2]
        grid = np.concatenate([np.concatenate(list(line[:, 0]), axis=1) for line in rows], axis=0)
        self._put("Latent traversal", grid, "gray", (2 * (height + MAP_GAP), 0), scale=height / size)

    def _put(self, name: str, data: np.ndarray, colormap: str, translate, scale: float = 1.0) -> None:
        """Show `data` in this dock's own layer `name`: updated when it exists, else added."""
        if name in self.viewer.layers:
            self.viewer.layers[name].data = data
        else:
            self.viewer.add_image(data, name=name, colormap=colormap, translate=translate, scale=(scale, scale))
