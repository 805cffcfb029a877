"""What every widget worker runs (no Qt needed): torch threads, RuntimeErrors handed on."""

from __future__ import annotations

import os

import pytest
import torch

from phenotwin._napari.workers import Throttle, call, run_steps
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


def test_throttle_lets_the_last_update_through():
    throttle = Throttle(interval=60.0)
    assert throttle.ready()
    assert not throttle.ready()
    assert throttle.ready(last=True)
