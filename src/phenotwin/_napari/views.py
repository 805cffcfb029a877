"""How a result is shown: one state, applied to the layers in full every time.

Overlay (the default after Translate): the translation *or* the input (Before / after, two
states), and the heatmap only when its own toggle is on, with a colour legend. Side by side:
napari's grid with input | translation | heatmap, each in its own panel, labelled and fitted
to the window; the user's other layers are hidden while it is on and shown again after. The
state is applied whole (not toggled layer by layer), so repeated presses always give the same
view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from phenotwin._napari.layers import result_layers

if TYPE_CHECKING:
    import napari

    from phenotwin._napari.layers import SourcePlanes

PANELS_TEXT = "input  |  translation  |  heatmap"


@dataclass
class ResultView:
    """What the dock's view controls say; `apply` makes the layers match."""

    after: bool = True  # the translation (True) or the input (False)
    heatmap: bool = False
    grid: bool = False
    hidden: list = field(default_factory=list)  # the user's layers hidden by the grid, shown again after

    def apply(self, viewer: napari.Viewer, sources: SourcePlanes | None, stride: int) -> None:
        inputs = [layer for layer in sources.layers if layer in viewer.layers] if sources is not None else []
        translations, heatmaps = result_layers(viewer, "translation"), result_layers(viewer, "heatmap")
        grid = _grid(viewer)
        if self.grid and sources is not None:
            self._hide_others(viewer, inputs + translations + heatmaps)
            _order(viewer, inputs, translations, heatmaps)
            for layer in inputs + translations + heatmaps:
                layer.visible = True
            grid.stride, grid.enabled = max(1, stride), True
        else:
            grid.enabled = False
            self._show_others(viewer)
            for layer in translations:
                layer.visible = self.after
            for layer in inputs:
                layer.visible = not self.after
            for layer in heatmaps:
                layer.visible = self.heatmap
        for layer in heatmaps:
            legend(layer)
        _label_panels(viewer, inputs, translations, heatmaps, self.grid and sources is not None)
        if self.grid and sources is not None:
            viewer.reset_view()  # every panel whole in the window

    def _hide_others(self, viewer, ours: list) -> None:
        for layer in viewer.layers:
            if layer not in ours and layer.visible:
                layer.visible = False
                self.hidden.append(layer)

    def _show_others(self, viewer) -> None:
        for layer in self.hidden:
            if layer in viewer.layers:
                layer.visible = True
        self.hidden.clear()


def legend(layer) -> None:
    """The heatmap's colour legend (napari's colorbar, where this napari has one)."""
    colorbar = getattr(layer, "colorbar", None)
    if colorbar is not None:
        colorbar.visible = True


def _order(viewer, inputs: list, translations: list, heatmaps: list) -> None:
    """Ours first in the layer list, in panel order: napari's grid puts `stride` consecutive layers
    (one per channel) in a panel; the heatmap's panel holds only hidden layers besides it."""
    for position, layer in enumerate(inputs + translations + heatmaps):
        viewer.layers.move(viewer.layers.index(layer), position)


def _label_panels(viewer, inputs: list, translations: list, heatmaps: list, on: bool) -> None:
    """Each panel's first layer names it (the layer-name overlay), and a caption says the order."""
    firsts = [group[0] for group in (inputs, translations, heatmaps) if group]
    for layer in inputs + translations + heatmaps:
        overlay = getattr(layer, "name_overlay", None)
        if overlay is not None:
            overlay.visible = on and layer in firsts
    text = caption(viewer)
    text.text, text.position, text.visible = PANELS_TEXT if on else "", "top_center", on


def caption(viewer):
    """The canvas's text overlay (`viewer.canvas.overlays.text` since napari 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    return overlays.text if overlays is not None and hasattr(overlays, "text") else viewer.text_overlay


def _grid(viewer):
    """The viewer's grid settings: `viewer.canvas.grid` since napari 0.9 (`viewer.grid` is deprecated there)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid
