"""The Translate widget in a real napari window (run under Xvfb by `make test`)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from phenotwin._napari import model_registry  # noqa: E402
from phenotwin._napari import translate_widget as tw  # noqa: E402
from phenotwin._napari.layers import image_choices  # noqa: E402
from phenotwin._napari.translate_widget import TranslateWidget  # noqa: E402

requires_display = pytest.mark.skipif(
    not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen",
    reason="needs a display: run under xvfb-run (make test does)",
)


@pytest.fixture
def model(tmp_path_factory):
    from phenotwin.testing import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny_checkpoint(path, kind="pixel", channels=2, size=32, classes=("control", "nocodazole"),
                         normalization={"mode": "fixed", "low": [0.0, 0.0], "high": [4000.0, 4000.0]})
    return path


@pytest.fixture
def cells():
    from phenotwin.synthetic import make_pairs

    pairs = make_pairs(1, size=32, channels=2, seed=3)
    return (pairs.control[0] * 4000).astype(np.uint16)


@pytest.fixture(autouse=True)
def no_cost_dialog(monkeypatch):
    """A busy machine may estimate a long test run over a minute: never a modal dialog in a test
    (the tests about the dialog replace `confirm.ask` again)."""
    from phenotwin._napari import confirm

    monkeypatch.setattr(confirm, "ask", lambda parent, text, crop: confirm.RUN)


def wait_until(qtbot, condition, timeout=60_000):
    qtbot.waitUntil(condition, timeout=timeout)


@pytest.fixture
def viewer_and_widget(make_napari_viewer, qtbot, model, cells):
    viewer = make_napari_viewer()
    layers = viewer.add_image(cells, channel_axis=0, name=["ctrl nucleus", "ctrl golgi"], scale=(0.5, 0.5),
                              translate=(10, 20), metadata={"phenotwin": {"condition": "control"}})
    widget = TranslateWidget(viewer)
    widget.prefetch.value = False  # counted UNet calls stay the user's own; the prefetch tests turn it on
    viewer.window.add_dock_widget(widget, name="Translate cells")
    widget.load_model(str(model))
    wait_until(qtbot, lambda: widget.translator is not None)
    return viewer, widget, layers


def run_and_wait(qtbot, widget):
    widget.run()
    wait_until(qtbot, lambda: widget.session.running is None)


@requires_display
def test_translate_adds_result_layers_with_geometry_and_provenance(viewer_and_widget, qtbot, cells):
    viewer, widget, layers = viewer_and_widget
    assert [p.value.name for p in widget.channel_pickers] == ["ctrl nucleus", "ctrl golgi"]
    assert widget.source.value == "control" and widget.target.value == "nocodazole"  # from layer metadata
    before = [layer.data.copy() for layer in layers]
    widget.steps.value = 6
    run_and_wait(qtbot, widget)
    translated = viewer.layers["ctrl nucleus → nocodazole"]
    heatmap = viewer.layers["ctrl Δ"]
    assert translated.data.shape == cells.shape[1:] and translated.data.dtype == np.uint16
    assert heatmap.data.shape == cells.shape[1:] and heatmap.colormap.name == "inferno"
    np.testing.assert_allclose(translated.scale, (0.5, 0.5))
    np.testing.assert_allclose(heatmap.translate, (10, 20))
    meta = translated.metadata["phenotwin"]
    assert meta["source"] == "control" and meta["target"] == "nocodazole" and meta["steps"] == 6
    assert meta["checkpoint"] == widget.translator.checkpoint_id and np.isfinite(meta["reconstruction_psnr"])
    assert "Reconstruction" in widget.results.quality.value
    for layer, data in zip(layers, before):  # inputs untouched
        np.testing.assert_array_equal(layer.data, data)
    # running again updates the same layers instead of piling up new ones
    count = len(viewer.layers)
    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == count


@requires_display
def test_the_preview_fills_the_result_layers_one_per_event_loop_turn_and_the_translation_replaces_it(
        viewer_and_widget, qtbot):
    viewer, widget, _ = viewer_and_widget
    widget.steps.value = 40  # a preview (10 DPM-Solver++ steps) is cheap enough to show first
    names = ["ctrl nucleus → nocodazole", "ctrl golgi → nocodazole", "ctrl Δ"]
    previews, at_preview = [], []
    widget.session.events.preview.connect(lambda result, _: (previews.append(result), at_preview.append(
        [name in viewer.layers for name in names])))  # runs right after the widget's own handler
    run_and_wait(qtbot, widget)
    assert len(previews) == 1 and at_preview[0] == [True, False, False]  # the others in later turns
    result = widget.last_result
    assert not np.array_equal(previews[0].image, result.image)
    for c, name in enumerate(names[:2]):  # the translation, not a late preview layer
        np.testing.assert_array_equal(viewer.layers[name].data, result.image[c])
    np.testing.assert_array_equal(viewer.layers[names[2]].data, result.heatmap)


@requires_display
def test_scrubbing_regenerates_without_inverting(viewer_and_widget, qtbot):
    viewer, widget, _ = viewer_and_widget
    widget.steps.value = 10
    run_and_wait(qtbot, widget)
    first = viewer.layers["ctrl golgi → nocodazole"].data.copy()
    calls = widget.translator.denoiser.calls
    for value in (0.9, 0.8, 0.7, 0.6, 0.5):  # a drag: many changes, debounced into one or two runs
        widget.strength.value = value
    wait_until(qtbot, lambda: viewer.layers["ctrl golgi → nocodazole"].metadata["phenotwin"]["strength"] == 0.5)
    wait_until(qtbot, lambda: widget.session.running is None)
    # one debounced regeneration at the final strength: 5 of 10 steps, no inversion, no reconstruction
    assert widget.translator.denoiser.calls - calls == 5
    assert not np.array_equal(first, viewer.layers["ctrl golgi → nocodazole"].data)


@requires_display
def test_the_batch_picker_appears_for_a_model_with_batches_and_the_translation_keeps_the_batch(
        make_napari_viewer, qtbot, cells, tmp_path):
    from phenotwin.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "plates", channels=2, size=32, classes=("control", "nocodazole"),
                                batches=("plate1", "plate2"),
                                normalization={"mode": "fixed", "low": [0.0, 0.0], "high": [4000.0, 4000.0]})
    viewer = make_napari_viewer()
    viewer.add_image(cells, channel_axis=0, name=["ctrl nucleus", "ctrl golgi"])
    widget = TranslateWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Translate cells")
    assert widget.batch.native.isHidden()  # the demo model (or none) has no batches
    widget.load_model(str(path))
    wait_until(qtbot, lambda: widget.translator is not None and bool(widget.translator.batches))
    assert not widget.batch.native.isHidden() and list(widget.batch.choices) == ["unknown", "plate1", "plate2"]
    assert widget.settings().batch is None
    widget.steps.value = 4
    shown = {}
    for batch in ("plate2", "unknown"):
        widget.batch.value = batch
        run_and_wait(qtbot, widget)
        layer = viewer.layers["ctrl golgi → nocodazole"]
        shown[batch] = layer.data.copy()
        assert widget.last_result.inversion.batch == (None if batch == "unknown" else batch)
    assert not np.array_equal(shown["plate2"], shown["unknown"])  # a new inversion in the other batch's labels
    widget.batch.value = "plate1"  # not yet translated: the slider stays on the shown inversion's batch
    calls = widget.translator.denoiser.calls
    widget.strength.value = 0.5
    wait_until(qtbot, lambda: viewer.layers["ctrl golgi → nocodazole"].metadata["phenotwin"]["strength"] == 0.5)
    wait_until(qtbot, lambda: widget.session.running is None)
    assert widget.translator.denoiser.calls - calls == 2 and widget.last_result.settings.batch is None


@requires_display
def test_confine_checkbox_masks_the_shown_result_without_new_diffusion_steps(viewer_and_widget, qtbot):
    from phenotwin.pipeline.edit_mask import CONFINE_CALLS

    viewer, widget, layers = viewer_and_widget
    assert not widget.confine.value  # the tiny model's default
    widget.steps.value = 6
    run_and_wait(qtbot, widget)
    name = "ctrl golgi → nocodazole"
    free = viewer.layers[name].data.astype(float)
    calls = widget.translator.denoiser.calls
    widget.confine.value = True
    wait_until(qtbot, lambda: viewer.layers[name].metadata["phenotwin"]["confine"])
    wait_until(qtbot, lambda: widget.session.running is None)
    assert widget.translator.denoiser.calls - calls == CONFINE_CALLS  # the mask only: generations are cached
    mask = widget.last_result.edit_mask[1]
    source = layers[1].data.astype(float)
    confined = viewer.layers[name].data.astype(float)
    # the shown change is the free one weighted by the mask (up to uint16 rounding and clipping)
    change, free_change = np.abs(confined - source), np.abs(free - source)
    assert np.abs(change - mask * free_change).mean() < 0.05 * free_change.mean() + 1.0
    low = mask < 0.9
    assert low.sum() >= 10 and change[low].sum() < 0.95 * free_change[low].sum()
    widget.confine.value = False  # back: from the cache, no model call at all
    wait_until(qtbot, lambda: not viewer.layers[name].metadata["phenotwin"]["confine"])
    wait_until(qtbot, lambda: widget.session.running is None)
    assert widget.translator.denoiser.calls - calls == CONFINE_CALLS
    np.testing.assert_array_equal(viewer.layers[name].data, free)


def translate_with_prefetch(qtbot, widget, steps: int) -> None:
    """A translation with the background prefetch on (the fixture turns it off)."""
    widget.steps.value = steps
    widget.prefetch.value = True
    run_and_wait(qtbot, widget)


def shown_strength(viewer) -> float:
    return viewer.layers["ctrl golgi → nocodazole"].metadata["phenotwin"]["strength"]


@requires_display
def test_prefetched_strengths_are_shown_without_any_model_call(viewer_and_widget, qtbot):
    viewer, widget, _ = viewer_and_widget
    translate_with_prefetch(qtbot, widget, steps=10)
    # Strength 1.0 at 10 steps: the slider's strengths 0.75-0.99 round to 8 and 9 steps.
    wait_until(qtbot, lambda: not widget.session.prefetching and "ready" in widget.prefetch_info.value)
    assert widget.prefetch_info.value.startswith("Strengths 0.75–1.00 are ready")
    calls = widget.translator.denoiser.calls
    widget.strength.value = 0.8
    assert widget.session.running is not None  # cached: shown at once, without the debounce a new strength waits for
    wait_until(qtbot, lambda: shown_strength(viewer) == 0.8)
    assert widget.translator.denoiser.calls == calls
    # The prefetch then starts again around 0.8: 0.55-0.99 round to 6-10 steps; 6 and 7 are new.
    wait_until(qtbot, lambda: not widget.session.prefetching and "0.55–" in widget.prefetch_info.value)
    widget.strength.value = 0.6
    wait_until(qtbot, lambda: shown_strength(viewer) == 0.6)
    assert widget.translator.denoiser.calls - calls == 7 + 6  # the two new strengths, reconstructions in the batch


@requires_display
def test_prefetch_gives_way_to_the_slider_and_to_run(viewer_and_widget, qtbot):
    viewer, widget, _ = viewer_and_widget
    translate_with_prefetch(qtbot, widget, steps=200)
    wait_until(qtbot, lambda: widget.session.prefetching and "Precomputing" in widget.prefetch_info.value)
    calls = widget.translator.denoiser.calls
    widget.strength.value = 0.5  # not prefetched yet: the prefetch stops, the scrub runs, then it restarts
    wait_until(qtbot, lambda: shown_strength(viewer) == 0.5)
    # Far fewer calls than the 25 strengths of 150-199 steps it was working through (~8700 calls)
    assert widget.translator.denoiser.calls - calls < 1500
    wait_until(qtbot, lambda: widget.session.prefetching)
    widget.steps.value = 10
    widget.run()  # a new inversion: waits for the prefetch to stop, then translates
    wait_until(qtbot, lambda: viewer.layers["ctrl golgi → nocodazole"].metadata["phenotwin"]["steps"] == 10)
    wait_until(qtbot, lambda: widget.session.prefetching)
    widget.strength.value = 0.3
    widget.run()  # queued behind the prefetch after the scrub: Translate is not lost to it
    calls = widget.translator.denoiser.calls
    widget.prefetch.value = False
    wait_until(qtbot, lambda: not widget.session.prefetching and widget.session.running is None)
    assert shown_strength(viewer) == 0.3
    assert widget.prefetch_info.native.isHidden()  # stopped early: its last word no longer holds
    assert widget.translator.denoiser.calls - calls <= 3 + 1  # the generation at 0.3, no prefetch after it
    widget.prefetch.value = True  # ticked again: it starts from where the slider is
    wait_until(qtbot, lambda: "are ready" in widget.prefetch_info.value)
    assert all(widget.translator.is_generated(widget.session.inversion, "nocodazole", s) for s in (0.05, 0.3, 0.55))


@requires_display
def test_translate_interrupts_a_slider_update(viewer_and_widget, qtbot):
    viewer, widget, _ = viewer_and_widget
    widget.steps.value = 200
    run_and_wait(qtbot, widget)
    widget.strength.value = 0.9
    wait_until(qtbot, lambda: widget.session.running is not None)  # the slider update (180 steps) is under way
    calls = widget.translator.denoiser.calls
    widget.steps.value = 10
    widget.run()  # not refused: the update stops at its next step and the translation follows
    wait_until(qtbot, lambda: widget.session.running is None
               and viewer.layers["ctrl golgi → nocodazole"].metadata["phenotwin"]["steps"] == 10)
    assert shown_strength(viewer) == 0.9
    assert widget.translator.denoiser.calls - calls < 60  # not the whole 180-step update first


@requires_display
def test_a_runtime_error_in_the_worker_is_reported_and_the_widget_recovers(viewer_and_widget, qtbot, monkeypatch):
    # superqt drops a RuntimeError silently (no errored, no finished): the widget would wait forever.
    from phenotwin.progress import Progress

    viewer, widget, _ = viewer_and_widget
    shown = []
    monkeypatch.setattr(tw, "show_error", shown.append)

    def failing(*args, **kwargs):
        yield Progress("invert", 1, 2)
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(widget.translator, "invert_steps", failing)
    widget.steps.value = 7
    run_and_wait(qtbot, widget)
    assert shown == ["Translation failed: the computation stopped with RuntimeError: DefaultCPUAllocator: "
                     "not enough memory"]
    assert widget.run_button.enabled and widget.session.running is None


@requires_display
def test_cancel_stops_the_run(viewer_and_widget, qtbot):
    viewer, widget, _ = viewer_and_widget
    widget.steps.value = 400
    calls = widget.translator.denoiser.calls
    widget.run()
    wait_until(qtbot, lambda: widget.translator.denoiser.calls - calls >= 2)
    widget.cancel()
    wait_until(qtbot, lambda: widget.session.running is None)
    assert widget.translator.denoiser.calls - calls < 400
    assert widget.status.value == "Cancelled."
    assert "ctrl golgi → nocodazole" not in viewer.layers


@requires_display
def test_event_loop_keeps_running_during_translation(viewer_and_widget, qtbot):
    from qtpy.QtCore import QTimer

    _, widget, _ = viewer_and_widget
    widget.steps.value = 60
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    started = time.perf_counter()
    run_and_wait(qtbot, widget)
    timer.stop()
    elapsed = time.perf_counter() - started
    assert len(ticks) > 10
    # the GUI thread was never blocked for the whole run (benchmarks report the real figure)
    assert np.max(np.diff(ticks)) < elapsed / 2


@requires_display
def test_bad_layers_give_notifications_not_crashes(viewer_and_widget, qtbot, monkeypatch):
    viewer, widget, _ = viewer_and_widget
    shown = []
    monkeypatch.setattr(tw, "show_error", shown.append)
    flat = [viewer.add_image(np.full((32, 32), 7, dtype=np.uint16), name=f"flat {c}") for c in range(2)]
    widget.channel_pickers[0].value, widget.channel_pickers[1].value = flat
    widget.run()
    assert "constant" in shown[-1]
    labels = viewer.add_labels(np.zeros((32, 32), dtype=np.uint8), name="cells")
    assert labels not in [layer for _, layer in image_choices(viewer)]  # never offered as an image
    small = [viewer.add_image(np.random.default_rng(c).random((8, 8)), name=f"tiny {c}") for c in range(2)]
    widget.channel_pickers[0].value, widget.channel_pickers[1].value = small
    widget.run()
    assert "16x16" in shown[-1]
    labels.data = np.ones((20, 20), dtype=np.uint8)  # cells of another image
    widget.cells.value = labels
    widget.channel_pickers[0].value = viewer.layers["ctrl nucleus"]
    widget.channel_pickers[1].value = viewer.layers["ctrl golgi"]
    widget.run()
    assert widget.session.running is None and "labels are (20, 20) but the image plane is (32, 32)" in shown[-1]
    widget.planes.value = tw.ALL_PLANES
    widget.run()
    assert "per-cell mode translates the plane shown" in shown[-1]


@requires_display
def test_pickers_never_change_silently(viewer_and_widget, qtbot, monkeypatch, cells):
    viewer, widget, layers = viewer_and_widget
    warned = []
    monkeypatch.setattr(widget.channel_pickers, "_warn", warned.append)
    pickers = widget.channel_pickers
    other = viewer.add_image(cells, channel_axis=0, name=["noco nucleus", "noco golgi"],
                             metadata={"phenotwin": {"condition": "nocodazole"}})
    # the same layer for two channels is refused, with a message; the picker keeps its layer
    pickers[1].value = layers[0]
    assert pickers[1].value is layers[1] and "refused" in warned[-1]
    # deleting the golgi layer never switches the picker to another condition's golgi
    viewer.layers.remove(layers[1])
    assert pickers[0].value is layers[0] and pickers[1].value is None
    assert "another condition" in pickers.note.value and not pickers.note.native.isHidden() and warned[-1]
    assert other[1] in [layer for _, layer in image_choices(viewer)]  # still offered: the user may pick it
    # a (3, 32, 32) layer is a stack, and the dock says so (and which plane is used)
    stack = viewer.add_image(np.stack([cells[0]] * 3), name="three planes")
    pickers[1].value = stack
    assert "3 planes, read as a stack" in widget.axes_info.value and "plane shown (0)" in widget.axes_info.value


@requires_display
def test_the_slider_is_off_with_a_reason_after_a_per_cell_run(viewer_and_widget, qtbot):
    viewer, widget, _ = viewer_and_widget
    labels = np.zeros((32, 32), dtype=np.int32)
    labels[4:14, 4:14] = 1
    widget.cells.value = viewer.add_labels(labels, name="cells")
    widget.steps.value = 2
    run_and_wait(qtbot, widget)
    assert not widget.strength.enabled and "cannot re-score" in widget.slider_info.value
    assert not widget.slider_info.native.isHidden()
    widget.cells.value = None  # a single image next: the slider sets (and then scrubs) it again
    assert widget.strength.enabled and widget.slider_info.native.isHidden()


@requires_display
def test_three_docks_fit_a_1920x1080_window(make_napari_viewer, qtbot, model, cells):
    """Translate, Train and Evaluate docked together, with a result shown: the window stays 1920x1080
    (each widget scrolls inside its dock), and the plots keep a readable height."""
    from qtpy.QtWidgets import QApplication

    from phenotwin._napari.evaluate_widget import EvaluateWidget
    from phenotwin._napari.train_widget import TrainWidget

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1920, 1080)
    viewer.add_image(cells, channel_axis=0, name=["ctrl nucleus", "ctrl golgi"])
    translate = TranslateWidget(viewer)
    translate.prefetch.value = False
    train, evaluate = TrainWidget(viewer), EvaluateWidget(viewer)
    for widget, name in ((translate, "Translate cells"), (train, "Train model"), (evaluate, "Evaluate model")):
        viewer.window.add_dock_widget(widget, name=name)
    translate.load_model(str(model))
    wait_until(qtbot, lambda: translate.translator is not None)
    translate.cells.value = viewer.add_labels(np.pad(np.ones((10, 10), np.int32), 11), name="cells")
    translate.steps.value = 2
    run_and_wait(qtbot, translate)  # the per-cell lines and buttons are shown too
    for _ in range(20):
        QApplication.processEvents()
        qtbot.wait(20)
    _, _, width, height = viewer.window.geometry()
    assert width <= 1920 and height <= 1080
    assert train.plot.canvas.height() >= 120 and evaluate.canvas.height() >= 120


def controls(container):
    """Every control (not a text line) of a magicgui container, nested containers included."""
    from magicgui.widgets import Container, Label

    for child in container:
        if isinstance(child, Container):
            yield from controls(child)
        elif not isinstance(child, Label):
            yield child


@requires_display
def test_every_control_has_a_tooltip_a_help_button_and_shortcuts(viewer_and_widget, qtbot, monkeypatch):
    from phenotwin._napari import layout
    from phenotwin._napari.evaluate_widget import EvaluateWidget
    from phenotwin._napari.train_widget import TrainWidget

    viewer, widget, layers = viewer_and_widget
    for dock in (widget, TrainWidget(viewer), EvaluateWidget(viewer)):
        missing = [child.label or child.name for child in controls(dock) if not child.tooltip]
        assert not missing, f"{type(dock).__name__}: no tooltip on {missing}"
        assert dock.help.text == "?" and "user guide" in dock.help.tooltip
    opened = []
    monkeypatch.setattr(layout, "open_guide", opened.append)
    widget.help.changed.emit(True)
    assert opened == ["Translate cells"] and layout.guide_url("Translate cells").endswith("#translate-cells")
    keys = {handle.key().toString(): handle for handle in widget.shortcuts}
    assert set(keys) == {tw.TRANSLATE_KEYS, tw.CANCEL_KEYS, tw.BEFORE_AFTER_KEYS}
    widget.steps.value = 2
    keys[tw.TRANSLATE_KEYS].activated.emit()
    wait_until(qtbot, lambda: widget.session.running is None and widget.last_result is not None)
    keys[tw.BEFORE_AFTER_KEYS].activated.emit()
    assert all(layer.visible for layer in layers)


@requires_display
def test_keep_this_result_pins_it_as_its_own_layers(viewer_and_widget, qtbot):
    viewer, widget, layers = viewer_and_widget
    widget.steps.value = 2
    run_and_wait(qtbot, widget)
    kept = widget.results.keep()
    assert [layer.name for layer in kept] == ["ctrl nucleus → nocodazole [kept 1]", "ctrl golgi → nocodazole [kept 1]",
                                              "ctrl Δ [kept 1]"]
    pinned = [layer.data.copy() for layer in kept]
    assert kept[0].metadata["phenotwin"]["steps"] == 2  # the provenance stays
    assert kept[0] not in [layer for _, layer in image_choices(viewer)]  # never offered as an input
    widget.steps.value = 3
    run_and_wait(qtbot, widget)
    assert len(widget.result_layers("translation")) == 2  # new layers for the new run
    assert widget.result_layers("translation")[0].metadata["phenotwin"]["steps"] == 3
    for layer, data in zip(kept, pinned):
        assert layer in viewer.layers
        np.testing.assert_array_equal(layer.data, data)


@requires_display
def test_deleting_the_source_layer_mid_run_is_handled(viewer_and_widget, qtbot):
    viewer, widget, layers = viewer_and_widget
    widget.steps.value = 30
    widget.run()
    viewer.layers.remove(layers[0])
    wait_until(qtbot, lambda: widget.session.running is None)
    assert "ctrl golgi → nocodazole" in viewer.layers  # results still arrive, computed from the copy


@requires_display
def test_the_slider_no_longer_updates_results_of_a_deleted_layer(viewer_and_widget, qtbot):
    viewer, widget, layers = viewer_and_widget
    translate_with_prefetch(qtbot, widget, steps=10)
    wait_until(qtbot, lambda: not widget.session.prefetching)  # 0.8 is cached now: it would show at once
    viewer.layers.remove(layers[0])
    count = len(viewer.layers)
    widget.target.value = "control"
    widget.strength.value = 0.8
    qtbot.wait(2 * tw.SCRUB_DEBOUNCE_MS)
    assert widget.session.running is None and not widget.session.prefetching and len(viewer.layers) == count


def visible(layers_) -> list[bool]:
    return [layer.visible for layer in layers_]


@requires_display
def test_the_default_view_reads_at_a_glance_and_every_view_is_stable(viewer_and_widget, qtbot):
    from phenotwin._napari.results_panel import AFTER, BEFORE
    from phenotwin._napari.views import caption

    viewer, widget, layers = viewer_and_widget
    other = viewer.add_image(np.zeros((32, 32), np.uint16), name="someone else's layer")
    widget.steps.value = 4
    run_and_wait(qtbot, widget)
    results = widget.results
    translations, heatmap = widget.result_layers("translation"), widget.result_layers("heatmap")[0]
    # after Translate: the translation alone, the heatmap behind its own toggle, with a colour legend
    assert all(visible(translations)) and not any(visible(layers)) and not heatmap.visible
    assert heatmap.colorbar.visible
    results.heatmap.value = True
    assert heatmap.visible and all(visible(translations))
    results.heatmap.value = False
    # Before / after: two states, the same ones at every press; the heatmap is left to its toggle
    for _ in range(3):
        results.toggle_before_after()
        assert results.before_after.value == BEFORE
        assert all(visible(layers)) and not any(visible(translations)) and not heatmap.visible
        results.toggle_before_after()
        assert results.before_after.value == AFTER
        assert all(visible(translations)) and not any(visible(layers)) and not heatmap.visible
    # side by side: input | translation | heatmap, one panel each, labelled, fitted, stable across presses
    results.toggle_before_after()  # from the "before" state: side by side still shows every panel
    for _ in range(2):
        results.side_by_side.value = True
        grid = viewer.canvas.grid
        assert grid.enabled and grid.stride == 2
        ours = [*layers, *translations, heatmap]
        assert all(visible(ours)) and not other.visible
        positions = [grid.position(viewer.layers.index(layer), viewer.layers) for layer in ours]
        assert positions[0] == positions[1] and positions[2] == positions[3]
        assert len({positions[0], positions[2], positions[4]}) == 3  # three panels
        assert caption(viewer).visible and caption(viewer).text.split() == ["input", "|", "translation",
                                                                                   "|", "heatmap"]
        assert layers[0].name_overlay.visible and translations[0].name_overlay.visible and heatmap.name_overlay.visible
        results.side_by_side.value = False
        assert not grid.enabled and other.visible and not caption(viewer).visible
        assert all(visible(layers)) and not any(visible(translations))  # back to the state it left


@requires_display
def test_a_garbage_input_never_reads_fair_or_good(make_napari_viewer, qtbot, monkeypatch):
    """A float [0, 1] image given to the demo model (trained on 16-bit camera units): the dock and a
    notification say it does not fit, for a whole image and for a per-cell run (the worst cell)."""
    from phenotwin._napari import results_panel

    notes = []
    monkeypatch.setattr(results_panel, "show_warning", notes.append)
    viewer = make_napari_viewer()
    garbage = np.random.default_rng(0).random((2, 64, 64)).astype(np.float32)
    viewer.add_image(garbage, channel_axis=0, name=["nucleus", "golgi"])
    widget = TranslateWidget(viewer)  # loads the shipped demo model by itself
    widget.prefetch.value = False
    viewer.window.add_dock_widget(widget)
    wait_until(qtbot, lambda: widget.translator is not None)
    widget.steps.value = 2
    for cells in (None, viewer.add_labels((np.arange(64 * 64).reshape(64, 64) % 64 > 40).astype(np.int32))):
        widget.cells.value = cells
        run_and_wait(qtbot, widget)
        fit, quality = widget.results.fit_line, widget.results.quality.value
        assert not fit.native.isHidden() and "does not fit" in fit.value
        assert "fair" not in quality.lower() and "good" not in quality.lower() and "not trust" in quality
    assert len(notes) == 2 and all("does not fit" in note for note in notes)


@requires_display
def test_the_match_intensities_box_fits_a_rescaled_image_and_says_so(make_napari_viewer, qtbot):
    """A real cell exported as a [0, 1] float does not fit the demo model; ticking Match intensities
    maps its percentiles onto the training range: it fits, a new inversion is made (the cached one
    saw other pixels), the result records the matching, and the user's layer is left as it was."""
    from phenotwin.synthetic import make_pairs

    viewer = make_napari_viewer()
    cell = make_pairs(1, size=64, channels=2, seed=0, start=100_000).control[0].astype(np.float32)  # [0, 1]
    layers = viewer.add_image(cell.copy(), channel_axis=0, name=["nucleus", "golgi"])
    widget = TranslateWidget(viewer)
    widget.prefetch.value = False
    viewer.window.add_dock_widget(widget)
    wait_until(qtbot, lambda: widget.translator is not None)
    widget.steps.value = 2
    run_and_wait(qtbot, widget)
    assert widget.last_result.fit.level == "does-not-fit" and "does not fit" in widget.results.fit_line.value
    unmatched = widget.last_result.inversion
    widget.match_intensities.value = True
    run_and_wait(qtbot, widget)
    result = widget.last_result
    assert result.fit.level == "ok" and result.fit.matched and result.inversion is not unmatched
    assert result.metadata()["match_intensities"] is True
    assert "does not fit" not in widget.results.fit_line.value
    np.testing.assert_array_equal(np.stack([layer.data for layer in layers]), cell)


