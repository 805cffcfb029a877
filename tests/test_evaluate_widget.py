"""The Evaluate model dock widget in a real napari window: runs the checks, shows plots and verdicts, writes reports."""

from __future__ import annotations

import os

import pytest

napari = pytest.importorskip("napari")
pytestmark = [pytest.mark.gui, pytest.mark.skipif(
    not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen",
    reason="needs a display: run under xvfb-run (make test does)",
)]

from phenotwin._napari.evaluate_widget import EvaluateWidget  # noqa: E402

RAW = {"mode": "fixed", "low": [0.0, 0.0], "high": [65535.0, 65535.0]}


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    from phenotwin.synthetic import make_pairs, write_folders
    from phenotwin.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("evaluate-widget")
    model = make_tiny_checkpoint(root / "model", channels=2, size=32, classes=("control", "nocodazole"), normalization=RAW)
    write_folders(root / "train", make_pairs(3, size=32, seed=0))
    write_folders(root / "held-out", make_pairs(3, size=32, seed=0, start=100_000))
    return root, model


@pytest.fixture
def widget(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-phenotwin", "Evaluate model")
    assert isinstance(widget, EvaluateWidget)
    return widget


def run_and_wait(qtbot, widget):
    widget.start()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)


def test_translation_check_shows_numbers_plots_and_writes_the_report(widget, qtbot, material, tmp_path):
    root, model = material
    widget.model.value, widget.data.value = str(model), str(root / "held-out")
    widget.n.value, widget.steps.value = 2, 3
    run_and_wait(qtbot, widget)
    assert widget.status.value == "Done."
    assert widget.result["kind"] == "translation" and len(widget.result["results"]) == 2
    assert "Classifier accuracy" in widget.verdicts.value and "heatmap AUROC" in widget.verdicts.value
    assert len(widget.figure.axes) == 3  # PSNR and ratio histograms, heatmap ROC
    assert any(ax.patches for ax in widget.figure.axes)  # histogram bars were drawn
    widget.report_folder.value = str(tmp_path / "report")
    widget.write_report()
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "translation.json").is_file()


def test_a_flip_rate_no_higher_than_doing_nothing_is_not_called_a_change(widget, qtbot, material):
    """The contradiction seen in the dock: '100% of translations look like control (100% of untranslated
    images do) - the condition changes'. The same real result, with the classifier calling every image,
    translated or not, the target: the line must say no change is shown."""
    import copy

    root, model = material
    widget.model.value, widget.data.value = str(model), str(root / "held-out")
    widget.n.value, widget.steps.value = 2, 3
    run_and_wait(qtbot, widget)
    result = copy.deepcopy(widget.result)
    for row in result["results"]:
        row["flip_rate"], row["untranslated_called_target"] = 1.0, 1.0
    widget._on_done(result)
    lines = [line for line in widget.verdicts.value.splitlines() if "of translations look like" in line]
    assert len(lines) == 2
    for line in lines:
        assert "(100% of untranslated images do)" in line and "the condition changes" not in line
        assert "no more than doing nothing: no change of condition is shown" in line
        assert "already calls 100% of the untranslated images" in line
    for row in result["results"]:  # beaten by a margin: a change, but the high baseline is said
        row["flip_rate"], row["untranslated_called_target"] = 0.95, 0.6
    widget._on_done(result)
    assert widget.verdicts.value.count("more than doing nothing, but the classifier calls most untranslated") == 2
    for row in result["results"]:  # a clean baseline: the plain verdict
        row["flip_rate"], row["untranslated_called_target"] = 0.95, 0.0
    widget._on_done(result)
    assert widget.verdicts.value.count("(0% of untranslated images do) - the condition changes.") == 2


def test_memorization_check_with_identical_models_shows_agreement(widget, qtbot, material):
    root, model = material
    widget.check.value = "memorization"
    assert not widget.model_a.native.isHidden() and widget.model.native.isHidden()  # the window itself is not shown
    widget.model_a.value, widget.model_b.value = str(model), str(model)
    widget.train_a.value, widget.held_out.value = str(root / "train"), str(root / "held-out")
    widget.count.value, widget.steps.value = 2, 3
    run_and_wait(qtbot, widget)
    assert widget.result["a_vs_b"]["median"] > 0.999
    assert widget.verdicts.value.startswith("Verdict: the model ")
    assert widget.figure.axes and widget.figure.axes[0].patches


def test_cancel_stops_the_evaluation(widget, qtbot, material):
    root, model = material
    widget.model.value, widget.data.value = str(model), str(root / "held-out")
    widget.n.value, widget.steps.value = 3, 200
    widget.start()
    qtbot.waitUntil(lambda: widget.status.value.startswith("translate"), timeout=120_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert widget.status.value == "Cancelled." and widget.result is None


def test_missing_settings_give_a_notification_not_a_crash(widget, monkeypatch):
    from phenotwin._napari import evaluate_widget

    messages = []
    monkeypatch.setattr(evaluate_widget, "show_error", messages.append)
    widget.start()
    assert widget._worker is None and "choose the model" in messages[0]


def test_widget_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, phenotwin._napari.evaluate_widget; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
