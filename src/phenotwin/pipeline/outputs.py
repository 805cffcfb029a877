"""What the pipeline hands back: an `Inversion` to generate from, and a `Translation`.

An `Inversion` owns its caches (the trajectory, generated images, edit masks) and answers
questions about them through methods, so callers never need to know how they are keyed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from phenotwin.input_fit import FitReport
from phenotwin.pipeline.cache import GenerationCache, Key
from phenotwin.pipeline.heatmap import difference_map, psnr
from phenotwin.pipeline.schedulers import inversion_steps
from phenotwin.pipeline.settings import TranslationSettings
from phenotwin.pipeline.trajectory import TRAJECTORY_BUDGET
from phenotwin.preprocessing import ImageLayout, ImageProcessor
from phenotwin.trust import TrustVerdict, verdict

if TYPE_CHECKING:  # torch loads lazily
    import torch


@dataclass
class Inversion:
    """A source image inverted under its condition, with (a bounded subset of) its trajectory.

    `states[k]` is the sample after k inversion steps (k = 0: the clean image or its latent),
    so a generation at strength s starts from state round(s * steps); a state that was not
    kept is recomputed from the nearest kept one below it (`trajectory.kept_states`). The
    inversion may stop short of `steps` (`depth`: as deep as the first strength needed); a
    deeper generation extends it from its deepest state (`Diffusion.extend`), never redoing a step.
    It serves only the `solver` that made it, like its `steps` and `refinements`: a generation from
    it uses that solver (`Translator` refuses another), so its caches are keyed without one.
    """

    source: str
    source_index: int
    classes: tuple[str, ...]
    steps: int
    states: dict[int, torch.Tensor]
    model_input: np.ndarray  # (C, H', W') model range, padded to at least the model size
    normalised: np.ndarray  # (C, H, W) model range, at the image's own size
    layout: ImageLayout
    checkpoint_id: str
    autoencoder_psnr: float | None = None
    refinements: int = 0  # fixed-point iterations per inversion step, to recompute states identically
    solver: str = "ddim"  # "ddim" or "dpm++" (`TranslationSettings.solver`)
    # A multistep solver's history, by state: history[k] is the model output of the step that made
    # state k (its clean-image estimate), which the step from state k needs too. Held for the states
    # held (not state 0, which has none), counted in the trajectory budget; empty for DDIM.
    history: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    trajectory_budget: int = TRAJECTORY_BUDGET  # bytes of states kept (besides the deepest), when extended too
    # Inversion steps run so far (the deepest state); set by `Diffusion.extend` after the state is
    # stored, so another thread reading it (a cost estimate) never sees the states mid-change.
    depth: int = 0
    # Generated images (model range, cropped); under the source class they are the reconstructions.
    generated: GenerationCache = field(default_factory=GenerationCache, repr=False)
    # Edit masks (C, H, W) in [0, 1] by target class index (see `edit_mask.edit_mask_steps`).
    edit_masks: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    # The terms of rougher masks (fewer draws, the preview's), by target and term, until the full mask is made.
    mask_terms: dict[int, dict[int, np.ndarray]] = field(default_factory=dict, repr=False)
    fit: FitReport | None = None  # the input's intensities against the training images'
    # The batch it was inverted in (None: unknown); its generations stay in it (`TranslationSettings.batch`).
    batch: str | None = None

    def kept_states(self) -> list[int]:
        """Which inversion states are held (the others are recomputed when needed)."""
        return sorted(self.states)

    @property
    def complete(self) -> bool:
        """Inverted all the way: no generation needs an inversion step any more."""
        return self.depth == self.steps

    def key(self, condition: str | int, strength: float, guidance: float = 0.0) -> Key:
        index = condition if isinstance(condition, int) else self.classes.index(condition)
        return index, inversion_steps(strength, self.steps), float(guidance)

    def is_cached(self, condition: str | int, strength: float, guidance: float = 0.0) -> bool:
        """Whether the rendering under `condition` at this strength and guidance is held (no UNet call)."""
        return self.key(condition, strength, guidance) in self.generated

    def rendering(self, condition: str | int, strength: float, guidance: float = 0.0) -> np.ndarray | None:
        """The model's cached rendering (model range) under `condition`, or None."""
        return self.generated.get(self.key(condition, strength, guidance))

    def forget_generations(self) -> None:
        """Drop the generated images (benchmarks: measure a strength as if never seen)."""
        self.generated.clear()


