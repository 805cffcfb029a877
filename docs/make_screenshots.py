"""Regenerate the user guide's screenshots from a real napari window.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_screenshots.py
    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_screenshots.py train   # that one only
    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_screenshots.py reopened   # likewise
    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_screenshots.py map   # the map dock's VAE

Needs a screen (Xvfb is fine); uses the shipped demo model and the demo scene.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "images"


def wait(app, condition, timeout=600.0):
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError("napari did not finish in time")
        app.processEvents()
        time.sleep(0.02)
    for _ in range(30):  # let docks and canvas repaint
        app.processEvents()
        time.sleep(0.01)


def main(only: str | None = None) -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    from phenotwin.assets import demo_model_path

    if demo_model_path() is None:
        print("no demo model installed", file=sys.stderr)
        return 2
    OUT.mkdir(exist_ok=True)
    viewer = napari.Viewer(title="napari-phenotwin")
    viewer.window._qt_window.resize(1500, 950)
    app = QApplication.instance()
    if only == "map":
        vae_map(app, viewer)
        viewer.close()
        return 0
    viewer.open_sample("napari-phenotwin", "demo-scene")
    if only == "train":
        train_widget(app, viewer)
        viewer.close()
        return 0
    _, widget = viewer.window.add_plugin_dock_widget("napari-phenotwin", "Translate cells")
    wait(app, lambda: widget.translator is not None)
    viewer.reset_view()
    if only != "reopened":
        viewer.screenshot(str(OUT / "translate-widget-loaded.png"), canvas_only=False)

    widget.run()
    wait(app, lambda: widget.last_result is not None and widget.session.running is None)
    if only == "reopened":
        reopened(app, viewer, widget)
        viewer.close()
        return 0
    for layer in viewer.layers:
        layer.visible = layer.name.startswith("control") and "→" not in layer.name or "Δ" in layer.name
    viewer.screenshot(str(OUT / "translate-heatmap.png"), canvas_only=False)

    widget.results.side_by_side.value = True
    for layer in viewer.layers:
        layer.visible = ("control" in layer.name and "true" not in layer.name) or "Δ" in layer.name
    viewer.reset_view()
    wait(app, lambda: True)
    viewer.screenshot(str(OUT / "translate-side-by-side.png"), canvas_only=False)
    widget.results.side_by_side.value = False

    widget.strength.value = 0.5
    wait(app, lambda: widget.last_result.strength == 0.5 and widget.session.running is None)
    wait(app, lambda: not widget.session.prefetching)  # the dock then says which strengths are ready
    for layer in viewer.layers:
        layer.visible = "→" in layer.name
    viewer.reset_view()
    viewer.screenshot(str(OUT / "translate-strength-0.5.png"), canvas_only=False)

    viewer.window.remove_dock_widget(train_widget(app, viewer))
    reopened(app, viewer, widget)
    per_cell(app, viewer, widget)
    viewer.close()
    print(f"screenshots in {OUT}")
    return 0


def train_widget(app, viewer):
    """The Train widget on the demo scene's layers: each condition's nucleus and golgi layers, the
    channels guessed from their names and what training would get, said before Train."""
    from napari.layers import Image

    from phenotwin._napari.train_widget import TrainWidget

    trainer = TrainWidget(viewer)
    dock = viewer.window.add_dock_widget(trainer, name="Train model", tabify=True)
    trainer.data_source.value = "image layers"
    for row, condition in zip(trainer.layer_groups, ("control", "nocodazole")):
        row[1].value = [layer for layer in viewer.layers if isinstance(layer, Image) and
                        layer.metadata.get("phenotwin", {}).get("condition") == condition]
    trainer.output.value = str(Path.home() / "my-model")
    wait(app, lambda: True)
    viewer.screenshot(str(OUT / "train-widget.png"), canvas_only=False)
    return dock


def reopened(app, viewer, widget) -> None:
    """The result saved with Save results… and opened again by the plugin's reader, in a bare viewer."""
    import tempfile

    from phenotwin._napari.saving import save_results

    path = save_results(viewer, Path(tempfile.mkdtemp()) / "translation.ome.tif", widget.results.result)
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    viewer.open(str(path), plugin="napari-phenotwin")
    viewer.layers.selection.active = viewer.layers[0]
    viewer.reset_view()
    wait(app, lambda: True)
    viewer.screenshot(str(OUT / "saved-results-reopened.png"), canvas_only=False)


def per_cell(app, viewer, widget) -> None:
    """A held-out synthetic field where half the cells took the nocodazole phenotype, with
    its cell segmentation, translated back to control cell by cell."""
    from phenotwin._napari.samples import COLORMAPS, HELD_OUT_START
    from phenotwin.synthetic import as_camera_units, make_pairs

    widget.results.side_by_side.value = False
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    pairs = make_pairs(1, size=192, channels=2, seed=7, start=HELD_OUT_START, changed_fraction=0.5)
    viewer.add_image(as_camera_units(pairs.treated[0]), channel_axis=0, name=["field nucleus", "field golgi"],
                     colormap=COLORMAPS[:2], blending="additive", metadata={"phenotwin": {"condition": "nocodazole"}})
    cells = viewer.add_labels(pairs.cell_labels[0], name="cells", visible=False)
    widget.source.value, widget.target.value = "nocodazole", "control"
    widget.cells.value = cells
    widget.strength.value, widget.steps.value, widget.guidance.value = 0.7, 20, 0.0  # guidance 0: user guide
    widget.run()
    wait(app, lambda: widget.results.cell_result is not None and widget.session.running is None)
    for layer in viewer.layers:
        layer.visible = layer.name in ("field nucleus", "field golgi", "cells scores")
    viewer.layers["cells scores"].contour = 2
    viewer.layers["cells scores"].opacity = 1.0
    viewer.reset_view()
    wait(app, lambda: True)
    viewer.screenshot(str(OUT / "translate-per-cell.png"), canvas_only=False)


def vae_map(app, viewer) -> None:
    """The Phenotype map dock on 40 + 40 held-out synthetic cells (32 px), in the latents of an
    Affinity-VAE trained there at the dock's default steps, one cell selected: its latent traversal."""
    import tempfile

    from phenotwin._napari.map_widget import VAE, PhenotypeMapWidget
    from phenotwin.synthetic import make_pairs, write_folders

    folder = Path(tempfile.mkdtemp()) / "cells"
    write_folders(folder, make_pairs(40, size=32, channels=2, seed=11, start=300_000))
    widget = PhenotypeMapWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Phenotype map")
    widget.features.value, widget.data.value = VAE, str(folder)
    widget.start()
    wait(app, lambda: widget._worker is None and widget.result is not None)
    points = viewer.layers["Phenotype map"]
    points.selected_data = {int(np.argmin(widget.result.coords[:, 1]))}  # the leftmost cell on the map
    wait(app, lambda: "Latent traversal" in viewer.layers)
    viewer.reset_view()
    wait(app, lambda: True)
    viewer.screenshot(str(OUT / "embed-map-vae-traversal.png"), canvas_only=False)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
