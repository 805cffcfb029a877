"""One way to report and cancel long work, shared by the CLI, the napari widgets and tests.

Long operations are generators that yield a `Progress` after every diffusion step and
*return* their result. The CLI drives them with a tqdm bar, napari drives them inside a
generator `thread_worker` (whose quit() stops at the next yield), and plain Python code
calls `drive()` with an optional callback and cancel flag.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar, Union

from phenotwin.errors import Cancelled

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """`step` of `total` diffusion steps of the named stage ("invert", "generate", ...) are done."""

    stage: str
    step: int
    total: int


Steps = Generator[Progress, None, T]
CancelFlag = Union[threading.Event, Callable[[], bool], None]


def is_cancelled(cancel: CancelFlag) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def drive(
    steps: Steps[T],
    progress: Callable[[Progress], object] | None = None,
    cancel: CancelFlag = None,
) -> T:
    """Run a step generator to completion; raise `Cancelled` within one step of `cancel`."""
    if is_cancelled(cancel):
        steps.close()
        raise Cancelled("cancelled before the first step")
    while True:
        try:
            event = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(event)
        if is_cancelled(cancel):
            steps.close()
            raise Cancelled(f"cancelled after {event.stage} step {event.step} of {event.total}")


def relabel(steps: Steps[T], stage: str, offset: int = 0, total: int | None = None) -> Steps[T]:
    """The same steps reported as one part of a longer job: stage renamed, step counted from
    `offset` out of `total` (default: the steps' own total). Returns the steps' result."""
    try:
        while True:
            try:
                event = next(steps)
            except StopIteration as stop:
                return stop.value
            yield Progress(stage, offset + event.step, event.total if total is None else total)
    finally:
        steps.close()