@requires_display
def test_plugin_machinery_opens_the_widget_and_loads_sample_data(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-phenotwin", "demo-scene")
    assert "control golgi" in viewer.layers and "nocodazole golgi" in viewer.layers
    dock, widget = viewer.window.add_plugin_dock_widget("napari-phenotwin", "Translate cells")
    assert isinstance(widget, TranslateWidget)
    assert [p.value.name for p in widget.channel_pickers][0].startswith("control")


def test_plugin_module_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, phenotwin._napari.translate_widget, phenotwin._napari.samples; "
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


TWO_LOADS_AT_ONCE = """
import sys, threading
from phenotwin._napari.workers import call
from phenotwin import Translator

errors = []

def run():
    try:
        call(Translator, sys.argv[1])
    except Exception as err:
        errors.append(repr(err))

threads = [threading.Thread(target=run) for _ in range(2)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(errors)
"""


def test_two_workers_loading_models_at_once_both_succeed(model):
    # The demo model still loading when the user picks another one: two worker threads import
    # diffusers' lazily resolved classes at once, which failed with "cannot import name
    # 'AutoencoderKL'". A fresh interpreter, because this process resolved them long ago.
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", TWO_LOADS_AT_ONCE, str(model)], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.fixture
def train_viewer(make_napari_viewer):
    from phenotwin.synthetic import make_pairs

    viewer = make_napari_viewer()
    pairs = make_pairs(3, size=40, channels=1, seed=1)
    control = [viewer.add_image((im[0] * 4000).astype(np.uint16), name=f"ctrl {i}") for i, im in enumerate(pairs.control)]
    treated = [viewer.add_image((im[0] * 4000).astype(np.uint16), name=f"noc {i}") for i, im in enumerate(pairs.treated)]
    return viewer, control, treated


def configure_from_layers(widget, control, treated, out, steps):
    widget.data_source.value = "image layers"
    first, second = widget.layer_groups
    first[0].value, second[0].value = "control", "nocodazole"
    first[1].value, second[1].value = control, treated
    widget.size.value = 32
    widget.steps.value = steps
    widget.output.value = str(out)


@requires_display
def test_train_widget_trains_from_layers_and_opens_the_model(train_viewer, qtbot, tmp_path):
    from phenotwin._napari.model_registry import translate_widget_of
    from phenotwin._napari.train_widget import TrainWidget
    from phenotwin.checkpoint import read_info

    viewer, control, treated = train_viewer
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    configure_from_layers(widget, control, treated, tmp_path / "model", steps=4)
    widget.reconstruction_target.value = 38
    widget.start()
    wait_until(qtbot, lambda: widget._worker is None, timeout=120_000)
    assert widget.plot.steps == [1, 2, 3, 4] and all(np.isfinite(widget.plot.losses))
    info = read_info(tmp_path / "model")
    assert info.classes == ["control", "nocodazole"] and info.provenance["steps"] == 4
    assert info.provenance["config"]["reconstruction_target"] == 38  # the dock's field reaches the calibration
    assert widget.open_button.enabled
    widget.open_in_translate()
    translate = translate_widget_of(viewer)
    wait_until(qtbot, lambda: translate.translator is not None and translate.translator.classes == info.classes)


@requires_display
def test_train_widget_stop_saves(train_viewer, qtbot, tmp_path):
    from phenotwin._napari.train_widget import TrainWidget
    from phenotwin.checkpoint import read_info

    viewer, control, treated = train_viewer
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    configure_from_layers(widget, control, treated, tmp_path / "model", steps=100_000)
    widget.start()
    wait_until(qtbot, lambda: len(widget.plot.steps) >= 2, timeout=120_000)
    widget.stop()
    wait_until(qtbot, lambda: "Stopped at step" in widget.status.value, timeout=120_000)
    saved = read_info(tmp_path / "model").provenance["steps"]
    assert 2 <= saved < 100_000 and "Stopped at step" in widget.status.value
    assert read_info(tmp_path / "model").provenance["config"]["reconstruction_target"] is None  # 0 in the dock: off
    # how to continue, in the dock's own words (no command-line flag)
    assert "--" not in widget.status.value and "set If the folder has a model to 'continue its training'" in \
        widget.status.value and widget.open_button.enabled
    wait_until(qtbot, lambda: widget._worker is None and widget.train_button.enabled)
    widget.existing.value, widget.steps.value = "continue its training", saved + 2  # as the dock says
    widget.start()
    wait_until(qtbot, lambda: widget._worker is None, timeout=180_000)
    assert read_info(tmp_path / "model").provenance["steps"] == saved + 2


@requires_display
def test_train_widget_reports_bad_data(train_viewer, qtbot, tmp_path, monkeypatch):
    from phenotwin._napari import train_widget
    from phenotwin._napari.train_widget import TrainWidget

    shown = []
    monkeypatch.setattr(train_widget, "show_error", shown.append)
    viewer, control, _ = train_viewer
    widget = TrainWidget(viewer)
    configure_from_layers(widget, control, [], tmp_path / "model", steps=4)
    widget.start()
    assert widget._worker is None and "'nocodazole' has no layers: pick its image layers" in shown[-1]


@requires_display
def test_demo_opens_the_scene_with_a_translation(qtbot, monkeypatch, model):
    from phenotwin._napari import demo

    monkeypatch.setattr(napari, "run", lambda: None)
    demo.show_demo(model, steps=4)
    viewer = napari.current_viewer()
    try:
        widget = model_registry.translate_widget_of(viewer)
        wait_until(qtbot, lambda: widget.last_result is not None and widget.session.running is None)
        assert "control golgi" in viewer.layers
        assert widget.result_layers("translation") and widget.result_layers("heatmap")
    finally:
        viewer.close()


@requires_display
def test_deleting_a_result_layer_mid_run_recreates_it(viewer_and_widget, qtbot):
    viewer, widget, _ = viewer_and_widget
    widget.steps.value = 4
    run_and_wait(qtbot, widget)
    widget.steps.value = 30
    widget.run()
    viewer.layers.remove("ctrl Δ")
    wait_until(qtbot, lambda: widget.session.running is None)
    assert "ctrl Δ" in viewer.layers and viewer.layers["ctrl Δ"].metadata["phenotwin"]["steps"] == 30


@requires_display
def test_closing_the_widget_stops_a_running_translation(make_napari_viewer, qtbot, model, cells):
    """What napari does to its docks when it closes: the widget is destroyed mid-run."""
    viewer = make_napari_viewer()
    viewer.add_image(cells, channel_axis=0, name=["a nucleus", "a golgi"])
    widget = TranslateWidget(viewer)
    dock = viewer.window.add_dock_widget(widget)
    widget.load_model(str(model))
    wait_until(qtbot, lambda: widget.translator is not None and widget.translator.checkpoint_path == model)
    widget.steps.value = 1000
    translator = widget.translator
    widget.run()
    wait_until(qtbot, lambda: translator.denoiser.calls > 0)
    assert widget.session.running == "run"
    viewer.window.remove_dock_widget(dock)
    widget.native.deleteLater()
    wait_until(qtbot, lambda: widget.session.running is None)  # the worker has ended
    assert translator.denoiser.calls < 1000 and widget._closed


@requires_display
def test_a_progress_event_queued_before_the_dock_closes_touches_no_deleted_control(make_napari_viewer, qtbot):
    """napari's activity bar processes Qt events while it updates: the dock's deletion can run
    inside the progress slot (seen in CI as "QProgressBar has been deleted")."""
    from napari.utils import progress
    from qtpy.QtCore import QObject, Qt, Signal

    from phenotwin.progress import Progress

    class Worker(QObject):
        yielded = Signal(object)

    viewer = make_napari_viewer()
    widget = TranslateWidget(viewer)
    dock = viewer.window.add_dock_widget(widget)
    wait_until(qtbot, lambda: widget.translator is not None)  # the demo model, loaded by default
    bars_before = set(progress._all_instances)
    deleted_while_updating = []
    widget.native.destroyed.connect(lambda *_: deleted_while_updating.append(widget._dock.activity._busy))
    worker = Worker()
    worker.yielded.connect(widget.session.events.progress.emit, Qt.ConnectionType.QueuedConnection)
    worker.yielded.emit(Progress("invert", 1, 10))  # queued, as from the worker thread...
    viewer.window.remove_dock_widget(dock)
    widget.native.deleteLater()  # ...then the dock is closed
    qtbot.wait(200)
    assert deleted_while_updating == [True]  # the case of the CI failure: deleted inside the slot
    widget.session.events.finished.emit()  # the worker's end, after the widget is gone
    assert set(progress._all_instances) == bars_before  # no bar left in the activity dock


def statuses(widget) -> list[str]:
    """Every status line the widget shows while running (a Label emits no signal when set).

    Read when the progress slot hands over to the activity bar, its last call: the bar
    processes Qt events, so by the time the slot returns the run may have ended and the
    status line moved on."""
    seen = []
    activity = widget._dock.activity
    show = activity.show

    def record(*args):
        seen.append(widget.status.value)
        show(*args)

    activity.show = record
    widget._tiles.progressed.connect(lambda *_: seen.append(widget.status.value))  # after the widget's slot
    return seen


@requires_display
def test_per_cell_mode_scores_cells_in_a_new_labels_layer(viewer_and_widget, qtbot, tmp_path):
    import csv

    viewer, widget, _ = viewer_and_widget
    cells = np.zeros((32, 32), dtype=np.int32)
    cells[4:14, 4:14] = 3
    cells[18:30, 16:28] = 5
    user_labels = viewer.add_labels(cells, name="cells", scale=(0.5, 0.5), translate=(10, 20))
    widget.cells.value = user_labels
    widget.steps.value = 4
    seen = statuses(widget)
    run_and_wait(qtbot, widget)
    np.testing.assert_array_equal(user_labels.data, cells)  # the user's labels are untouched
    assert "phenotwin" not in user_labels.metadata
    scores = viewer.layers["cells scores"]
    assert isinstance(scores, napari.layers.Labels) and scores is not user_labels
    np.testing.assert_allclose(scores.scale, (0.5, 0.5))
    features = scores.features
    assert list(features["index"]) == [3, 5] and list(features["area"]) == [100, 144]
    heat = viewer.layers["ctrl Δ"].data
    assert not heat[cells == 0].any()
    assert features["change"][1] == pytest.approx(heat[cells == 5].mean(), rel=1e-5)
    # coloured by change: the two cells get different colours, the background stays transparent
    colors = scores.colormap.color_dict
    assert not np.allclose(colors[3], colors[5]) and colors[0][3] == 0
    assert any(text.startswith("Cell 2/2: generate step") for text in seen)
    assert "Most changed cells" in widget.results.top_cells.value
    widget.results.save_scores(tmp_path / "scores.csv")
    with open(tmp_path / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["label"]) for row in rows] == [3, 5]
    assert float(rows[1]["change"]) == pytest.approx(features["change"][1])
    assert "change_nucleus" in rows[0] or "change_channel 1" in rows[0]
    import json  # the settings and provenance of the run: a sidecar JSON beside the CSV

    sidecar = json.loads((tmp_path / "scores.json").read_text())
    assert sidecar["settings"] == widget.last_result.settings.to_dict() and sidecar["cells"] == 2
    assert sidecar["checkpoint"] == widget.translator.checkpoint_id


