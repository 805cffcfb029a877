"""Sizes that let the three docks (Translate, Train, Evaluate) share a 1920x1080 window.

Each widget is a scrollable magicgui container (`scrollable=True`): its dock can be shorter than
its controls, so docking all three never grows the window past the screen. Plots keep a
readable minimum height; docks a minimum width that fits their longest labels.
"""

PLOT_MIN_HEIGHT = 150  # px: a loss curve or a metrics chart still reads


class ScrollableDock:
    """Mixed into a scrollable magicgui Container: `native` is its scroll area.

    napari docks `widget.native`, and a scrollable magicgui container answers its inner widget
    there, so napari would take the controls out of their scroll area (measured: three docks
    grew the window to 2156 px). `add_native` puts a plain Qt widget (a plot) among the controls.
    """

    @property
    def native(self):
        return self.root_native_widget

    def add_native(self, qwidget) -> None:
        self.root_native_widget.widget().layout().addWidget(qwidget)
