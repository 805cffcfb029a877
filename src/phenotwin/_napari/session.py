"""The Translate widget's state without Qt: the inversion being scrubbed, which job runs, what comes next.

One job at a time, by priority: a run (Translate) > a scrub (the slider, target, guidance or
confine moved: regenerate the cached inversion) > a prefetch (idle time spent finishing the
inversion, then generating the strengths around the slider's). A run inverts only as deep as
its strength needs, so its result comes sooner; the prefetch then inverts the rest of the
way, or (prefetch off) a scrub to a higher strength inverts the missing steps on demand. A
run interrupts a scrub and stops a prefetch; a scrub stops a prefetch; a scrub asked for while
another runs waits, and only the latest value runs; after a run or scrub the prefetch starts
again. Jobs run through an injected
`start_worker(steps, *, yielded, returned, errored, aborted, finished)` that returns a
handle with `quit()` (napari's worker in the widget, a plain runner in the tests) and whose
handlers run on the caller's (GUI) thread. The worker thread touches no state here: a run
returns its inversion with its result, adopted when the result arrives (a scrub or prefetch
adds to that inversion's caches and depth, one job at a time). Everything the
widget shows comes as psygnal events. Imports neither Qt, napari nor torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import Signal, SignalGroup

from phenotwin import cost
from phenotwin.errors import PhenotwinError
from phenotwin.progress import relabel

if TYPE_CHECKING:
    from phenotwin.pipeline.outputs import Inversion
    from phenotwin.pipeline.settings import TranslationSettings
    from phenotwin.pipeline.translator import Translator

# The strength slider: the prefetch works along its steps.
STRENGTH_MIN, STRENGTH_MAX, STRENGTH_STEP = 0.02, 1.0, 0.01
# After a translation, strengths this far either side of the slider are generated in the
# background (nearest first), so that scrubbing to them is instant.
PREFETCH_RADIUS = 0.25
# What a scrub changes; a run queued behind a job takes the newest of these too (it reads the slider).
GENERATION_FIELDS = ("target", "strength", "guidance", "confine", "seed")

StartWorker = Callable[..., Any]


@dataclass(frozen=True)
class RunRequest:
    """What Translate works on: copies of the pixels (never the layers) and the settings of the controls."""

    image: np.ndarray  # (C, H, W), or (C, *leading, H, W): every plane of a stack
    settings: TranslationSettings
    fingerprint: str = ""  # of `image`: the same plane, source and steps reuse the inversion
    labels: np.ndarray | None = None  # cells of the plane: translate and score cell by cell
    context: Any = None  # handed back with the results (the widget: where to show them)


class SessionEvents(SignalGroup):
    """What the widget shows. All are emitted on the GUI thread except `tiles` (the worker's)."""

    started = Signal(str)  # "Translating" or "Updating"
    progress = Signal(object)  # a `Progress` of the run or scrub
    tiles = Signal(int, int)  # tiles done, total within the step under way (large fields)
    result = Signal(object, object)  # the result, the context of the run it belongs to
    error = Signal(object, str)  # the exception, what failed ("Translation failed", "Cannot translate")
    cancelled = Signal()
    finished = Signal()  # the run or scrub is over (after its result, error or cancel)
    prefetch_progress = Signal(int, int)  # strength k of n being precomputed
    prefetch_info = Signal(str, bool)  # a line about the precomputed strengths ("" keeps the last), shown or not
    preview = Signal(object, object)  # a run's cheap first result (`cost.preview_of`), the context; the result follows


@dataclass(frozen=True)
class Preview:
    """Yielded by a run's worker: its preview, to show until the translation itself arrives."""

    result: Any


@dataclass(eq=False)
class _Job:
    kind: str  # "run", "scrub" or "prefetch"
    context: Any = None
    key: tuple | None = None  # a run's inversion key: its result's inversion is kept for scrubbing
    handle: Any = None

    def quit(self) -> None:
        if self.handle is not None:
            self.handle.quit()


class TranslationSession:
    """The current model, inversion and result, and the one job that runs (see the module)."""

    def __init__(self, start_worker: StartWorker):
        self.events = SessionEvents()
        self._start_worker = start_worker
        self.translator: Translator | None = None
        self.inversion: Inversion | None = None  # what the slider scrubs
        self._inversion_key: tuple | None = None
        self.last_result = None
        self.context: Any = None  # of the latest run
        self.settings: TranslationSettings | None = None  # the latest asked for: the prefetch centres on it
        self.prefetch_enabled = True
        self.preview_enabled = True  # a run that inverts anew shows `cost.preview_of` first, where it is cheap
        self.clock: cost.RunClock | None = None  # of the run or scrub under way: model calls across its stages
        self._job: _Job | None = None  # a run or a scrub
        self._prefetch: _Job | None = None
        self._prefetched = False  # the last prefetch finished (was not stopped early)
        self._prefetch_failed: Inversion | None = None  # no retries for an inversion it failed on
        self._pending_run: RunRequest | None = None
        self._pending_scrub: TranslationSettings | None = None
        self._cancelled = False  # by the user: leave the machine alone afterwards, no prefetch
        self._closed = False

    @property
    def running(self) -> str | None:
        """'run' or 'scrub' while one is under way (or stopping), else None."""
        return self._job.kind if self._job is not None else None

    @property
    def prefetching(self) -> bool:
        return self._prefetch is not None

    @staticmethod
    def prefetch_by_default(translator: Translator) -> bool:
        """The background precompute is opt-in on a CPU (it takes the CPU from everything else), on elsewhere."""
        return getattr(translator.device, "type", "cpu") != "cpu"

    def plan(self, request: RunRequest) -> cost.RunPlan:
        """The model calls `request` would make (none for a cached inversion) and their estimated seconds."""
        key = self.inversion_key_of(self.translator, request)
        cached = request.labels is None and request.image.ndim == 3 and key == self._inversion_key
        depth = self.inversion.depth if cached and self.inversion is not None else 0
        plan = cost.plan_run(self.translator, request.image, request.settings, request.labels, depth)
        preview = self._preview_of(request, cached)
        return plan if preview is None else dataclasses.replace(plan, calls=plan.calls + cost.preview_calls(preview))

    def _preview_of(self, request: RunRequest, cached: bool):
        """The preview a run shows first: for one plane whose inversion is not cached, when enabled."""
        if not self.preview_enabled or cached or request.labels is not None or request.image.ndim != 3:
            return None
        return cost.preview_of(self.translator.resolve(request.settings))

    def set_translator(self, translator: Translator) -> None:
        """A model was loaded: nothing of the previous one can be scrubbed."""
        self._stop_prefetch()
        self.events.prefetch_info.emit("", False)
        self.translator = translator
        self.prefetch_enabled = self.prefetch_by_default(translator)
        self.preview_enabled = not self.prefetch_by_default(translator)  # where a translation takes seconds
        self.inversion, self._inversion_key = None, None

    # -- requests ------------------------------------------------------------------------------

    def run(self, request: RunRequest) -> bool:
        """Translate: at once, or as soon as a scrub or the prefetch has stopped.

        False (nothing done) while a translation runs. Raises `PhenotwinError` for settings or
        inputs the model cannot take, before anything else stops."""
        if self.running == "run":
            return False
        built = self._build(request)
        self._pending_scrub = None
        if self._job is None and self._prefetch is None:
            self._start_run(request, built)
            return True
        self._pending_run = request
        if self._job is not None:
            self._job.quit()  # a scrub: Translate wins, it reads the slider too
        else:
            self._stop_prefetch()
        return True

    def scrub(self, settings: TranslationSettings) -> None:
        """Show the current inversion at new generation settings (target, strength, guidance, confine,
        seed); nothing without a scrubbable inversion. Raises `PhenotwinError` for invalid settings."""
        if self.inversion is None or self.last_result is None or self.translator is None:
            return
        self.translator.resolve(settings)
        self.settings = settings
        if self._pending_run is not None:
            run = self._pending_run
            newest = {name: getattr(settings, name) for name in GENERATION_FIELDS}
            self._pending_run = dataclasses.replace(run, settings=run.settings.replace(**newest))
            return
        self._pending_scrub = settings  # the latest value wins
        if self._job is None and not self._stop_prefetch():
            self._next()

    def is_ready(self, settings: TranslationSettings) -> bool:
        """Whether a scrub to `settings` would only read the cache (no UNet call): no need to wait."""
        if self.inversion is None or self.translator is None:
            return False
        try:
            return self.translator.is_generated(self.inversion, settings=settings)
        except PhenotwinError:
            return False  # `scrub` reports it

    def cancel(self) -> None:
        """Stop the run, scrub or background precompute at its next diffusion step; nothing queued runs
        afterwards, and the precompute waits for the next translation (or the box ticked again)."""
        self._pending_run = self._pending_scrub = None
        self._cancelled = True
        if self._job is not None:
            self._job.quit()
        self._stop_prefetch()

    def drop_inversion(self) -> None:
        """A source layer is gone: no more slider updates or prefetch from it, the next run inverts
        afresh, and a run under way keeps its result's inversion to itself."""
        self.inversion, self._inversion_key = None, None
        if self._job is not None:
            self._job.key = None
        self._stop_prefetch()

    def set_prefetch(self, enabled: bool) -> None:
        self.prefetch_enabled = enabled
        if enabled:
            self._cancelled = False  # ticked again after a Cancel: the user asks for it
            self._start_prefetch()
        else:
            self._stop_prefetch()

    def close(self) -> None:
        """The widget is gone: stop everything, start nothing more."""
        self._closed = True
        self._pending_run = self._pending_scrub = None
        for job in (self._job, self._prefetch):
            if job is not None:
                job.quit()
        self._release_tiles()

    # -- jobs ------------------------------------------------------------------------------------

    def _next(self) -> None:
        """Start what is queued, by priority, once nothing runs."""
        if self._closed or self._job is not None or self._prefetch is not None:
            return
        if self._pending_run is not None:
            request, self._pending_run = self._pending_run, None
            self._start_run(request)
        elif self._pending_scrub is not None:
            settings, self._pending_scrub = self._pending_scrub, None
            self._start_scrub(settings)

    @staticmethod
    def inversion_key_of(translator: Translator, request: RunRequest) -> tuple:
        """What a cached inversion depends on: the model, the pixels, the source condition, the steps,
        the solver, the batch and whether the intensities were matched (matching changes what the model sees)."""
        s = request.settings
        return translator.checkpoint_id, request.fingerprint, s.source, s.steps, s.solver, s.match_intensities, s.batch

    def _build(self, request: RunRequest) -> tuple[Generator, tuple | None]:
        """The run's steps, its inputs checked now; and the inversion key when its inversion can be scrubbed."""
        translator, settings = self.translator, request.settings
        translator.resolve(settings)
        if request.labels is not None:
            from phenotwin.percell import translate_cells_steps

            return translate_cells_steps(translator, request.image, request.labels, channel_axis=0,
                                         settings=settings), None
        if request.image.ndim > 3:
            from phenotwin.stacks import translate_stack_steps

            return translate_stack_steps(translator, request.image, settings), None
        key = self.inversion_key_of(translator, request)
        inversion = self.inversion if key == self._inversion_key else None
        inverting = None if inversion is not None else translator.invert_steps(
            request.image, channel_axis=0, settings=settings, strength=settings.strength)
        preview = self._preview_of(request, cached=inversion is not None)
        return _invert_then_generate(translator, inverting, inversion, settings,
                                     None if preview is None else (request.image, preview)), key

    def _start_run(self, request: RunRequest, built: tuple[Generator, tuple | None] | None = None) -> None:
        try:
            steps, key = built or self._build(request)  # built again after a wait: the inversion may be gone
        except PhenotwinError as err:
            self.events.error.emit(err, "Cannot translate")
            return
        if key is None:  # results of many inversions: the slider cannot scrub them, Translate again instead
            self.inversion, self._inversion_key = None, None
        self.context, self.settings = request.context, request.settings
        self._start(_Job("run", request.context, key), steps, "Translating", self.plan(request))

    def _start_scrub(self, settings: TranslationSettings) -> None:
        if self.inversion is None:
            return  # dropped while it waited
        # The inversion's batch, as its source and steps: another batch takes Translate (a new inversion).
        settings = dataclasses.replace(settings, batch=self.inversion.batch)
        steps = self.translator.generate_steps(self.inversion, settings=settings, reconstruct=False)
        plan = cost.plan_scrub(self.translator, self.inversion, settings)
        self._start(_Job("scrub", self.context), steps, "Updating", plan)

    def _start(self, job: _Job, steps: Generator, description: str, plan: cost.RunPlan) -> None:
        self._job, self._cancelled = job, False
        self.clock = cost.RunClock(plan, self.translator.resolve(self.settings).inversion_refinements)
        # Tiles of a large field: the session's own hook on the shared model while its job runs.
        self.translator.denoiser.tile_progress = self._report_tiles
        self.events.prefetch_info.emit("", False)  # it was about the previous result
        self.events.started.emit(description)
        job.handle = self._start_worker(
            steps, yielded=self._on_progress, returned=lambda result: self._on_result(job, result),
            errored=lambda err: self.events.error.emit(err, "Translation failed"),
            aborted=self.events.cancelled.emit, finished=lambda: self._on_finished(job))

    def _on_progress(self, event) -> None:
        if isinstance(event, Preview):
            self.events.preview.emit(event.result, self.context)
            return
        if self.clock is not None:
            self.clock.step(event)
        self.events.progress.emit(event)

    def _report_tiles(self, done: int, total: int) -> None:
        """Called by the model in the worker thread: handed on as an event, only the clock's numbers set."""
        clock = self.clock
        if clock is not None:
            clock.tile(done, total)
        self.events.tiles.emit(done, total)

    def _release_tiles(self) -> None:
        denoiser = getattr(self.translator, "denoiser", None)
        if denoiser is not None and denoiser.tile_progress == self._report_tiles:
            denoiser.tile_progress = None  # the model is shared: report tiles to no one

    def _on_result(self, job: _Job, result) -> None:
        measured = self.clock.seconds_per_call() if self.clock is not None else None
        if measured is not None and self.clock.done >= 0.9 * self.clock.plan.calls:  # a whole run: its rate
            cost.SECONDS_PER_CALL[self.translator.checkpoint_id] = measured
        if job.key is not None:
            self.inversion, self._inversion_key = result.inversion, job.key
        self.last_result = result
        self.events.result.emit(result, job.context)

    def _on_finished(self, job: _Job) -> None:
        if self._job is job:
            self._job = None
        self._release_tiles()
        self.events.finished.emit()
        if self._pending_run is not None or self._pending_scrub is not None:
            self._next()
        elif not self._cancelled:
            self._start_prefetch()

    # -- precomputing strengths in the background ------------------------------------------------

    def prefetch_ladder(self, strength: float) -> list[float]:
        """The slider's strengths within PREFETCH_RADIUS of `strength`, nearest first."""
        step = STRENGTH_STEP
        ladder = [strength + sign * k * step for k in range(1, round(PREFETCH_RADIUS / step) + 1) for sign in (1, -1)]
        return [round(s, 6) for s in ladder if STRENGTH_MIN - 1e-9 <= s <= STRENGTH_MAX + 1e-9]

    def _start_prefetch(self) -> None:
        """When idle after a translation of one model-sized image: fill the strength cache."""
        inversion = self.inversion
        if (self._closed or self._cancelled or not self.prefetch_enabled or self._job is not None
                or self._prefetch is not None
                or inversion is None or getattr(self.last_result, "inversion", None) is not inversion
                or self._prefetch_failed is inversion or self.settings is None):
            return
        if max(inversion.normalised.shape[1:]) > self.translator.image_size:
            return  # a tiled field: each step takes seconds, too slow to give way to the user at once
        steps = _complete_then_prefetch(self.translator, inversion, self.prefetch_ladder(self.settings.strength),
                                        self.settings)
        job = self._prefetch = _Job("prefetch")
        self._prefetched = False
        job.handle = self._start_worker(
            steps, yielded=self._on_prefetch_progress,
            returned=lambda _: setattr(self, "_prefetched", True),
            errored=lambda err: self._on_prefetch_error(inversion, err), finished=self._on_prefetch_finished)

    def _on_prefetch_progress(self, event) -> None:
        if event.items:  # a strength of the ladder
            self.events.prefetch_progress.emit(event.item, event.items)
        elif event.step == 1 or event.step == event.total or event.step % max(1, event.total // 10) == 0:
            # Finishing the inversion: ten lines at most (each line costs the viewer a layout).
            self.events.prefetch_info.emit(f"Inverting the rest of the way in the background: step {event.step} of "
                                           f"{event.total} (Cancel stops it)...", True)

    def _stop_prefetch(self) -> bool:
        """Give way: a running prefetch stops at its next step (what is queued starts then).
        False when none was running: the caller goes on at once."""
        if self._prefetch is None:
            return False
        self._prefetch.quit()
        return True

    def _on_prefetch_error(self, inversion: Inversion, err: Exception) -> None:
        self._prefetch_failed = inversion
        self.events.prefetch_info.emit(f"Precomputing strengths stopped: {err}", True)

    def _on_prefetch_finished(self) -> None:
        self._prefetch = None
        if self._closed:
            return
        if self._prefetched and self.inversion is not None:
            low, high = self.ready_strengths()
            self.events.prefetch_info.emit(
                f"Strengths {low:.2f}–{high:.2f} are ready: moving the slider there is instant.", high > low)
        elif self._prefetch_failed is not self.inversion:  # (a failure keeps its message)
            self.events.prefetch_info.emit("", False)  # stopped early: what it said no longer holds
        if self._pending_run is not None or self._pending_scrub is not None:
            self._next()
        elif not self._prefetched:
            self._start_prefetch()  # stopped for nothing queued (the box unticked and ticked again)

    def ready_strengths(self) -> tuple[float, float]:
        """The slider's range around the latest strength that the cache holds (the budget may cut the prefetch)."""
        settings = self.settings
        low = high = settings.strength

        def ready(strength: float) -> bool:
            return self.is_ready(settings.replace(strength=strength))

        while low - STRENGTH_STEP >= STRENGTH_MIN - 1e-9 and ready(round(low - STRENGTH_STEP, 6)):
            low = round(low - STRENGTH_STEP, 6)
        while high + STRENGTH_STEP <= STRENGTH_MAX + 1e-9 and ready(round(high + STRENGTH_STEP, 6)):
            high = round(high + STRENGTH_STEP, 6)
        return low, high


def _complete_then_prefetch(translator: Translator, inversion: Inversion, strengths: list[float],
                            settings: TranslationSettings):
    """Runs in the worker thread: the inversion to full depth first (a scrub up then needs no
    inversion step; stopped, it keeps the depth reached), then the strengths around the slider's."""
    yield from translator.extend_steps(inversion)
    return (yield from translator.prefetch_steps(inversion, strengths, settings=settings))


def _invert_then_generate(translator: Translator, inverting, inversion, settings: TranslationSettings,
                          preview: tuple[np.ndarray, TranslationSettings] | None = None):
    """Runs in the worker thread: the `preview` (image, settings) first if any, yielded as a `Preview`;
    invert unless the inversion is cached, then generate (its source and steps are the inversion's).
    Touches no session state: the result carries its inversion back."""
    from phenotwin.pipeline.edit_mask import adopt_edit_masks

    first = None
    if preview is not None:
        image, cheap = preview
        first = yield from relabel(translator.translate_steps(image, channel_axis=0, settings=cheap), "preview")
        yield Preview(first)
    if inverting is not None:
        inversion = yield from inverting
    if first is not None:
        adopt_edit_masks(first.inversion, inversion)  # the preview's mask is the translation's
    return (yield from translator.generate_steps(inversion, settings=settings, reconstruct=True))