@requires_display
def test_explain_change_opens_the_explain_dock_on_the_per_cell_result(viewer_and_widget, qtbot):
    """The results' "Explain change…" hands a per-cell run to the Explain change dock: its pickers name
    the run's layers (a channel layer each, as one choice), it measures the run's very cells, and a
    second press reuses the dock. A whole-image result has nothing to explain cell by cell."""
    from phenotwin._napari import explain_widget
    from phenotwin.explain.pipeline import feature_key

    viewer, widget, sources = viewer_and_widget
    cells = np.zeros((32, 32), dtype=np.int32)
    for label, (y, x) in {1: (2, 2), 2: (2, 17), 4: (17, 2), 7: (17, 17)}.items():
        cells[y:y + 13, x:x + 13] = label
    user_labels = viewer.add_labels(cells, name="cells", scale=(0.5, 0.5), translate=(10, 20))
    widget.cells.value = user_labels
    widget.steps.value = 4
    assert not widget.results.explain_button.enabled  # nothing translated yet
    run_and_wait(qtbot, widget)
    result = widget.last_result
    assert widget.results.explain_button.enabled
    widget.results.explain_button.native.click()
    docks = [w for w in explain_widget._open_docks if w.viewer.__wrapped__ is viewer]
    assert len(docks) == 1
    dock = docks[0]
    assert dock.source.value.name == "ctrl nucleus + ctrl golgi"
    assert dock.translated.value.name == "ctrl nucleus → nocodazole + ctrl golgi → nocodazole"
    assert dock.cells.value.name == "cells scores"  # the run's own cells (the plane it scored)
    names = model_registry.channel_names(widget.translator)
    assert dock.channel_names.value.split() == [feature_key(name) for name in names]
    qtbot.waitUntil(lambda: dock._worker is None, timeout=120_000)
    changes = dock.changes
    assert changes is not None, dock.status.value
    assert [int(row["label"]) for row in changes.before] == [row["label"] for row in result.scores] == [1, 2, 4, 7]
    np.testing.assert_array_equal(changes.labels, cells)
    assert not changes.segmented and explain_widget.CELLS_LAYER not in viewer.layers
    np.testing.assert_array_equal(dock._read(dock.translated.value), result.image)  # the translation of this run
    np.testing.assert_array_equal(dock._read(dock.source.value), np.stack([layer.data for layer in sources]))
    assert dock.table.rowCount() == len(changes.effects) > 0
    shown = {dock.table.item(row, 0).text().split(" ")[0] for row in range(dock.table.rowCount())}
    assert {feature_key(name) for name in names} <= shown  # every channel's features, by the model's names
    assert dock.status.value.startswith("4 cells measured")
    np.testing.assert_array_equal(user_labels.data, cells)  # the user's layers are never changed
    assert "phenotwin" not in user_labels.metadata

    widget.results.explain_button.native.click()  # again: the same dock, run again
    assert [w for w in explain_widget._open_docks if w.viewer.__wrapped__ is viewer] == [dock]
    qtbot.waitUntil(lambda: dock._worker is None, timeout=120_000)

    widget.cells.value = None  # a whole image: the button is off
    run_and_wait(qtbot, widget)
    assert widget.last_result is not result and not widget.results.explain_button.enabled


