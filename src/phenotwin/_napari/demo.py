"""`phenotwin demo --viewer`: napari with the demo scene, the Translate widget and a translation."""

from __future__ import annotations

from pathlib import Path


def show_demo(model: Path | None = None, steps: int | None = None) -> None:
    """Open napari, load held-out synthetic cells, dock the Translate widget and translate them."""
    import napari

    viewer = napari.Viewer(title="napari-phenotwin demo")
    viewer.open_sample("napari-phenotwin", "demo-scene")
    _, widget = viewer.window.add_plugin_dock_widget("napari-phenotwin", "Translate cells")

    def translate_once(_translator) -> None:
        widget.model_loaded.disconnect(translate_once)
        if steps is not None:  # after the model's defaults filled the controls
            widget.steps.value = steps
        widget.run()

    widget.model_loaded.connect(translate_once)
    if widget.translator is not None:
        translate_once(widget.translator)
    elif model is not None:
        widget.model_path.value = str(model)
        widget.load_model(str(model))
    napari.run()
