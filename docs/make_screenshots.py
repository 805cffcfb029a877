"""Regenerate the user guide's screenshots from a real napari window.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_screenshots.py

Needs a screen (Xvfb is fine); uses the shipped demo model and the demo scene.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

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


def main() -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    from phenotwin._napari.train_widget import TrainWidget
    from phenotwin.models import demo_model_path

    if demo_model_path() is None:
        print("no demo model installed", file=sys.stderr)
        return 2
    OUT.mkdir(exist_ok=True)
    viewer = napari.Viewer(title="napari-phenotwin")
    viewer.window._qt_window.resize(1500, 950)
    app = QApplication.instance()
    viewer.open_sample("napari-phenotwin", "demo-scene")
    _, widget = viewer.window.add_plugin_dock_widget("napari-phenotwin", "Translate cells")
    wait(app, lambda: widget.translator is not None)
    viewer.reset_view()
    viewer.screenshot(str(OUT / "translate-widget-loaded.png"), canvas_only=False)

    widget.run()
    wait(app, lambda: widget.last_result is not None and widget._worker is None)
    for layer in viewer.layers:
        layer.visible = layer.name.startswith("control") and "→" not in layer.name or "Δ" in layer.name
    viewer.screenshot(str(OUT / "translate-heatmap.png"), canvas_only=False)

    widget.side_by_side.value = True
    for layer in viewer.layers:
        layer.visible = ("control" in layer.name and "true" not in layer.name) or "Δ" in layer.name
    viewer.reset_view()
    wait(app, lambda: True)
    viewer.screenshot(str(OUT / "translate-side-by-side.png"), canvas_only=False)
    widget.side_by_side.value = False

    widget.strength.value = 0.5
    wait(app, lambda: widget.last_result.strength == 0.5 and widget._worker is None)
    for layer in viewer.layers:
        layer.visible = "→" in layer.name
    viewer.reset_view()
    viewer.screenshot(str(OUT / "translate-strength-0.5.png"), canvas_only=False)

    trainer = TrainWidget(viewer)
    viewer.window.add_dock_widget(trainer, name="Train model", tabify=True)
    wait(app, lambda: True)
    viewer.screenshot(str(OUT / "train-widget.png"), canvas_only=False)
    viewer.close()
    print(f"screenshots in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