@requires_display
def test_all_planes_of_a_stack_give_results_of_the_stack_shape(viewer_and_widget, qtbot, cells):
    viewer, widget, _ = viewer_and_widget
    rng = np.random.default_rng(1)
    stack = np.stack([np.clip(cells * (1 + 0.3 * k) + rng.integers(0, 200, cells.shape), 0, 4000)
                      for k in range(3)]).astype(np.uint16)  # (T, C, Y, X)
    layers = viewer.add_image(stack, channel_axis=1, name=["t nucleus", "t golgi"])
    widget.channel_pickers[0].value, widget.channel_pickers[1].value = layers
    widget.planes.value = tw.ALL_PLANES
    widget.steps.value = 3
    seen = statuses(widget)
    run_and_wait(qtbot, widget)
    translated = viewer.layers["t golgi → nocodazole"].data
    assert translated.shape == (3, 32, 32) and translated.dtype == np.uint16
    assert viewer.layers["t Δ"].data.shape == (3, 32, 32)
    assert not np.array_equal(translated[0], translated[2])
    assert any(text.startswith("Plane 3/3: generate step 3/3") for text in seen)
    assert viewer.layers["t Δ"].metadata["phenotwin"]["planes"] == 3
    np.testing.assert_array_equal(layers[1].data, stack[:, 1])  # the stack is untouched
    # the current plane alone still works
    widget.planes.value = tw.CURRENT_PLANE
    run_and_wait(qtbot, widget)
    assert viewer.layers["t golgi → nocodazole"].data.shape == (32, 32)


