"""What a run costs, before and while it runs: its model calls counted up front, the seconds one
call takes on this machine, and the run's clock (calls done across all its stages, time left).

A run's calls per image (a cell, a plane): the inversion's steps as deep as the strength needs
(each 1 + refinements calls; only the missing ones when the inversion is cached),
the edit mask's calls when confine is on (`edit_mask.mask_calls`: 12 at its full 4 draws per
level), and the generation's steps (as many as the inversion's with DDIM, one more below strength 1
with DPM-Solver++: `generation_steps`); a field larger
than the model makes each call one per tile. The seconds per call are timed once when a model
loads (`time_one_call`), then replaced by what the runs measure. The Translate widget asks
before a long run with it, `phenotwin translate` prints it before a batch. Imports neither Qt,
napari nor torch (until a model is timed or a field tiled).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from phenotwin.pipeline.edit_mask import mask_calls, mask_calls_left
from phenotwin.pipeline.schedulers import generation_steps

if TYPE_CHECKING:
    from phenotwin.pipeline.settings import TranslationSettings
    from phenotwin.pipeline.translator import Translator

CONFIRM_ABOVE_S = 60.0  # a run estimated longer than this asks first
# Seconds one model-sized call takes, by model (checkpoint id): timed at load, then measured by runs.
SECONDS_PER_CALL: dict[str, float] = {}


@dataclass(frozen=True)
class RunPlan:
    """The model calls a run makes over all its stages and images, and how long they should take."""

    calls: int  # model calls over all stages (and cells or planes)
    tiles: int = 1  # model-sized tiles per call (fields larger than the model)
    seconds_per_call: float | None = None  # of one model-sized tile, on this machine

    @property
    def seconds(self) -> float | None:
        return None if self.seconds_per_call is None else self.calls * self.tiles * self.seconds_per_call

    def describe(self) -> str:
        """'840 model calls x 9 tiles, about 3 min on this machine'."""
        tiles = f" x {self.tiles} tiles" if self.tiles > 1 else ""
        seconds = self.seconds
        return f"{self.calls} model calls{tiles}" + ("" if seconds is None else f", {about(seconds)} on this machine")


def about(seconds: float) -> str:
    """'about 40 s', 'about 3 min', 'about 1.5 h'."""
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


def tiles_for(height: int, width: int, size: int) -> int:
    """Model-sized tiles per call over a (height, width) field (1 when it fits the model)."""
    if height <= size and width <= size:
        return 1
    from phenotwin.modeling.denoiser import Denoiser, tile_starts

    overlap = Denoiser.tile_overlap
    return len(tile_starts(max(height, size), size, overlap)) * len(tile_starts(max(width, size), size, overlap))


def inversion_calls(settings: TranslationSettings, depth: int = 0) -> int:
    """Model calls of the inversion steps resolved `settings` still need from an inversion `depth` deep."""
    return max(0, settings.used_steps - depth) * (1 + settings.inversion_refinements)


def calls_per_image(settings: TranslationSettings, depth: int = 0) -> int:
    """Model calls of one image's translation with resolved `settings`, from an inversion `depth` deep
    (0: a new one; only as deep as the strength needs is inverted)."""
    return inversion_calls(settings, depth) + confine_calls(settings) + generation_calls(settings)


def confine_calls(settings: TranslationSettings) -> int:
    """Model calls of the edit mask at resolved `settings` (none without confine)."""
    return mask_calls(settings.mask_draws) if settings.confine else 0


def generation_calls(settings: TranslationSettings) -> int:
    """Model calls of the generation at resolved `settings` (the target and the reconstruction share them)."""
    return generation_steps(settings.solver, settings.used_steps, settings.steps)


# A first look while the translation runs (issue 17): on the demo model DPM-Solver++ at 10 steps with
# one edit-mask draw per level (14 calls) flipped, localised and moved toward the true counterfactual
# as DDIM's 100 steps (112 calls) did, and lay 37.3 dB from their translation; at 6 or 8 steps one
# cell in six lay 28 dB away with another heatmap (docs/benchmarks.md, "Quality against cost").
PREVIEW_STEPS = 10
PREVIEW_MASK_DRAWS = 1


def preview_of(settings: TranslationSettings) -> TranslationSettings | None:
    """A preview of resolved `settings`: the same translation with DPM-Solver++ at PREVIEW_STEPS and an
    edit mask of PREVIEW_MASK_DRAWS per level; None when it would cost more than half the translation
    (then the translation itself comes soon enough)."""
    if settings.steps <= PREVIEW_STEPS:
        return None
    preview = settings.replace(solver="dpm++", steps=PREVIEW_STEPS, inversion_refinements=0,
                               mask_draws=min(PREVIEW_MASK_DRAWS, settings.mask_draws))
    return preview if 2 * calls_per_image(preview) <= calls_per_image(settings) else None


def preview_calls(preview: TranslationSettings) -> int:
    """What a preview adds to its translation's calls: all of its own but the edit mask's draws, which
    the translation then adds to instead of making again (`edit_mask.adopt_edit_masks`)."""
    return calls_per_image(preview) - confine_calls(preview)


def plan_run(translator: Translator, image: np.ndarray, settings: TranslationSettings,
             labels: np.ndarray | None = None, depth: int = 0) -> RunPlan:
    """The plan of translating `image` (C, H, W) or a stack (C, ..., H, W), cell by cell with `labels`;
    `depth`: of the cached inversion of `image` a run reuses (0: none)."""
    resolved = translator.resolve(settings)
    size = translator.image_size
    if labels is not None:  # one model-sized window per cell
        items, tiles = int(np.count_nonzero(np.unique(labels))), 1
    else:
        items, tiles = math.prod(image.shape[1:-2]), tiles_for(*image.shape[-2:], size)
    return RunPlan(items * calls_per_image(resolved, depth), tiles, SECONDS_PER_CALL.get(translator.checkpoint_id))


def describe_batch(translator: Translator, settings: TranslationSettings, images: int,
                   fields: list[tuple[int, int, int]]) -> str:
    """'3 images, 276 model calls (x 9 tiles), about 2 min on this machine': what `phenotwin translate`
    says before a batch. `fields`: (planes, height, width) of each image whose header could be read."""
    per_plane = calls_per_image(translator.resolve(settings))
    tiles = [tiles_for(height, width, translator.image_size) for _, height, width in fields]
    calls = sum(planes for planes, _, _ in fields) * per_plane
    tile_calls = sum(planes * per_plane * count for (planes, _, _), count in zip(fields, tiles))
    seconds = SECONDS_PER_CALL.get(translator.checkpoint_id)
    if len(set(tiles)) > 1:  # fields of several sizes: their tiles summed over all calls
        tiled = f" ({tile_calls} model-sized tiles in all)"
    else:
        tiled = f" (x {tiles[0]} tiles)" if tiles and tiles[0] > 1 else ""
    time = "" if seconds is None else f", {about(tile_calls * seconds)} on this machine"
    return f"{images} image{'s' * (images != 1)}, {calls} model calls{tiled}{time}"


def plan_scrub(translator: Translator, inversion: Any, settings: TranslationSettings) -> RunPlan:
    """The plan of regenerating a cached `inversion` at `settings`: what its caches do not hold yet,
    and the inversion steps a strength deeper than the inversion went adds (with the inversion's solver)."""
    resolved = translator.resolve(settings, solver=inversion.solver)
    target = translator.classes.index(resolved.target)
    masking = mask_calls_left(inversion, target, resolved.mask_draws) if resolved.confine else 0
    generating = not translator.is_generated(inversion, settings=settings.replace(confine=False))
    calls = masking + (inversion_calls(resolved, inversion.depth) + generation_calls(resolved)) * generating
    return RunPlan(calls, tiles_for(*inversion.normalised.shape[-2:], translator.image_size),
                   SECONDS_PER_CALL.get(translator.checkpoint_id))


def time_one_call(translator: Translator) -> float:
    """Seconds of one model-sized call of `translator`'s model (its first, warm-up call not counted).
    Leaves the model's call count as it was: these calls are no one's translation."""
    import torch

    den = translator.denoiser
    sample = torch.zeros((1, *den.sample_shape()), device=den.device)
    labels = translator.diffusion.labels([0])
    calls = den.calls
    try:
        with torch.inference_mode():
            den(sample, 1, labels).cpu()  # warm-up: lazy initialisation, caches
            start = time.perf_counter()
            den(sample, 1, labels).cpu()  # .cpu(): waits for an accelerator to finish
            seconds = time.perf_counter() - start
    finally:
        den.calls = calls
    SECONDS_PER_CALL[translator.checkpoint_id] = seconds
    return seconds


@dataclass
class RunClock:
    """A run's progress in model calls across all its stages: the bar never restarts, and the time
    left comes from the rate measured so far. `step` takes each `Progress` of the run, `tile` the
    tiles of the step under way (it may be called from the worker thread: it only sets numbers)."""

    plan: RunPlan
    refinements: int = 0  # inversion steps cost 1 + refinements calls
    started: float = field(default_factory=time.perf_counter)
    _finished_calls: float = 0.0  # calls of the stages already over
    _segment: tuple | None = None  # (item, stage) of the stage under way
    _segment_calls: float = 0.0
    _last_step: int = 0
    _tile_fraction: float = 0.0

    def step(self, event: Any) -> None:
        segment = (event.item, event.stage)
        if segment != self._segment or event.step < self._last_step:  # a new stage (or cell, plane)
            self._finished_calls += self._segment_calls
            self._segment = segment
        weight = 1 + self.refinements if event.stage == "invert" else 1
        self._segment_calls, self._last_step, self._tile_fraction = event.step * weight, event.step, 0.0

    def tile(self, done: int, total: int) -> None:
        self._tile_fraction = done / total if total and done < total else 0.0

    @property
    def done(self) -> float:
        return self._finished_calls + self._segment_calls + self._tile_fraction

    @property
    def total(self) -> int:
        return max(self.plan.calls, math.ceil(self.done))  # never less than done (recomputed states)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def seconds_left(self) -> float | None:
        done = self.done
        return None if done <= 0 else (self.total - done) * self.elapsed() / done

    def describe(self) -> str:
        """'12 of 52 model calls, about 8 s left'."""
        left = self.seconds_left()
        calls = f"{math.floor(self.done)} of {self.total} model calls"
        return calls if left is None or self.done >= self.total else f"{calls}, {about(left)} left"

    def seconds_per_call(self) -> float | None:
        """What this run measured: seconds per model-sized call."""
        done = self.done
        return None if done < 1 else self.elapsed() / (done * self.plan.tiles)
