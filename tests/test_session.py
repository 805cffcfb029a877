"""The Translate widget's session without Qt or napari: job priorities, the latest value, a deleted source.

A hand-driven runner stands in for napari's workers: each `step()` does what napari's
generator worker does once (abort if quit was asked, else advance the steps one yield),
and the handlers run on the test's thread, as napari runs them on the GUI thread. So the
tests decide exactly when a job makes progress, with a real tiny model underneath.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from phenotwin import cost
from phenotwin._napari.session import RunRequest, TranslationSession
from phenotwin.pipeline import TranslationSettings

STEPS = 6


class Worker:
    """One job, advanced by hand like napari's GeneratorWorker."""

    def __init__(self, steps, yielded=None, returned=None, errored=None, aborted=None, finished=None):
        self.steps, self.quit_requested, self.done = steps, False, False
        self.handlers = {"yielded": yielded, "returned": returned, "errored": errored, "aborted": aborted,
                         "finished": finished}

    def quit(self) -> None:
        self.quit_requested = True

    def _emit(self, name, *args) -> None:
        if self.handlers[name] is not None:
            self.handlers[name](*args)

    def step(self) -> None:
        if self.quit_requested:
            self._emit("aborted")
            return self._finish()
        try:
            event = next(self.steps)
        except StopIteration as stop:
            self._emit("returned", stop.value)
            return self._finish()
        except Exception as err:  # noqa: BLE001 (napari hands any error to `errored`)
            self._emit("errored", err)
            return self._finish()
        self._emit("yielded", event)

    def _finish(self) -> None:
        self.done = True
        self._emit("finished")

    def run(self) -> None:
        while not self.done:
            self.step()


class Runner:
    """The injected `start_worker`: records each job and its kind."""

    def __init__(self) -> None:
        self.workers: list[Worker] = []

    def __call__(self, steps, **handlers) -> Worker:
        self.workers.append(Worker(steps, **handlers))
        return self.workers[-1]

    @property
    def last(self) -> Worker:
        return self.workers[-1]

    def drain(self) -> None:
        """Run every job to its end, and those each one starts after it (not the prefetch's)."""
        while any(not w.done for w in self.workers):
            next(w for w in self.workers if not w.done).run()


@pytest.fixture
def translator(translators, torch_one_thread):
    return translators["pixel"]


@pytest.fixture
def runner():
    return Runner()


@pytest.fixture
def session(translator, runner):
    session = TranslationSession(runner)
    session.set_translator(translator)
    session.prefetch_enabled = False  # on only where a test is about it
    session.seen = {name: [] for name in ("started", "result", "error", "cancelled", "finished", "tiles")}
    events = session.events
    events.started.connect(session.seen["started"].append)
    events.result.connect(lambda result, context: session.seen["result"].append((result, context)))
    events.error.connect(lambda err, what: session.seen["error"].append(f"{what}: {err}"))
    events.cancelled.connect(lambda: session.seen["cancelled"].append(True))
    events.finished.connect(lambda: session.seen["finished"].append(True))
    events.tiles.connect(lambda done, total: session.seen["tiles"].append((done, total)))
    return session


def settings(**changes) -> TranslationSettings:
    return TranslationSettings(source="control", target="treated", strength=1.0, steps=STEPS, guidance=0.0,
                               confine=False, seed=0).replace(**changes)


def request(image, **changes) -> RunRequest:
    return RunRequest(image, settings(**changes), fingerprint=str(hash(image.tobytes())), context="the layers")


def results(session) -> list:
    return [result for result, _ in session.seen["result"]]