@requires_display
def test_rgb_layers_feed_the_model_channel_by_channel(make_napari_viewer, qtbot, tmp_path):
    from phenotwin.testing import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "rgb", kind="pixel", channels=3, size=32, classes=("a", "b"))
    viewer = make_napari_viewer()
    photo = np.random.default_rng(0).integers(0, 255, (32, 32, 3)).astype(np.uint8)
    layer = viewer.add_image(photo, rgb=True, name="photo")
    widget = TranslateWidget(viewer)
    widget.load_model(str(model))
    wait_until(qtbot, lambda: widget.translator is not None and widget.translator.channels == 3)
    assert [picker.value.name for picker in widget.channel_pickers] == ["photo [R]", "photo [G]", "photo [B]"]
    widget.steps.value = 3
    run_and_wait(qtbot, widget)
    red = viewer.layers["photo [R] → b"]
    assert red.data.shape == (32, 32) and red.data.dtype == np.uint8 and red.colormap.name == "red"
    np.testing.assert_array_equal(layer.data, photo)


@requires_display
def test_a_field_larger_than_the_model_shows_tile_progress(viewer_and_widget, qtbot):
    viewer, widget, _ = viewer_and_widget
    field = np.random.default_rng(2).integers(0, 4000, (2, 80, 80)).astype(np.uint16)
    layers = viewer.add_image(field, channel_axis=0, name=["big nucleus", "big golgi"])
    widget.channel_pickers[0].value, widget.channel_pickers[1].value = layers
    widget.steps.value = 2
    seen = statuses(widget)
    run_and_wait(qtbot, widget)
    # 80 px in 32 px tiles overlapping by a quarter: 3 x 3 = 9 tiles, batches of 8
    assert any(text.endswith("tile 8/9") for text in seen) and any(text.endswith("tile 9/9") for text in seen)
    assert viewer.layers["big Δ"].data.shape == (80, 80)
    assert widget.translator.denoiser.tile_progress is None  # the hook is removed after the run


