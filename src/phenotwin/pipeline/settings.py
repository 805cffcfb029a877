"""`TranslationSettings`: the one settings object of a translation.

The Python API takes it, the CLI and batch build it from flags, the napari widget from its
controls, a checkpoint stores the model's defaults in its shape, provenance records it and
the batch fingerprint hashes it. `resolve` is the only validator: it fills what was left
unset (None) from the model's defaults and refuses a bad value with a message that says
what to give instead, before any work starts. Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.pipeline.edit_mask import CONFINE_DRAWS
from phenotwin.pipeline.schedulers import SOLVERS, inversion_steps

REFERENCES = ("reconstruction", "input")
# What a model without its own `defaults` in phenotwin.json translates with: written here only.
MODEL_DEFAULTS: dict[str, Any] = {
    "steps": 50, "strength": 1.0, "guidance": 0.0, "inversion_refinements": 0, "reference": "reconstruction",
    "confine": False, "solver": "ddim", "mask_draws": CONFINE_DRAWS,
}
# What `phenotwin train` changes of those for a model it trains from scratch: one fixed-point
# refinement of the DDIM inversion, the lever measured best per model call (at 50 steps +13.6 dB on
# the demo model and +13.9 dB on the subtle one, at 1.5-1.7 times the calls; +8.7 dB on the real
# texture), which keeps garbage below the cells (docs/evaluation.md, session 14). A model without
# `defaults` of its own (made before) keeps MODEL_DEFAULTS, which its calibration measured.
SCRATCH_DEFAULTS: dict[str, Any] = {"inversion_refinements": 1}


class ModelInfo(Protocol):
    """What resolving needs of a model (a `CheckpointInfo`): its conditions and its defaults."""

    classes: list[str]
    defaults: dict[str, Any]

    def class_index(self, name: str | int) -> int: ...

    def batch_row(self, batch: str | None) -> int: ...


@dataclass(frozen=True)
class TranslationSettings:
    """How to translate; None means "the model's default" until `resolve` fills it in.

    `strength` in (0, 1]: how far to invert (1 = to pure noise); `steps`: DDIM steps of a full
    inversion; `guidance`: classifier-free guidance (0 = none); `confine`: keep the change where
    the conditions differ (edit mask); `reference`: "reconstruction" (the change between the
    model's two renderings, added to the input) or "input" (PhenDiff's raw rendering);
    `inversion_refinements`: fixed-point iterations per inversion step; `seed`: recorded, and
    used by any sampler that draws noise; `signed` / `sigma`: how the heatmap is drawn;
    `match_intensities`: map the image's own percentiles onto the training range (images from
    another microscope setting; never on by default, recorded in provenance); `solver`: "ddim"
    (DDIM and its inverse) or "dpm++" (DPM-Solver++, second order: a better reconstruction at few
    steps, docs/benchmarks.md); an inversion serves only the solver that made it; `batch`: the
    plate or day the image comes from, for a model trained with batches (`CheckpointInfo.batches`):
    the translation changes the condition and keeps that batch's look (None: batch unknown);
    `mask_draws`: noise draws per level of the edit mask, 1 to CONFINE_DRAWS (fewer: cheaper and
    rougher; the widget's preview takes 1, and its translation adds the rest).
    """

    source: str | None = None
    target: str | None = None
    strength: float | None = None
    steps: int | None = None
    guidance: float | None = None
    confine: bool | None = None
    seed: int | None = None
    reference: str | None = None
    inversion_refinements: int | None = None
    signed: bool = False
    sigma: float = 0.0
    match_intensities: bool = False
    solver: str | None = None
    batch: str | None = None
    mask_draws: int | None = None

    def replace(self, **changes: Any) -> TranslationSettings:
        """A copy with `changes`; a change of None keeps the current value (keyword-argument APIs pass None for unset)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TranslationSettings:
        """From a dict such as phenotwin.json's `defaults`; unknown keys are refused, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PhenotwinError(f"unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(known))}.")
        return cls(**dict(data))

    @property
    def used_steps(self) -> int:
        """Inversion (and generation) steps this strength runs; for resolved settings."""
        return inversion_steps(self.strength, self.steps)

    def resolve(self, model: ModelInfo, max_steps: int, defaults: TranslationSettings | None = None) -> TranslationSettings:
        """Every unset field filled from `defaults` (else the model's), every field checked;
        conditions given by name or index come back as names."""
        base = defaults if defaults is not None else model_defaults(model.defaults)
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.solver not in (None, "ddim") and self.inversion_refinements is None:
            given["inversion_refinements"] = 0  # the defaults' refinements belong to their DDIM: not to this solver
        merged = base.replace(**given)
        source = None if merged.source is None else model.classes[model.class_index(merged.source)]
        target = None if merged.target is None else model.classes[model.class_index(merged.target)]
        batch = None if merged.batch is None else str(merged.batch)  # CSV batch names are strings: plate 1 is "1"
        model.batch_row(batch)  # refuses a batch the model does not know
        return dataclasses.replace(
            merged, source=source, target=target, strength=_strength(merged.strength),
            steps=_steps(merged.steps, max_steps), guidance=_guidance(merged.guidance),
            confine=_flag("confine", merged.confine), signed=_flag("signed", merged.signed),
            seed=_seed(merged.seed), reference=_reference(merged.reference),
            inversion_refinements=_refinements(merged.inversion_refinements), sigma=_sigma(merged.sigma),
            match_intensities=_flag("match_intensities", merged.match_intensities),
            solver=_solver(merged.solver, merged.inversion_refinements), batch=batch,
            mask_draws=_mask_draws(merged.mask_draws),
        )


def model_defaults(stored: Mapping[str, Any] | None = None, **overrides: Any) -> TranslationSettings:
    """A model's defaults: MODEL_DEFAULTS, then what its phenotwin.json stores, then `overrides` (not None)."""
    return TranslationSettings.from_dict({**MODEL_DEFAULTS, **(stored or {})}).replace(**overrides)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _strength(strength: Any) -> float:
    if not _is_number(strength) or not 0.0 < float(strength) <= 1.0:
        raise PhenotwinError(
            f"strength must be in (0, 1], got {strength!r}: 1 inverts all the way to noise (strongest change), "
            "smaller values keep more of the original image."
        )
    return float(strength)


def _steps(steps: Any, limit: int) -> int:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, (bool, np.bool_)) or not 1 <= steps <= limit:
        raise PhenotwinError(f"steps must be a whole number from 1 to {limit}, got {steps!r}. 50 is a good default.")
    return int(steps)


# Guidance scales used in practice are 1-15 (Stable Diffusion's default 7.5, the demo model's 1).
# The prediction is cond + w (cond - uncond): far beyond that the class difference is amplified
# until sampling leaves the image range (saturated output, nothing to read).
MAX_GUIDANCE = 30.0


def _guidance(guidance: Any) -> float:
    if not _is_number(guidance) or not math.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        raise PhenotwinError(f"guidance must be a number from 0 (no guidance) to {MAX_GUIDANCE:g}, got {guidance!r}; "
                             "1 to 15 is the usual range.")
    return float(guidance)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise PhenotwinError(f"{name} must be true or false, got {value!r}.")
    return bool(value)


def _seed(seed: Any) -> int | None:
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)) or seed < 0):
        raise PhenotwinError(f"seed must be a whole number >= 0 (or left unset), got {seed!r}.")
    return None if seed is None else int(seed)