def test_the_session_imports_neither_qt_napari_nor_torch():
    code = ("import sys, phenotwin._napari.session; "
            "print(sorted(m for m in ('qtpy', 'PyQt5', 'PyQt6', 'PySide6', 'napari', 'superqt', 'magicgui', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_run_matches_the_translator_and_a_scrub_reuses_its_inversion(session, runner, translator, cells):
    assert session.run(request(cells))
    assert session.running == "run" and session.inversion is None  # nothing adopted before the result arrives
    runner.drain()
    (result, context), = session.seen["result"]
    direct = translator.translate(cells, "control", "treated", strength=1.0, steps=STEPS, seed=0, channel_axis=0)
    np.testing.assert_array_equal(result.image, direct.image)
    assert context == "the layers" and session.inversion is result.inversion and session.running is None
    assert session.seen["started"] == ["Translating"] and session.seen["finished"] == [True]
    calls = translator.denoiser.calls
    session.scrub(settings(strength=0.5))
    assert session.running == "scrub"
    runner.drain()
    assert session.seen["started"][-1] == "Updating"
    assert results(session)[-1].strength == 0.5 and results(session)[-1].inversion is result.inversion
    assert translator.denoiser.calls - calls == 3  # 3 of 6 steps, no inversion
    calls = translator.denoiser.calls
    session.run(request(cells, strength=0.5))  # the same plane, source and steps: the inversion is reused
    runner.drain()
    assert translator.denoiser.calls == calls and results(session)[-1].inversion is result.inversion


def test_a_run_interrupts_a_scrub(session, runner, translator, cells):
    session.run(request(cells))
    runner.drain()
    session.scrub(settings(strength=0.9))
    scrub = runner.last
    scrub.step()
    assert session.run(request(cells, strength=0.4, steps=4))  # not refused: Translate wins
    assert scrub.quit_requested and len(runner.workers) == 2  # the run waits for the scrub to stop
    runner.drain()
    assert session.seen["cancelled"] == [True] and session.seen["started"] == ["Translating", "Updating", "Translating"]
    assert [r.steps for r in results(session)] == [STEPS, 4] and results(session)[-1].strength == 0.5  # 2 of 4 steps


def test_a_run_stops_the_prefetch_and_goes_before_a_queued_scrub(session, runner, translator, cells):
    session.set_prefetch(True)
    session.run(request(cells))
    runner.workers[0].run()
    prefetch = runner.last
    assert session.prefetching and len(runner.workers) == 2  # idle time: the strengths around 1.0
    prefetch.step()
    session.scrub(settings(strength=0.5))
    assert prefetch.quit_requested and session.running is None  # the scrub waits for the prefetch to stop
    session.run(request(cells, steps=4))
    prefetch.step()  # stops
    assert not session.prefetching and session.running == "run"  # the run, not the scrub
    runner.last.run()
    assert session.seen["started"] == ["Translating", "Translating"]  # the scrub was replaced by the run
    assert results(session)[-1].steps == 4
    assert session.prefetching  # and afterwards the prefetch starts again, around the new result


def test_a_queued_run_takes_the_newest_slider_value(session, runner, translator, cells):
    session.set_prefetch(True)
    session.run(request(cells))
    runner.workers[0].run()
    session.run(request(cells, steps=4))  # the prefetch stops first
    session.scrub(settings(strength=0.5))  # the slider moves meanwhile: the run reads it too
    runner.workers[1].step()
    session.set_prefetch(False)
    runner.drain()
    assert session.seen["started"] == ["Translating", "Translating"]
    assert results(session)[-1].steps == 4 and results(session)[-1].strength == 0.5


def test_the_latest_scrub_value_wins(session, runner, translator, cells):
    session.run(request(cells))
    runner.drain()
    session.scrub(settings(strength=0.9))
    runner.last.step()
    for strength in (0.7, 0.6, 0.5):  # a drag while the first update runs
        session.scrub(settings(strength=strength))
    assert len(runner.workers) == 2  # nothing new before the update under way ends
    runner.drain()
    assert [r.strength for r in results(session)] == [1.0, pytest.approx(5 / 6), 0.5]  # 0.9 -> 5 of 6 steps


def test_deleting_the_source_mid_run_drops_the_inversion(session, runner, translator, cells):
    session.set_prefetch(True)
    session.run(request(cells))
    runner.last.step()
    session.drop_inversion()  # the source layer is deleted while the run inverts it
    runner.last.run()
    assert len(results(session)) == 1  # the result still arrives: it was computed from a copy
    assert session.inversion is None and not session.prefetching
    session.scrub(settings(strength=0.5))  # no slider updates of a deleted layer's results
    assert len(runner.workers) == 1 and session.running is None


def test_cancel_stops_the_run_and_nothing_starts_after_it(session, runner, translator, cells):
    session.set_prefetch(True)
    session.run(request(cells))
    runner.last.step()
    session.cancel()
    runner.drain()
    assert session.seen["cancelled"] == [True] and not results(session)
    assert len(runner.workers) == 1 and not session.prefetching


def test_bad_settings_are_refused_before_anything_stops(session, runner, translator, cells):
    from phenotwin.errors import PhenotwinError

    with pytest.raises(PhenotwinError, match="strength"):
        session.run(request(cells, strength=1.5))
    with pytest.raises(PhenotwinError, match="16x16|at least"):
        session.run(request(cells[:, :8, :8]))
    assert not runner.workers


def test_tile_progress_comes_through_the_session_and_the_model_is_left_clean(session, runner, translator):
    field = np.random.default_rng(2).random((2, 80, 80)).astype(np.float32)
    session.run(request(field, steps=2))
    assert translator.denoiser.tile_progress.__self__ is session  # the session's own hook, not a widget's
    runner.drain()
    # 80 px in 32 px tiles overlapping by a quarter: 3 x 3 = 9 tiles, batches of 8
    assert (8, 9) in session.seen["tiles"] and (9, 9) in session.seen["tiles"]
    assert translator.denoiser.tile_progress is None


def test_the_verdict_is_the_librarys_and_per_cell_runs_show_the_worst():
    from types import SimpleNamespace

    from phenotwin._napari.verdict import verdict
    from phenotwin.input_fit import FitReport
    from phenotwin.trust import TrustVerdict
    from phenotwin.trust import verdict as library_verdict

    trusted = SimpleNamespace(fit=FitReport("ok"), trust=TrustVerdict("poor", "Poor for this model.", 30.0))
    shown = verdict(trusted)
    assert shown.quality_line == "Poor for this model." and not shown.notify
    bad = FitReport("does-not-fit", ("nucleus: constant.",))
    garbage = verdict(SimpleNamespace(fit=bad, trust=library_verdict(40.0, 20, 1.0, None, bad)))
    assert "not trust" in garbage.quality_line and "good" not in garbage.quality_line.lower()
    assert "nucleus: constant." in garbage.fit_line and garbage.notify
    calibration = {"reconstruction_psnr": {"20": {"1.0": [30.0, 31.0, 32.0]}}}
    worst_cell = library_verdict(22.5, 20, 1.0, calibration, FitReport("ok"))
    worst = verdict(SimpleNamespace(fit=FitReport("ok"), trust=worst_cell), several=True)
    assert worst.trust_level == "poor" and "22.5 dB" in worst.quality_line and "worst of all" in worst.quality_line
    scrub = SimpleNamespace(fit=FitReport("ok"), trust=library_verdict(float("nan"), 20, 1.0, calibration))
    assert verdict(scrub).quality_line is None  # not measured: the line stays


def test_a_runs_clock_counts_every_model_call_across_its_stages(session, runner, translator, cells):
    calls = translator.denoiser.calls
    req = request(cells, confine=True, strength=0.5)
    plan = session.plan(req)
    assert plan.calls == STEPS // 2 + 12 + STEPS // 2 and plan.tiles == 1  # invert (half way), edit mask, generate
    session.run(req)
    clock, done = session.clock, []
    while not runner.last.done:
        runner.last.step()
        done.append(clock.done)
    assert done == sorted(done) and done[-1] == clock.total == plan.calls  # one count: it never restarts
    assert translator.denoiser.calls - calls == plan.calls  # the count is the model's
    assert clock.seconds_left() == 0 and clock.describe() == "18 of 18 model calls"
    measured = cost.SECONDS_PER_CALL[translator.checkpoint_id]  # this run's rate, for the next estimate
    assert measured == pytest.approx(clock.seconds_per_call(), rel=0.1)
    again = session.plan(request(cells, confine=True, strength=0.5))  # the inversion is cached now
    assert again.calls == 12 + STEPS // 2 and again.seconds == pytest.approx(again.calls * measured)


def test_the_precompute_is_opt_in_on_a_cpu_and_cancel_stops_it(session, runner, translator, cells):
    assert translator.device.type == "cpu" and not TranslationSession(runner).prefetch_by_default(translator)
    fresh = TranslationSession(runner)
    fresh.set_translator(translator)
    assert not fresh.prefetch_enabled  # off by default on a CPU
    session.set_prefetch(True)
    session.run(request(cells))
    runner.last.run()
    prefetch = runner.last
    assert session.prefetching
    session.cancel()  # Cancel stops the precompute too
    assert prefetch.quit_requested
    prefetch.step()
    assert not session.prefetching and runner.last is prefetch  # and it does not start again by itself


def test_a_run_inverts_as_deep_as_its_strength_and_a_deeper_scrub_extends_it(session, runner, translator, cells):
    calls = translator.denoiser.calls
    session.run(request(cells, strength=0.5))
    runner.drain()
    (result,) = results(session)
    assert translator.denoiser.calls - calls == 3 + 3 and result.inversion.depth == 3  # half of 6 steps, then back
    plan = session.plan(request(cells, strength=1.0))  # the same plane: its inversion is reused, 3 steps deep
    assert plan.calls == 3 + STEPS
    scrub_plan = cost.plan_scrub(translator, session.inversion, settings(strength=1.0))
    calls = translator.denoiser.calls
    session.scrub(settings(strength=1.0))
    runner.drain()
    assert translator.denoiser.calls - calls == scrub_plan.calls == 3 + STEPS  # the missing steps, none redone
    direct = translator.translate(cells, settings=settings(strength=1.0), channel_axis=0)
    assert np.array_equal(results(session)[-1].normalised, direct.normalised)
    assert session.inversion.complete and session.inversion is result.inversion


def test_the_prefetch_first_finishes_the_inversion_then_scrubbing_up_inverts_nothing(session, runner, translator,
                                                                                       cells):
    lines = []
    session.events.prefetch_info.connect(lambda text, shown: lines.append(text))
    session.set_prefetch(True)
    session.run(request(cells, strength=0.5))
    runner.workers[0].run()
    prefetch = runner.last
    assert session.prefetching and session.inversion.depth == 3
    calls = translator.denoiser.calls
    for _ in range(3):
        prefetch.step()
    assert translator.denoiser.calls - calls == 3 and session.inversion.complete  # the rest of the inversion first
    assert lines[-1] == "Inverting the rest of the way in the background: step 3 of 3 (Cancel stops it)..."
    prefetch.run()
    session.set_prefetch(False)  # else the scrub restarts it around 1.0 and the drain below runs that too
    calls = translator.denoiser.calls
    session.scrub(settings(strength=1.0))  # beyond the prefetched strengths: its generation only
    runner.drain()
    assert translator.denoiser.calls - calls == STEPS
    direct = translator.translate(cells, settings=settings(strength=1.0), channel_axis=0)
    assert np.array_equal(results(session)[-1].normalised, direct.normalised)


def test_a_cancelled_prefetch_keeps_the_inversion_it_extended(session, runner, translator, cells):
    session.set_prefetch(True)
    session.run(request(cells, strength=0.5))
    runner.workers[0].run()
    runner.last.step()  # one more inversion step, then Cancel
    session.cancel()
    runner.last.run()
    assert session.inversion.depth == 4 and not session.prefetching
    assert cost.plan_scrub(translator, session.inversion, settings(strength=1.0)).calls == 2 + STEPS


def test_a_run_that_inverts_anew_shows_a_cheap_preview_first(session, runner, translator, cells):
    """DPM-Solver++ at cost.PREVIEW_STEPS before the translation itself (issue 17; how close it comes on the
    demo model: tests/test_demo_model.py); counted in the plan and the clock, and the result unchanged."""
    assert session.preview_enabled  # on by default on a CPU
    previews = []
    session.events.preview.connect(lambda result, context: previews.append((result, context, len(results(session)))))
    calls = translator.denoiser.calls
    plan = session.plan(request(cells, steps=60))
    session.run(request(cells, steps=60))
    clock, done = session.clock, []
    while not runner.last.done:
        runner.last.step()
        done.append(clock.done)
    (preview, context, shown_before), = previews
    assert shown_before == 0 and context == "the layers"  # before the translation, where it will go
    assert (preview.settings.solver, preview.settings.steps, preview.settings.target) == ("dpm++", 10, "treated")
    (result,) = results(session)
    direct = translator.translate(cells, "control", "treated", strength=1.0, steps=60, seed=0, channel_axis=0)
    np.testing.assert_array_equal(result.image, direct.image)  # the preview changes nothing of the result
    assert session.inversion is result.inversion and result.settings.solver == "ddim"
    full = cost.calls_per_image(translator.resolve(settings(steps=60)))
    assert plan.calls == full + cost.calls_per_image(preview.settings) == 120 + 20
    assert done == sorted(done) and done[-1] == plan.calls == translator.denoiser.calls - calls - full  # + direct's
    # None where the inversion is cached (a scrub-like run costs its generation only), nor where the run is cheap.
    session.run(request(cells, steps=60, strength=0.5))
    runner.drain()
    session.run(request(cells[:, ::-1].copy(), steps=STEPS))
    runner.drain()
    session.preview_enabled = False
    session.run(request(cells[::-1].copy(), steps=60))
    runner.drain()
    assert len(previews) == 1 and len(results(session)) == 4


def test_the_translation_reuses_its_previews_edit_mask(session, runner, translator, cells):
    """The mask depends on the clean image, not on the inversion's solver or steps: the preview's rough
    mask (one draw per level) is completed by the translation, the plan and the clock count each draw
    once, and the result is the one made alone."""
    from phenotwin.pipeline.edit_mask import CONFINE_CALLS, CONFINE_LEVELS, adopt_edit_masks

    calls = translator.denoiser.calls
    previews = []
    session.events.preview.connect(lambda result, context: previews.append(result))
    plan = session.plan(request(cells, steps=60, confine=True))
    session.run(request(cells, steps=60, confine=True))
    runner.drain()
    (result,) = results(session)
    (first,) = previews
    assert not np.array_equal(first.edit_mask, result.edit_mask)  # the preview's rough mask, then the full one
    made = translator.denoiser.calls - calls
    full = cost.calls_per_image(translator.resolve(settings(steps=60, confine=True)))
    preview = cost.preview_of(translator.resolve(settings(steps=60, confine=True)))
    assert preview.mask_draws == 1 and cost.confine_calls(preview) == len(CONFINE_LEVELS)
    assert made == plan.calls == full + cost.calls_per_image(preview) - len(CONFINE_LEVELS)  # each draw made once
    assert cost.calls_per_image(preview) == cost.calls_per_image(preview.replace(mask_draws=4)) - CONFINE_CALLS + 3
    assert session.clock.done == made
    direct = translator.translate(cells, settings=settings(steps=60, confine=True), channel_axis=0)
    np.testing.assert_array_equal(result.edit_mask, direct.edit_mask)
    np.testing.assert_array_equal(result.image, direct.image)
    other = translator.invert(cells[::-1].copy(), channel_axis=0, settings=settings(steps=60))
    adopt_edit_masks(result.inversion, other)  # another image's mask is never taken
    assert not other.edit_masks