def test_model_info_says_how_the_model_was_trained():
    assert model_registry.training_summary({"steps": 3000}) == ", trained 3000 steps"
    fine_tuned = {"steps": 2000, "base": {"path": "base", "provenance": {"steps": 3000}}}
    assert model_registry.training_summary(fine_tuned) == ", fine-tuned 2000 steps from a 3000-step base"
    assert model_registry.training_summary({}) == ""


@requires_display
def test_one_progress_bar_counts_the_runs_model_calls_with_the_time_left(viewer_and_widget, qtbot):
    viewer, widget, _ = viewer_and_widget
    widget.steps.value, widget.strength.value, widget.confine.value = 20, 0.5, True
    bar, seen = widget.progress_bar.native, []
    bar.valueChanged.connect(lambda value: seen.append((value, bar.maximum(), bar.format())))
    calls = widget.translator.denoiser.calls
    run_and_wait(qtbot, widget)
    # inversion (half way), edit mask, generation at half strength; the preview first (cost.preview_of: 5 DPM-Solver++
    # inversion steps, 6 generation steps, one mask draw per level that the translation's mask then completes):
    # known before it starts
    total = 10 + 12 + 10 + 5 + 6
    assert widget.translator.denoiser.calls - calls == total
    values = [value for value, _, _ in seen if value]
    assert len(values) >= 3 and values == sorted(values) and values[-1] == total  # never restarts at a stage
    assert {maximum for value, maximum, _ in seen if value} == {total}
    assert any(text.endswith("s left") and f"of {total} model calls" in text for _, _, text in seen)
    assert seen[-1][2] == f"{total} of {total} model calls"  # done: no time left to say


