"""Sizes that let the three docks (Translate, Train, Evaluate) share a 1920x1080 window.

Each widget is a scrollable magicgui container (`scrollable=True`): its dock can be shorter than
its controls, so docking all three never grows the window past the screen. Plots keep a
readable minimum height. Also the help every widget gives: tooltips, a "?" to the user guide,
shortcuts.
"""

from __future__ import annotations

import re
from pathlib import Path

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


GUIDE = Path(__file__).resolve().parents[3] / "docs" / "user-guide.md"  # in a source checkout


def explain(container, tips: dict[str, str]) -> None:
    """Tooltips for a widget's controls, by attribute name (every control has one: a test checks)."""
    for name, tip in tips.items():
        getattr(container, name).tooltip = tip


def help_button(section: str, summary: str):
    """A '?' that opens the user guide at `section` (the local copy when there is one)."""
    from magicgui import widgets

    button = widgets.PushButton(text="?", tooltip=f"{summary} Click: the user guide, section {section!r}.")
    button.native.setMaximumWidth(32)
    button.changed.connect(lambda *_: open_guide(section))
    return button


def guide_url(section: str) -> str | None:
    """The local user guide at `section`'s heading; None outside a source checkout (not shipped)."""
    anchor = re.sub(r"[^\w\- ]", "", section.lower()).replace(" ", "-")
    return f"{GUIDE.as_uri()}#{anchor}" if GUIDE.is_file() else None


def open_guide(section: str) -> None:
    from napari.utils.notifications import show_info
    from qtpy.QtCore import QUrl
    from qtpy.QtGui import QDesktopServices

    url = guide_url(section)
    if url is None or not QDesktopServices.openUrl(QUrl(url)):
        show_info(f"See the user guide, docs/user-guide.md in the napari-phenotwin sources, section {section!r}.")


def shortcut(parent, keys: str, action) -> object:
    """A key sequence for the whole napari window (while the dock is in it) that runs `action`."""
    from qtpy.QtCore import Qt
    from qtpy.QtGui import QKeySequence, QShortcut

    handle = QShortcut(QKeySequence(keys), parent)
    handle.setContext(Qt.ShortcutContext.WindowShortcut)
    handle.activated.connect(action)
    return handle
