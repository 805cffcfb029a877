"""What every widget worker runs: torch threads, RuntimeErrors handed on, throttled dock updates, the activity bar.

The worker functions need no Qt; the throttled updates run on Qt timers (pytest-qt's `qapp`)."""

from __future__ import annotations

import os

import pytest
import torch

from phenotwin._napari.workers import ActivityBar, call, dock_throttled, run_steps
from phenotwin.errors import PhenotwinError


def drain(steps):
    events = []
    while True:
        try:
            events.append(next(steps))
        except StopIteration as stop:
            return events, stop.value


def test_workers_leave_a_core_to_the_viewer_and_restore_the_thread_count():
    before = torch.get_num_threads()
    expected = max(1, min(before, (os.cpu_count() or 1) - 1))

    def job():
        yield torch.get_num_threads()
        return torch.get_num_threads()

    events, result = drain(run_steps(job()))
    assert events == [expected] and result == expected
    assert call(torch.get_num_threads) == expected
    assert torch.get_num_threads() == before


def test_runtime_errors_reach_the_widget_as_phenotwin_errors():
    def job():
        yield 1
        raise RuntimeError("not enough memory")

    with pytest.raises(PhenotwinError, match="RuntimeError: not enough memory"):
        drain(run_steps(job()))
    with pytest.raises(PhenotwinError, match="RuntimeError: boom"):
        call(lambda: (_ for _ in ()).throw(RuntimeError("boom")))


def test_throttle_lets_the_last_update_through(qapp):
    shown = []
    update = dock_throttled(shown.append, interval_ms=60_000)
    update(1)
    update(2)
    assert shown == [1]  # the first at once, the next within the interval held back
    update(3)
    update.flush()  # a stage's last step: shown now, with the newest value
    assert shown == [1, 3]
    update(4)
    update.cancel()  # the run ended: what was pending is dropped
    update.flush()
    assert shown == [1, 3]


def test_activity_bar_is_one_bar_a_run_and_a_close_during_an_update_is_not_lost(qapp):
    """napari's bars run other slots while they update; one of them may end the run."""
    from napari.utils import progress

    before = set(progress._all_instances)
    bar = ActivityBar()
    bar.show("phenotwin: invert", 1, 10)
    bar.show("phenotwin: generate", 1, 5)
    (created,) = set(progress._all_instances) - before
    assert (created.total, created.n, created.desc.rstrip(": ")) == (5, 1, "phenotwin: generate")
    shown = []
    created.events.value.connect(lambda event: shown.append(event.value))  # what the dock's bar draws
    bar.show("phenotwin: generate", 3, 5)  # within a second of the last update: dropped
    bar.show("phenotwin: generate", 5, 5)  # a stage's last step always shows
    assert shown == [5]
    bar.close()
    assert set(progress._all_instances) == before

    def end_the_run(event):  # while the next run's bar is being created, before `show` has it
        if event.added:
            bar.close()

    progress._all_instances.events.changed.connect(end_the_run)
    try:
        bar.show("phenotwin: invert", 1, 10)
    finally:
        progress._all_instances.events.changed.disconnect(end_the_run)
    assert set(progress._all_instances) == before  # closed once `show` returned, not left in the dock
    bar.close()  # closing twice is harmless