@requires_display
def test_a_long_run_asks_first_and_can_translate_the_view_instead(viewer_and_widget, qtbot, monkeypatch):
    from phenotwin import cost
    from phenotwin._napari import confirm

    viewer, widget, _ = viewer_and_widget
    field = np.random.default_rng(4).integers(0, 4000, (2, 96, 96)).astype(np.uint16)
    big = viewer.add_image(field, channel_axis=0, name=["big nucleus", "big golgi"], scale=(0.5, 0.5),
                           translate=(10, 20))
    widget.channel_pickers[0].value, widget.channel_pickers[1].value = big
    widget.steps.value, widget.strength.value = 4, 1.0
    monkeypatch.setitem(cost.SECONDS_PER_CALL, widget.translator.checkpoint_id, 10.0)  # a slow machine
    asked, answer = [], ["cancel"]
    monkeypatch.setattr(confirm, "ask", lambda parent, text, crop: asked.append((text, crop)) or answer[0])
    widget.run()
    tiles = cost.tiles_for(96, 96, 32)
    seconds = (4 + 4) * tiles * 10.0
    assert tiles > 1 and asked[0][0] == (f"This translation makes 8 model calls x {tiles} tiles, "
                                         f"{cost.about(seconds)} on this machine. Start it?")
    assert widget.session.running is None and "big Δ" not in viewer.layers  # declined: nothing ran
    viewer.camera.center, viewer.camera.zoom = (10 + 0.5 * 30, 20 + 0.5 * 40), 1000.0  # into pixel (30, 40)
    answer[0] = "crop"
    widget.run()
    assert asked[1][1] == "Translate the view only (32x32 px: 8 model calls, about 80 s on this machine)"
    wait_until(qtbot, lambda: widget.session.running is None and "big Δ" in viewer.layers)
    heat = viewer.layers["big Δ"]
    assert heat.data.shape == (32, 32)  # the model-sized crop around the view, placed where it lies
    np.testing.assert_allclose(heat.translate, (10 + 14 * 0.5, 20 + 24 * 0.5))
    np.testing.assert_array_equal(widget.last_result.inversion.normalised.shape[-2:], (32, 32))


@requires_display
def test_the_precompute_is_off_on_a_cpu_and_cancel_stops_it(viewer_and_widget, qtbot):
    viewer, widget, _ = viewer_and_widget
    widget.prefetch.value = True
    widget.load_model(str(widget.translator.checkpoint_path))  # the model's device sets the default
    wait_until(qtbot, lambda: not widget.prefetch.value)
    assert widget.translator.device.type == "cpu" and not widget.session.prefetch_enabled
    translate_with_prefetch(qtbot, widget, steps=200)
    wait_until(qtbot, lambda: widget.session.prefetching and "Cancel stops it" in widget.prefetch_info.value)
    assert widget.cancel_button.enabled  # visibly cancellable
    widget.cancel_button.native.click()
    wait_until(qtbot, lambda: not widget.session.prefetching)
    qtbot.wait(300)
    assert not widget.session.prefetching and not widget.cancel_button.enabled  # and it does not come back


@requires_display
def test_save_results_writes_ome_tiff_that_napari_reopens_with_settings_and_colormaps(viewer_and_widget, qtbot,
                                                                                     tmp_path):
    import tifffile

    viewer, widget, _ = viewer_and_widget
    widget.steps.value, widget.strength.value, widget.seed.value = 6, 0.5, 7
    run_and_wait(qtbot, widget)
    saved = widget.result_layers("translation") + widget.result_layers("heatmap")
    path = widget.results.save(tmp_path / "result.ome.tif")
    with tifffile.TiffFile(path) as tif:  # a real OME-TIFF: the channels, in OME's axis order
        assert tif.is_ome and tif.series[0].axes == "CYX" and tif.series[0].shape == (3, 32, 32)
    reopened = viewer.open(path, plugin="napari-phenotwin")
    settings = widget.last_result.settings.to_dict()
    assert [layer.name for layer in reopened] == [f"{layer.name} [1]" for layer in saved]  # beside the originals
    for layer, original in zip(reopened, saved):
        np.testing.assert_array_equal(layer.data, original.data)  # the pixels, in their own dtype
        assert layer.data.dtype == original.data.dtype
        meta, before = layer.metadata["phenotwin"], original.metadata["phenotwin"]
        assert meta["settings"] == settings and meta["settings"]["seed"] == 7 and meta["settings"]["steps"] == 6
        assert meta["role"] == f"kept {before['role']}"  # a kept result: never updated, never an input
        assert {k: v for k, v in meta.items() if k not in ("role", "settings", "saved_as")} == \
            {k: v for k, v in before.items() if k != "role"}  # every provenance field
        assert layer.colormap.name == original.colormap.name and layer.blending == original.blending
        np.testing.assert_allclose(layer.contrast_limits, original.contrast_limits)
        np.testing.assert_allclose(layer.scale, (0.5, 0.5))
        np.testing.assert_allclose(layer.translate, (10, 20))
    assert all(layer.name not in [name for name, _ in image_choices(viewer)] for layer in reopened)


def ome_pixels(path):
    """The OME-XML Pixels element of a file, and its channels' names, as another OME reader sees them."""
    import xml.etree.ElementTree as ElementTree

    import tifffile

    with tifffile.TiffFile(path) as tif:
        root = ElementTree.fromstring(tif.ome_metadata)
    pixels = next(e for e in root.iter() if e.tag.endswith("}Pixels"))
    return pixels.attrib, [c.attrib.get("Name") for c in pixels if c.tag.endswith("}Channel")]