@dataclass
class Translation:
    """A translated image, its difference heatmap and how well the model reconstructs the input."""

    image: np.ndarray  # in the input's units, dtype and layout
    heatmap: np.ndarray  # (H, W) difference summed over channels, normalised units
    heatmap_channels: np.ndarray  # (C, H, W)
    normalised: np.ndarray  # (C, H, W) the translation shown (`image`) in model range, for metrics
    generated: np.ndarray  # (C, H, W) the model's raw output under the target condition, model range
    reconstruction: np.ndarray | None  # (C, H, W) the model's rendering under the source condition, or None
    reconstruction_psnr: float  # dB, regenerating the input under its own condition
    settings: TranslationSettings  # resolved; `strength` is the one used (inversion steps used / steps)
    checkpoint_id: str
    autoencoder_psnr: float | None = None
    edit_mask: np.ndarray | None = None  # (C, H, W) weights the change was confined to, or None
    fit: FitReport | None = None  # the input's intensities against the training images' (`input_fit`)
    trust: TrustVerdict | None = None  # whether to believe it, calibrated on the model's held-out images (`trust`)
    inversion: Inversion | None = field(default=None, repr=False)  # reuse it to scrub without re-inverting

    source = property(lambda self: self.settings.source)
    target = property(lambda self: self.settings.target)
    strength = property(lambda self: self.settings.strength)
    steps = property(lambda self: self.settings.steps)
    guidance = property(lambda self: self.settings.guidance)
    seed = property(lambda self: self.settings.seed)
    reference = property(lambda self: self.settings.reference)
    solver = property(lambda self: self.settings.solver)

    def metadata(self) -> dict[str, Any]:
        """Provenance to store next to the result (napari layer metadata, OME-TIFF)."""
        from phenotwin import __version__

        s = self.settings
        return {
            "checkpoint": self.checkpoint_id,
            "source": s.source,
            "target": s.target,
            "strength": s.strength,
            "steps": s.steps,
            "solver": s.solver,
            "guidance": s.guidance,
            "seed": s.seed,
            "reconstruction_psnr": self.reconstruction_psnr,
            "autoencoder_psnr": self.autoencoder_psnr,
            "reference": s.reference,
            "confine": self.edit_mask is not None,
            "mask_draws": s.mask_draws if self.edit_mask is not None else None,
            "inversion_refinements": s.inversion_refinements,
            "match_intensities": s.match_intensities,
            "input_fit": None if self.fit is None else {"level": self.fit.level, "findings": list(self.fit.findings)},
            "trust": None if self.trust is None else self.trust.to_dict(),
            "phenotwin_version": __version__,
        }


def compose(inversion: Inversion, generated: np.ndarray, reconstruction: np.ndarray | None, mask: np.ndarray | None,
            settings: TranslationSettings, processor: ImageProcessor, checkpoint_id: str,
            calibration: dict[str, Any] | None = None) -> Translation:
    """The translation shown, from the model's renderings (model range, cropped) and the edit mask.

    With reference "reconstruction", the change the model makes between its own rendering of
    the input under the source and under the target condition is applied to the input itself:
    whatever the model cannot reproduce (camera noise, fine texture, the low-frequency drift of
    DDIM inversion) cancels, and where nothing changes the input is kept. An edit mask weighs
    that change (or, with reference "input", the raw rendering's difference to the input)."""
    if settings.reference == "reconstruction" or mask is not None:
        change = generated - (reconstruction if settings.reference == "reconstruction" else inversion.normalised)
        if mask is not None:
            change = change * mask
        shown = np.clip(inversion.normalised + change, -1.0, 1.0)
    else:
        shown = generated
    heat = difference_map(inversion.normalised, shown, signed=settings.signed, sigma=settings.sigma)
    quality = psnr(inversion.normalised, reconstruction) if reconstruction is not None else float("nan")
    used = settings.replace(strength=settings.used_steps / inversion.steps)
    return Translation(
        image=processor.postprocess(shown, inversion.layout), heatmap=heat.total, heatmap_channels=heat.per_channel,
        normalised=shown, generated=generated, reconstruction=reconstruction, reconstruction_psnr=quality,
        settings=used, checkpoint_id=checkpoint_id, autoencoder_psnr=inversion.autoencoder_psnr, edit_mask=mask,
        fit=inversion.fit, trust=verdict(quality, used.steps, used.strength, calibration, inversion.fit, used.guidance,
                                         used.solver, used.inversion_refinements),
        inversion=inversion,
    )
