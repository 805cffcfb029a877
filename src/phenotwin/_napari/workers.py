"""What every widget's worker thread runs, and the one helper that starts it.

`start_worker` is how the Translate, Train and Evaluate widgets start background work:
diffusers imported safely, a core left to the viewer, and failures that reach the widget.
napari's (superqt's) workers treat a `RuntimeError` from the work as "the worker was
deleted": they warn and emit neither `errored` nor `finished`, so the widget would wait
forever. Most torch failures are `RuntimeError` (out of memory among them): `call` and
`run_steps` hand them on as `PhenotwinError`. The error handler is passed to
`create_worker` as `_connect`: connected afterwards, napari would also re-raise the error
(a second notification, with a traceback).
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any, TypeVar

from napari.utils import progress
from qtpy.QtCore import QObject, Signal
from superqt.utils import qthrottled

from phenotwin.errors import PhenotwinError

T = TypeVar("T")

_DIFFUSERS_CLASSES = ("AutoencoderKL", "UNet2DModel", "UNet2DConditionModel", "DDIMScheduler", "DDIMInverseScheduler")
_diffusers_lock = threading.Lock()
# Setting a label or a progress bar makes Qt lay the dock out and repaint it: 6-7 ms (up to 20)
# on a busy 2-core CPU (measured), which a 35 ms diffusion step per update would take from the
# viewer's event loop. Ten updates a second read as smooth.
DOCK_UPDATE_MS = 100


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
    """In the worker thread: `function(*args)` after diffusers is safely imported."""
    with _reported_runtime_errors():
        resolve_diffusers()
        with _a_core_left_for_the_viewer():
            return function(*args)


def run_steps(steps: Generator[Any, None, T]) -> Generator[Any, None, T]:
    """In the worker thread: forwards every progress event of `steps`, returns its result."""
    with _reported_runtime_errors():
        resolve_diffusers()
        with _a_core_left_for_the_viewer():
            return (yield from steps)


def start_worker(work: Generator | Callable, *args: Any, yielded=None, returned=None, errored=None, aborted=None,
                 finished=None):
    """Start `work` (a step generator, or a function called with `args`) in a napari worker.

    The handlers run in the GUI thread; `quit()` on the returned worker stops a generator at
    its next step. `yielded` and `aborted` exist for generators only."""
    from napari.qt.threading import create_worker

    connect = {"errored": errored} if errored is not None else None
    if inspect.isgenerator(work):
        worker = create_worker(run_steps, work, _connect=connect, _start_thread=False)
    else:
        worker = create_worker(call, work, *args, _connect=connect, _start_thread=False)
    for name, slot in (("yielded", yielded), ("returned", returned), ("aborted", aborted), ("finished", finished)):
        if slot is not None:
            getattr(worker, name).connect(slot)
    worker.start()
    return worker


class DockRun:
    """A dock's one background job with its Run and Cancel buttons: the wiring the Evaluate and
    Explain docks shared line for line (refuse a second start, say a bad setting as a notification,
    Cancel at the next step, say the failure, give the buttons back), kept in one place so the two
    cannot drift. Results reach `returned` only while the dock exists (`close` when it goes).
    `notify` shows an error (the widget passes its own, so tests can catch it there)."""

    def __init__(self, dock: DockProgress, run_button, cancel_button, failed: str, notify: Callable[[str], Any],
                 returned: Callable[[Any], Any], yielded: Callable[[Any], Any] | None = None) -> None:
        self.dock, self.run_button, self.cancel_button = dock, run_button, cancel_button
        self.failed, self.notify, self.returned = failed, notify, returned  # failed: "Evaluation failed"
        self.yielded = yielded or dock.step
        self.worker = None
        self.closed = False

    def start(self, make_job: Callable[[], Generator], cannot: str, starting: str) -> bool:
        """Start the job `make_job` builds (on the GUI thread: it reads the controls); False when one
        runs already or the settings are refused (`PhenotwinError`, said as '<cannot>: why')."""
        if self.worker is not None:
            return False
        try:
            job = make_job()
        except PhenotwinError as err:
            self.notify(f"{cannot}: {err}")
            return False
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.dock.say(starting)
        self.worker = start_worker(job, yielded=self.yielded, returned=self._returned, errored=self._errored,
                                   aborted=lambda: self.dock.say("Cancelled."), finished=self._finished)
        return True

    def cancel(self, *_) -> None:
        """Stop at the next step."""
        if self.worker is not None:
            self.dock.say("Cancelling...")
            self.worker.quit()

    def close(self) -> None:
        """The dock is gone: stop the job and touch none of its controls."""
        self.closed = self.dock.closed = True
        if self.worker is not None:
            self.worker.quit()

    def _returned(self, result) -> None:
        if not self.closed:
            self.returned(result)

    def _errored(self, err: Exception) -> None:
        if self.closed:
            return
        self.dock.say(f"{self.failed}.")
        self.notify(f"{self.failed}: {err}")

    def _finished(self) -> None:
        self.worker = None
        self.dock.close()  # first, even when closed: no bar stays in the activity dock
        if not self.closed:
            self.run_button.enabled, self.cancel_button.enabled = True, False


def dock_throttled(function: Callable[..., Any], interval_ms: int = DOCK_UPDATE_MS):
    """`function` at most once per interval, always with the newest arguments; `.flush()` runs a
    pending call now (a stage's first and last step must show), `.cancel()` drops it."""
    return qthrottled(function, timeout=interval_ms)


class TileSignal(QObject):
    """Carries tile progress from the worker thread to the GUI thread (a queued Qt signal)."""

    progressed = Signal(int, int)


class DockProgress:
    """A run's progress in a dock: its status line (and progress bar, if any) at most ten times
    a second, always a stage's first and last step, then the activity bar (last: it runs other
    slots). `say` writes a final word that no pending update may overwrite. With a `clock` (returning
    the run's `cost.RunClock`, or None) the bar counts the run's model calls across all its stages
    and says the time left on itself; without one it counts the steps of the stage under way."""

    def __init__(self, status, bar=None, reveal: bool = False, clock: Callable[[], Any] | None = None) -> None:
        self.status, self.bar, self.reveal = status, bar, reveal  # reveal: a hidden line shows with each update
        self.clock = clock
        self.activity = ActivityBar()
        self.closed = False  # the dock is gone: touch none of its controls
        self._latest: tuple | None = None
        self._event = None  # the latest `Progress` of the run
        self._paint = dock_throttled(self._draw)

    def step(self, event) -> None:
        """A diffusion step done (a `Progress`): 'Invert step 3/20', 'Cell 2/17: generate step 1/10'."""
        new_stage = self._event is None or event.stage != self._event.stage
        self._event = event
        self.show(event.describe(), event.stage, event.step, event.total, new_stage or event.step == event.total)

    def tiles(self, done: int, total: int) -> None:
        """Tiles of the step under way, for fields larger than the model: 'Invert step 3/20, tile 4/9'."""
        event = self._event
        text = f"{event.describe() if event else 'Starting'}, tile {done}/{total}"
        self.show(text, event and event.stage, event.step if event else 0, event.total if event else 0, done == total)

    def show(self, text: str, stage: str | None, step: int = 0, total: int = 0, force: bool = False) -> None:
        self._latest = (text, stage, step, total)
        self._paint()
        if force:
            self._paint.flush()

    def _draw(self) -> None:
        if self.closed or self._latest is None:
            return
        text, stage, step, total = self._latest
        clock = self.clock() if self.clock is not None else None
        if clock is not None and stage is not None:
            stage, step, total = "run", min(round(clock.done), clock.total), clock.total
            if self.bar is not None:
                self.bar.native.setFormat(clock.describe())
        if self.bar is not None and stage is not None:
            if self.bar.max != total:
                self.bar.max = total
            self.bar.value = step
        self.status.value = text
        if self.reveal:
            self.status.visible = True
        if stage is not None:  # None: before the first step (tiles of a large field)
            self.activity.show(f"phenotwin: {stage}", step, total)

    def say(self, text: str, visible: bool | None = None) -> None:
        """A final word (empty: keep the line's text), and show or hide the line."""
        self._paint.cancel()
        self._latest = self._event = None
        if self.closed:
            return
        if text:
            self.status.value = text
        if visible is not None:
            self.status.visible = visible

    def close(self) -> None:
        """The run is over: nothing pending is painted, and no bar stays in the activity dock."""
        self._paint.cancel()
        self._latest = self._event = None
        self.activity.close()


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
        self._update = dock_throttled(self._draw, round(interval * 1000))

    def show(self, description: str, step: int, total: int) -> None:
        if self._busy:
            return
        new_stage = self._bar is None or description != self._description
        self._update(description, step, total)
        if new_stage or step == total:
            self._update.flush()

    def _draw(self, description: str, step: int, total: int) -> None:
        if self._busy:
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
        self._update.cancel()  # a throttled update must not bring a closed bar back
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()