def _reference(reference: Any) -> str:
    if reference not in REFERENCES:
        raise PhenotwinError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}.")
    return str(reference)


def _mask_draws(draws: Any) -> int:
    if not isinstance(draws, (int, np.integer)) or isinstance(draws, (bool, np.bool_)) or not 1 <= draws <= CONFINE_DRAWS:
        raise PhenotwinError(f"mask_draws must be a whole number from 1 to {CONFINE_DRAWS}, got {draws!r}: the edit "
                             f"mask's noise draws per level ({CONFINE_DRAWS}, the default, is the smoothest).")
    return int(draws)


def _refinements(refinements: Any) -> int:
    if not isinstance(refinements, (int, np.integer)) or isinstance(refinements, (bool, np.bool_)) or refinements < 0:
        raise PhenotwinError(f"inversion_refinements must be a whole number, 0 or more, got {refinements!r}.")
    return int(refinements)


def _sigma(sigma: Any) -> float:
    if not _is_number(sigma) or not math.isfinite(sigma) or sigma < 0:
        raise PhenotwinError(f"sigma (heatmap smoothing, pixels) must be a number >= 0, got {sigma!r}.")
    return float(sigma)



def _solver(solver: Any, refinements: Any) -> str:
    if solver not in SOLVERS:
        raise PhenotwinError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}: 'ddim' is DDIM and its "
                             "inverse, 'dpm++' DPM-Solver++ (second order), which needs fewer steps.")
    # A refinement makes a DDIM inversion step the exact inverse of the DDIM step that generation
    # takes back from it (a fixed point of one model evaluation). A DPM-Solver++ generation step also
    # uses the generation's own previous output, and starts one level off the inversion's grid, so
    # no fixed point of one inversion step inverts it: refinements would cost calls and promise
    # nothing. Refused rather than ignored.
    if solver != "ddim" and refinements:
        raise PhenotwinError(f"inversion_refinements work only with solver 'ddim' (got {refinements!r} with "
                             f"{solver!r}): set inversion_refinements to 0 or use solver 'ddim'.")
    return str(solver)