@requires_display
def test_saved_results_carry_the_standard_ome_scale_units_and_channel_names(viewer_and_widget, qtbot, tmp_path):
    viewer, widget, sources = viewer_and_widget
    widget.steps.value = 4
    run_and_wait(qtbot, widget)
    pixels, channels = ome_pixels(widget.results.save(tmp_path / "pixels.ome.tif"))
    # napari's default unit (pixel: no reader said) is written as µm, the microscopy readers' unit of scale
    assert (float(pixels["PhysicalSizeX"]), float(pixels["PhysicalSizeY"])) == (0.5, 0.5)
    assert pixels["PhysicalSizeXUnit"] == pixels["PhysicalSizeYUnit"] == "µm"
    assert channels == ["ctrl nucleus → nocodazole", "ctrl golgi → nocodazole", "ctrl Δ"]

    for layer in sources:  # a reader that said nanometres, and another scale
        layer.units, layer.scale = ("nm", "nm"), (65.0, 65.0)
    run_and_wait(qtbot, widget)
    assert [str(u) for u in widget.result_layers("translation")[0].units] == ["nanometer", "nanometer"]
    path = widget.results.save(tmp_path / "nm.ome.tif")
    pixels, _ = ome_pixels(path)
    assert (float(pixels["PhysicalSizeX"]), pixels["PhysicalSizeXUnit"]) == (65.0, "nm")
    reopened = viewer.open(path, plugin="napari-phenotwin")
    assert [str(u) for u in reopened[0].units] == ["nanometer", "nanometer"]
    np.testing.assert_allclose(reopened[0].scale, (65.0, 65.0))


@pytest.fixture
def two_channel_viewer(make_napari_viewer):
    """Per-channel layers as the plugin's sample makes them: 'control nucleus 0', 'control golgi 0', ...,
    with the condition in their metadata; two images per condition."""
    from phenotwin.synthetic import make_pairs

    viewer = make_napari_viewer(show=True)
    pairs = make_pairs(2, size=40, channels=2, seed=2)
    chosen = {}
    for condition, images in (("control", pairs.control), ("nocodazole", pairs.treated)):
        chosen[condition] = [viewer.add_image((image[c] * 4000).astype(np.uint16), name=f"{condition} {channel} {i}",
                                              metadata={"phenotwin": {"condition": condition}})
                             for i, image in enumerate(images) for c, channel in enumerate(("nucleus", "golgi"))]
    return viewer, chosen


@requires_display
def test_train_from_per_channel_layers_makes_a_two_channel_model_and_says_so(two_channel_viewer, qtbot, tmp_path):
    from qtpy.QtWidgets import QApplication

    from phenotwin._napari import train_widget as tw_train
    from phenotwin.checkpoint import read_info

    viewer, chosen = two_channel_viewer
    widget = tw_train.TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train model")
    widget.data_source.value = "image layers"
    first, second = widget.layer_groups
    first[1].value, second[1].value = chosen["control"], chosen["nocodazole"]
    # the names come from the layers' metadata, the channels from their names; said before training
    assert [first[0].value, second[0].value] == ["control", "nocodazole"]
    assert widget.channels.value == "nucleus, golgi"
    assert widget.built.value == ("Training data: 2-channel images (nucleus, golgi): control 2 images, "
                                  "nocodazole 2 images.") and not widget.built.native.isHidden()
    for _ in range(10):
        QApplication.processEvents()
    for box in (first[0], second[0]):  # the condition's name reads whole, not 'codazole'
        assert box.native.width() >= box.native.fontMetrics().horizontalAdvance(box.value) + 8
    widget.size.value, widget.steps.value, widget.output.value = 32, 2, str(tmp_path / "model")
    widget.start()
    wait_until(qtbot, lambda: widget._worker is None, timeout=600_000)  # a busy shared CPU
    info = read_info(tmp_path / "model")
    assert info.channels == 2 and info.channel_names == ["nucleus", "golgi"]
    assert info.classes == ["control", "nocodazole"]
    assert widget.built.value.startswith("Training data: 2-channel images (nucleus, golgi): control ")
    assert widget.open_button.enabled and widget.open_button.text == tw_train.OPEN_TEXT

    # the next run: while it trains, Open in Translate is off and says why (never the last model, nor this one)
    widget.steps.value, widget.output.value = 100_000, str(tmp_path / "next")
    widget.start()
    assert widget._worker is not None and not widget.open_button.enabled
    assert "when training has finished" in widget.open_button.text and widget.trained is None
    widget.open_in_translate()  # even when asked in code: nothing opens
    assert model_registry.translate_widget_of(viewer) is None
    wait_until(qtbot, lambda: len(widget.plot.steps) >= 1, timeout=600_000)  # a busy shared CPU
    widget.stop()
    wait_until(qtbot, lambda: "Stopped at step" in widget.status.value, timeout=600_000)  # a busy shared CPU
    assert widget.open_button.enabled and widget.trained.resolve() == (tmp_path / "next").resolve()


@requires_display
def test_train_widget_errors_name_its_own_controls_not_command_line_flags(train_viewer, qtbot, tmp_path, monkeypatch):
    from phenotwin._napari import train_widget as tw_train
    from phenotwin.testing import make_tiny_checkpoint

    shown = []
    monkeypatch.setattr(tw_train, "show_error", shown.append)
    viewer, control, treated = train_viewer
    widget = tw_train.TrainWidget(viewer)
    make_tiny_checkpoint(tmp_path / "model", kind="pixel", channels=1, size=32)  # a model already there
    configure_from_layers(widget, control, treated, tmp_path / "model", steps=2)
    widget.start()
    assert widget._worker is None and "already holds a model" in shown[-1]
    assert "--" not in shown[-1] and "set If the folder has a model to 'replace it'" in shown[-1]
    widget.existing.value = tw_train.CONTINUE  # nothing to continue there: said in the dock's words too
    widget.start()
    assert widget._worker is None and "nothing to resume" in shown[-1] and "--" not in shown[-1]
    assert "Set If the folder has a model to 'stop and say so'" in shown[-1]
    assert not widget.open_button.enabled


def add_layer_data(viewer, layer_data):
    for data, kwargs, kind in layer_data:
        (viewer.add_image if kind == "image" else viewer.add_labels)(data, **kwargs)


@requires_display
def test_layers_of_conditions_the_model_lacks_load_a_model_that_knows_them(viewer_and_widget, qtbot, tmp_path):
    """The subtle sample shows control and treated; the loaded model knows control and nocodazole. A model
    met in this process (here built by the test, as the Train widget would) knows them: the dock loads it."""
    from phenotwin._napari.samples import _pairs_layers
    from phenotwin.testing import make_tiny_checkpoint

    viewer, widget, _ = viewer_and_widget
    subtle = make_tiny_checkpoint(tmp_path / "subtle-model", kind="pixel", channels=2, size=32,
                                  classes=("control", "treated"))
    model_registry.remember_model(subtle)
    add_layer_data(viewer, _pairs_layers("subtle", 32))  # 'control nucleus', ..., 'treated golgi'
    wait_until(qtbot, lambda: widget.translator.classes == ["control", "treated"])
    wait_until(qtbot, lambda: widget.source.value == "control" and widget.target.value == "treated")
    assert widget.model_path.value.resolve() == subtle.resolve()
    assert "which knows these layers' conditions (control, treated)" in widget.conditions_note.value
    assert not widget.conditions_note.native.isHidden()


@requires_display
def test_no_loaded_model_knows_the_layers_conditions_and_the_dock_says_what_to_do(viewer_and_widget, qtbot,
                                                                                  monkeypatch, cells):
    from phenotwin._napari import model_match

    warned = []
    monkeypatch.setattr(model_match, "show_warning", warned.append)
    viewer, widget, _ = viewer_and_widget
    before = widget.translator
    viewer.add_image(cells, channel_axis=0, name=["bfa nucleus", "bfa golgi"],
                     metadata={"phenotwin": {"condition": "brefeldin"}})
    note = widget.conditions_note
    assert "No loaded model knows brefeldin" in note.value and not note.native.isHidden()
    assert "these layers show control, brefeldin" in note.value and "Train model" in note.value
    assert "Load model" in note.value and len(warned) == 1 and warned[0] == note.value
    assert widget.translator is before  # nothing better to load: the model stays, and the dock has said why
    viewer.layers.remove("bfa golgi")
    viewer.layers.remove("bfa nucleus")
    assert note.native.isHidden() and len(warned) == 1
