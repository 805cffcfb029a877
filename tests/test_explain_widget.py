"""The Explain change dock in a real napari window: the table of effects appears, and selecting a
feature's row marks the cells where that feature changed most."""

from __future__ import annotations

import os

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytestmark = [pytest.mark.gui, pytest.mark.skipif(
    not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen",
    reason="needs a display: run under xvfb-run (make test does)",
)]

from phenotwin._napari.explain_widget import HIGHLIGHT_LAYER, ExplainWidget  # noqa: E402

SIZE = 128


def drawn_field():
    """Four round cells with a nucleus and one or two Golgi spots; in the 'translation' cell 3 gets 6 more
    spots and cell 1 gets 2 more: golgi fragments change most in cell 3, then in cell 1."""
    yy, xx = np.indices((SIZE, SIZE))
    labels = np.zeros((SIZE, SIZE), np.int32)
    nucleus = np.zeros((SIZE, SIZE))
    golgi = np.full((SIZE, SIZE), 0.02)
    translated = golgi.copy()
    centres = {1: (32, 32), 2: (32, 96), 3: (96, 32), 4: (96, 96)}

    def spot(y, x):
        return 0.8 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.2**2))

    for label, (cy, cx) in centres.items():
        labels[np.hypot(yy - cy, xx - cx) <= 26] = label
        nucleus += 0.7 * (np.hypot(yy - cy, xx - cx) <= 6)
        for dy in (10, -10)[: 1 + label % 2]:  # well apart from the added spots (20 px from the centre)
            golgi += spot(cy + dy, cx)
            translated += spot(cy + dy, cx)
        extra = {3: 6, 1: 2}.get(label, 0)
        for angle in np.linspace(0, 2 * np.pi, extra, endpoint=False):
            translated += spot(cy + 20 * np.sin(angle), cx + 20 * np.cos(angle))
    return np.stack([nucleus + 0.02, golgi]), np.stack([nucleus + 0.02, translated]), labels


def test_table_appears_and_selecting_a_row_marks_the_cells_that_changed_most(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    source, translated, labels = drawn_field()
    viewer.add_image(source, name="control", channel_axis=None)
    viewer.add_image(translated, name="translated")
    viewer.add_labels(labels, name="cells")
    _, widget = viewer.window.add_plugin_dock_widget("napari-phenotwin", "Explain change")
    assert isinstance(widget, ExplainWidget)
    widget.source.value = viewer.layers["control"]
    widget.translated.value = viewer.layers["translated"]
    widget.cells.value = viewer.layers["cells"]
    widget.channel_names.value = "nucleus golgi"
    widget.start()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=300_000)
    assert widget.changes is not None, widget.status.value
    assert widget.table.rowCount() == len(widget.changes.effects) == 27
    row = next(r for r in range(widget.table.rowCount()) if widget.table.item(r, 0).text().startswith("golgi fragments"))
    assert widget.table.item(row, 0).text() == "golgi fragments per cell (count)"
    assert widget.table.item(row, 1).text().startswith("+2 [")  # cells gain 2, 0, 6, 0 spots: mean +2
    nucleus_area = next(r for r in range(widget.table.rowCount()) if widget.table.item(r, 0).text().startswith("nucleus area"))
    assert widget.table.item(nucleus_area, 1).text() == "+0 [0, 0]"  # the same cells and nuclei
    widget.table.selectRow(row)
    marked = viewer.layers[HIGHLIGHT_LAYER].data
    assert set(np.unique(marked)) == {0, 1, 3}  # the two cells that changed, biggest first in the status
    assert np.array_equal(marked == 3, labels == 3)
    assert "cell(s) 3 (+6), 1 (+2)" in widget.status.value
    assert np.array_equal(viewer.layers["control"].data, source)  # the user's layers are never changed
    assert len(widget.figure.axes) == 1 and widget.figure.axes[0].get_yticklabels()
