"""The "Phenotype map" dock: cells in the batch-robust feature space (or an Affinity-VAE's latents),
and where translated cells went.

Thin over `phenotwin.embed.phenomap.map_steps` / `vae_map_steps`, run in a worker with progress and
Cancel. It adds new layers (the user's layers are never touched): the cells as an image stack, the
map as points coloured by condition (placed to the right of the cells) and the translations as
arrows from each source cell. Selecting points shows the first selected cell in the stack and all
of them side by side in a "Selected cells" layer; on a VAE map, also the first one's latent
traversal along the map's two axes ("Latent traversal", decoded in a worker). A VAE trained here
can be saved ("Save VAE map"), so later cells land on the same map ("Saved VAE map", or
`phenotwin embed map --vae-from`).
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


def ask_replace(parent, text: str) -> bool:
    """A Yes/No dialog (tests replace it)."""
    from qtpy.QtWidgets import QMessageBox

    answer = QMessageBox.question(parent, "Replace the saved map?", text)
    return answer == QMessageBox.StandardButton.Yes


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
        self.save_folder = FileEdit(mode="d", label="Save map to", visible=False,
                                    tooltip="a folder for the VAE and the map's axes (vae.safetensors, vae.json)")
        self.save_button = PushButton(text="Save VAE map", enabled=False, visible=False,
                                      tooltip="keep the VAE trained here, so other cells can be placed on this map")
        self.run_button = PushButton(text="Show map")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self.extend([self.features, self.encoder, self.saved_map, self.vae_steps, self.data, self.translations,
                     self.run_button, self.cancel_button, self.save_folder, self.save_button, self.status])
        self.features.changed.connect(self._on_features)
        self.run_button.changed.connect(self.start)
        self.save_button.changed.connect(self.save)
        self.cancel_button.changed.connect(self.cancel)
        self._worker = None
        self.result = None
        self.points = None

    def _on_features(self, value: str) -> None:
        self.encoder.visible, self.saved_map.visible = value == ENCODER, value == SAVED
        for widget in (self.vae_steps, self.save_folder, self.save_button):
            widget.visible = value == VAE

    def save(self) -> None:
        """Write the VAE map shown (trained here) into Save map to; asks before replacing phenotwin's own files."""
        from phenotwin.embed.phenomap import save_vae
        from phenotwin.embed.saved_map import VAE_INFO, VAE_WEIGHTS

        folder = _path(self.save_folder)
        if folder is None or self.result is None or self.result.vae_description is None:
            show_error("Show a map with 'Affinity-VAE (trained here)' and choose Save map to first.")
            return
        present = [name for name in (VAE_WEIGHTS, VAE_INFO) if (folder / name).exists()]
        if present and not ask_replace(self.native, f"{folder} already holds a VAE map ({', '.join(present)}). "
                                                    "Replace it with this one?"):
            return
        try:
            save_vae(self.result, folder, overwrite=bool(present))
        except PhenotwinError as err:
            show_error(f"Cannot save the map: {err}")
            return
        self.status.value = (f"Saved the VAE map to {folder}: choose 'Saved VAE map' and this folder to place "
                             "other cells on it.")

    def start(self) -> None:
        from phenotwin.embed.phenomap import map_steps, saved_vae_map_steps, vae_map_steps

        kind, data = self.features.value, _path(self.data)
        needed = {ENCODER: (self.encoder, "the encoder folder"), SAVED: (self.saved_map, "the map folder")}.get(kind)
        if data is None or (needed is not None and _path(needed[0]) is None):
            show_error(f"Choose {needed[1]} and the folder of cells first." if needed else
                       "Choose the folder of cells first.")
            return
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.save_button.enabled = False  # until this run's map is shown
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
        self.save_button.enabled = result.vae_description is not None
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
        if result.landmarks is not None:  # a saved map's own conditions, which these cells are compared with
            names, where = result.landmarks
            self.viewer.add_points(where + offset, name="Map conditions", symbol="x", size=16, face_color="white",
                                   features={"condition": names}, text={"string": "{condition}", "color": "white",
                                                                        "anchor": "upper_left"}, ndim=2)
        self.points.selected_data.events.items_changed.connect(self._selected)
        self.viewer.layers.selection.active = self.points  # the layer whose points a click selects
        self.points.mode = "select"
        self.status.value = f"Done: {len(result.coords)} cells" + (f", {len(result.arrows)} translations."
                                                                   if len(result.arrows) else ".")
        for condition, row in (result.nearest or {}).items():
            self.status.value += (f" {condition} lands nearest the map's {row['nearest']} (distance "
                                  f"{row['distances'][row['nearest']]:.2f} of the map's own spread).")
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
