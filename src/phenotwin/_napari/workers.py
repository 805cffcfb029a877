"""What every widget's worker thread runs: diffusers imported safely, a core left to the viewer,
and failures that reach the widget.

napari's (superqt's) workers treat a `RuntimeError` from the work as "the worker was deleted":
they warn and emit neither `errored` nor `finished`, so the widget would wait forever. Most
torch failures are `RuntimeError` (out of memory among them): `call` and `run_steps` hand them
on as `PhenotwinError`. Widgets pass their error handler to `create_worker` as
`_connect={"errored": handler}`: connected afterwards, napari would also re-raise the error
(a second notification, with a traceback).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any, TypeVar

from napari.utils import progress

from phenotwin.errors import PhenotwinError

T = TypeVar("T")

_DIFFUSERS_CLASSES = ("AutoencoderKL", "UNet2DModel", "UNet2DConditionModel", "DDIMScheduler", "DDIMInverseScheduler")
_diffusers_lock = threading.Lock()


def resolve_diffusers() -> None:
    """Import diffusers' classes one thread at a time.

    diffusers resolves its classes lazily, and two threads resolving them at once fail with
    "cannot import name 'AutoencoderKL'" (the demo model still loading while the user loads
    another, or the Evaluate widget starting beside the Translate widget). Cheap once done."""
    with _diffusers_lock:
        import diffusers

        for name in _DIFFUSERS_CLASSES:
            getattr(diffusers, name)


@contextmanager
def _reported_runtime_errors():
    try:
        yield
    except RuntimeError as err:
        raise PhenotwinError(f"the computation stopped with RuntimeError: {err}") from err


@contextmanager
def _a_core_left_for_the_viewer():
    """torch's threads in this worker: one fewer than the cores (at least one), restored after.

    With as many OpenMP threads as cores, the viewer's event loop takes a core from them now
    and then and the others wait for it at every parallel region: measured on 2 cores with the
    demo model, a translation took 7.0 s in a worker beside a live viewer against 3.6 s alone,
    and the viewer stalled up to 65 ms; with one thread it took 5.4 s and stalled 30 ms.
    OpenMP's thread count is set per calling thread, so the viewer's own torch use is untouched."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def call(function: Callable[..., T], *args: Any) -> T:
    """For `create_worker`: `function(*args)` after diffusers is safely imported."""
    with _reported_runtime_errors():
        resolve_diffusers()
        with _a_core_left_for_the_viewer():
            return function(*args)


def run_steps(steps: Generator[Any, None, T]) -> Generator[Any, None, T]:
    """For `create_worker`: forwards every progress event of `steps`, returns its result."""
    with _reported_runtime_errors():
        resolve_diffusers()
        with _a_core_left_for_the_viewer():
            return (yield from steps)


class Throttle:
    """At most one widget update per `interval` seconds, and always the last one.

    Setting a label or a progress bar makes Qt lay the dock out and repaint it: 6-7 ms (up to 20) on a
    busy 2-core CPU (measured), which a 35 ms diffusion step per update would take from the
    viewer's event loop. Ten updates a second read as smooth."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self._last = -float("inf")

    def ready(self, last: bool = False) -> bool:
        now = time.monotonic()
        if last or now - self._last >= self.interval:
            self._last = now
            return True
        return False


class ActivityBar:
    """A run's progress bar in napari's activity dock: one bar, reset at each stage.

    napari's progress bars call `QApplication.processEvents()` when created and updated, so
    any slot can run inside `show`: the worker's next event, its end, or the deletion of the
    widget (a dock closed mid-run, seen in CI as "QProgressBar has been deleted"). A widget
    therefore updates its own controls first and this bar last. Nested calls are dropped; a
    close asked for during an update happens when the update returns, so no bar is left
    behind in the dock.
    One bar a run, not one a stage: creating a bar was the slowest progress update measured.
    At most one update a second (and every stage's first and last step): napari repaints
    inside each, and a demo translation in the Translate widget took 11.8 s with ten
    updates a second, 10.3 s with one, 8.2 s with no bar (2-core VM, Xvfb; most of the
    last gap is napari's animated activity indicator, see docs/benchmarks.md)."""

    def __init__(self, interval: float = 1.0) -> None:
        self._bar = None
        self._description = ""
        self._busy = False
        self._close_pending = False
        self._updates = Throttle(interval)

    def show(self, description: str, step: int, total: int) -> None:
        if self._busy:
            return
        new_stage = self._bar is None or description != self._description
        if not self._updates.ready(last=new_stage or step == total):
            return
        self._busy = True
        try:
            if self._bar is None:
                self._bar = progress(total=total, desc=description)
            elif description != self._description:
                self._bar.reset(total=total)
                self._bar.set_description(description)
            self._description = description
            self._bar.update(step - self._bar.n)  # emits the value the dock shows; setting `n` does not
        finally:
            self._busy = False
            if self._close_pending:
                self.close()

    def close(self) -> None:
        if self._busy:
            self._close_pending = True
            return
        self._close_pending = False
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()
