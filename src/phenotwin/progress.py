"""One way to report and cancel long work, shared by the CLI, the napari widgets and tests.

Long operations are generators that yield a `Progress` after every diffusion step and
*return* their result. The CLI drives them with a tqdm bar, napari drives them inside a
generator `thread_worker` (whose quit() stops at the next yield), and plain Python code
calls `drive()` with an optional callback and cancel flag.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

from phenotwin.errors import Cancelled

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """`step` of `total` diffusion steps of the named stage ("invert", "generate", ...) are done.

    Work over several items (cells, planes of a stack) tags each step with the item it
    belongs to: `item` of `items`, counted from 1, named by `unit`; `items` is 0 otherwise.
    """

    stage: str
    step: int
    total: int
    item: int = 0
    items: int = 0
    unit: str = ""

    def describe(self) -> str:
        """'Invert step 3/20', or 'Cell 2/17: invert step 3/20' for work over several items."""
        steps = f"{self.stage} step {self.step}/{self.total}"
        return f"{self.unit.capitalize()} {self.item}/{self.items}: {steps}" if self.items else steps.capitalize()


Steps = Generator[Progress, None, T]
CancelFlag = threading.Event | Callable[[], bool] | None


def tagged(steps: Steps[T], item: int, items: int, unit: str) -> Steps[T]:
    """Run `steps`, tagging each `Progress` as item `item` of `items` (a cell, a plane)."""
    while True:
        try:
            event = next(steps)
        except StopIteration as stop:
            return stop.value
        yield dataclasses.replace(event, item=item, items=items, unit=unit)


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


def tqdm_steps(description: str) -> Callable[[Progress], None]:
    """A progress callback drawing one tqdm bar per stage ("invert", "generate") of one run."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(event: Progress) -> None:
        bar = bars.get(event.stage)
        if bar is None:
            bar = bars[event.stage] = tqdm(total=event.total, desc=f"{description} {event.stage}", unit="step", leave=False)
        bar.update(event.step - bar.n)
        if event.step >= event.total:
            bar.close()

    return update

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
