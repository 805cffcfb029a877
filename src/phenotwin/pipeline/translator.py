"""`Translator`: the one entry point for inference, shared by the CLI, napari and tests.

PhenDiff / Phen-LDiff: the image is inverted to noise with deterministic DDIM inversion under
its own (source) condition, then regenerated under the target condition (or with DPM-Solver++,
`TranslationSettings.solver`). Three public steps,
as in diffusers' DiffEdit pipeline: `invert_steps` (image -> `Inversion`), `edit_mask_steps`
and `generate_steps` (`Inversion` -> `Translation`); `translate_steps` chains them. Another
target or strength starts from the cached trajectory and costs only its generation steps
(cheap scrubbing); an image already generated costs nothing. `translate_steps` inverts only as
deep as its strength needs (the first image sooner); a deeper strength later extends the
inversion from where it stopped (`extend_steps`), the results bit-identical to a full one's.
Every method takes one `TranslationSettings` (or its fields as keywords), checked by `resolve`
before any work; each long method has a generator form (`*_steps`) and a plain one with
progress and cancel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from phenotwin.errors import CheckpointError, PhenotwinError
from phenotwin.pipeline.cache import CACHE_BUDGET, GenerationCache
from phenotwin.pipeline.edit_mask import edit_mask_steps, mask_calls_left
from phenotwin.pipeline.outputs import Inversion, Translation, compose
from phenotwin.pipeline.settings import TranslationSettings, model_defaults
from phenotwin.pipeline.trajectory import TRAJECTORY_BUDGET, Diffusion
from phenotwin.preprocessing import ImageProcessor, PreparedImage
from phenotwin.progress import CancelFlag, Steps, drive, tagged

if TYPE_CHECKING:
    from phenotwin.checkpoint import Checkpoint


class Translator:
    """Loads a checkpoint once and translates images between its conditions."""

    trajectory_budget = TRAJECTORY_BUDGET
    cache_budget = CACHE_BUDGET

    def __init__(self, checkpoint: Checkpoint | str | os.PathLike, device: str = "auto", dtype: Any = None,
                 inversion_refinements: int | None = None, reference: str | None = None, solver: str | None = None):
        import torch

        from phenotwin.checkpoint import Checkpoint, load_checkpoint
        from phenotwin.modeling.conditioning import vae_downsampling
        from phenotwin.modeling.denoiser import Denoiser, pick_device

        loaded = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        self.device = pick_device(device)
        if dtype is None:
            # float16 halves time and memory on CUDA; CPU and MPS stay exact in float32.
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.info = loaded.info
        self.checkpoint_id = loaded.id
        self.checkpoint_path = loaded.path
        self.scheduler_config = loaded.scheduler_config
        self.max_steps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        # The model's defaults with this translator's overrides, checked now, not at the first click.
        overrides = TranslationSettings(inversion_refinements=inversion_refinements, reference=reference, solver=solver)
        overrides.resolve(self.info, self.max_steps, model_defaults())  # a bad argument is the caller's, say so
        try:
            stored = model_defaults(self.info.defaults).replace(inversion_refinements=inversion_refinements,
                                                                reference=reference, solver=solver)
            self.defaults = TranslationSettings().resolve(self.info, self.max_steps, stored)
        except PhenotwinError as err:
            raise CheckpointError(f"the model's defaults in {self.checkpoint_path or 'phenotwin.json'} do not work: {err} "
                                  "Fix 'defaults' in its phenotwin.json (or pass the setting explicitly).") from err
        self.denoiser = Denoiser(loaded, self.device, dtype)
        # The "batch unknown" row: the only one of a model without batches (`CheckpointInfo.batch_row`).
        self.diffusion = Diffusion(self.denoiser, self.scheduler_config).in_batch_row(self.info.batch_row(None))
        self._batch_diffusions = {None: self.diffusion}
        multiple = vae_downsampling(self.denoiser.vae) if self.denoiser.vae is not None else 1
        self.processor = ImageProcessor(self.info.channels, self.info.normalization, self.info.image_size, multiple,
                                        self.info.intensity_statistics, self.info.channel_names)

    classes = property(lambda self: list(self.info.classes))
    image_size = property(lambda self: self.info.image_size)
    channels = property(lambda self: self.info.channels)
    reference = property(lambda self: self.defaults.reference)
    inversion_refinements = property(lambda self: self.defaults.inversion_refinements)
    solver = property(lambda self: self.defaults.solver)

    batches = property(lambda self: list(self.info.batches or []))

    def diffusion_in(self, batch: str | None) -> Diffusion:
        """The diffusion conditioned within `batch` (None: batch unknown), built once per batch."""
        if batch not in self._batch_diffusions:
            self._batch_diffusions[batch] = self.diffusion.in_batch_row(self.info.batch_row(batch))
        return self._batch_diffusions[batch]

    def resolve(self, settings: TranslationSettings | None = None, **overrides: Any) -> TranslationSettings:
        """`settings` with `overrides` (None keeps a value), unset fields from this model's defaults, checked."""
        return (settings or TranslationSettings()).replace(**overrides).resolve(self.info, self.max_steps, self.defaults)

    def _for(self, inversion: Inversion, settings: TranslationSettings | None, **overrides: Any) -> TranslationSettings:
        """Settings to generate from `inversion`: its condition, steps, refinements and solver are fixed.
        A solver asked for that is not the inversion's is refused: its states are another solver's."""
        if inversion.checkpoint_id != self.checkpoint_id:
            raise PhenotwinError(
                "this inversion was made with another model "
                f"({inversion.checkpoint_id}, not {self.checkpoint_id}); invert the image again with this model."
            )
        asked = overrides.get("solver") or (settings.solver if settings is not None else None)
        if asked is not None and asked != inversion.solver:
            raise PhenotwinError(
                f"this inversion was made with solver {inversion.solver!r}, not {asked!r}: its states serve only the "
                f"solver that made them. Invert the image again with solver {asked!r} (or generate with "
                f"{inversion.solver!r})."
            )
        resolved = self.resolve(settings, **overrides, source=inversion.source, steps=inversion.steps,
                                inversion_refinements=inversion.refinements, solver=inversion.solver)
        if resolved.batch is not None and resolved.batch != inversion.batch:
            raise PhenotwinError(
                f"this inversion was made in batch {inversion.batch!r}, not {resolved.batch!r}: its states hold that "
                f"batch's look. Invert the image again with batch {resolved.batch!r}."
            )
        return resolved.replace(batch=inversion.batch)

    # -- inversion ---------------------------------------------------------------------

    def invert_steps(self, image: Any, source: str | int | None = None, steps: int | None = None,
                     channel_axis: int | None = None, *, settings: TranslationSettings | None = None,
                     strength: float | None = None, batch: str | None = None) -> Steps[Inversion]:
        """Generator form of `invert`: yields a `Progress` per step, returns the `Inversion`. With
        `strength`, only as deep as that strength needs; a deeper generation extends it later."""
        s = self.resolve(settings, source=source, steps=steps, strength=strength, batch=batch)
        depth = s.steps if strength is None else s.used_steps
        return self._invert(self.processor.preprocess(image, channel_axis, s.match_intensities), s, depth)

    def _invert(self, prepared: PreparedImage, settings: TranslationSettings, depth: int) -> Steps[Inversion]:
        diffusion = self.diffusion_in(settings.batch)
        sample, autoencoder_psnr = diffusion.encode(prepared.model_input)
        inversion = Inversion(
            source=settings.source, source_index=self.classes.index(settings.source), classes=tuple(self.classes),
            steps=settings.steps, states={0: sample}, model_input=prepared.model_input,
            normalised=prepared.normalised, layout=prepared.layout, checkpoint_id=self.checkpoint_id,
            autoencoder_psnr=autoencoder_psnr, refinements=settings.inversion_refinements, solver=settings.solver,
            trajectory_budget=self.trajectory_budget, generated=GenerationCache(self.cache_budget), fit=prepared.fit,
            batch=settings.batch,
        )
        return (yield from diffusion.extend(inversion, depth))

    def extend_steps(self, inversion: Inversion, strength: float = 1.0) -> Steps[Inversion]:
        """Invert further, as deep as `strength` needs (1: all the way), from the deepest state reached:
        the widget's background work after a first result, so that scrubbing up needs no inversion."""
        return self.diffusion_in(inversion.batch).extend(inversion,
                                                         self._for(inversion, None, strength=strength).used_steps)

    # -- generation --------------------------------------------------------------------

    def generate_steps(self, inversion: Inversion, target: str | int | None = None, strength: float | None = None,
                       guidance: float | None = None, seed: int | None = None, reconstruct: bool = True,
                       signed: bool | None = None, sigma: float | None = None, confine: bool | None = None, *,
                       settings: TranslationSettings | None = None) -> Steps[Translation]:
        """Generator form of `generate`: regenerate a cached inversion under the target condition.

        Costs round(strength * steps) UNet calls (`schedulers.generation_steps`: one more with
        DPM-Solver++ below strength 1), nothing for an image already generated, plus
        the inversion steps still missing when the inversion is shallower than this strength (it
        is extended from its deepest state); it never re-inverts (a state not kept is rebuilt
        from the kept one below). The source condition rides in the same batch (once per
        strength, then cached): it measures how faithfully the model reproduces the input, and
        with reference "reconstruction" the translation is relative to it; `reconstruct=False`
        skips it in "input" mode. `confine` reuses the cached generations, so switching it costs
        no step.
        """
        resolved = self._for(inversion, settings, target=target, strength=strength, guidance=guidance, seed=seed,
                             signed=signed, sigma=sigma, confine=confine)
        return self._generate(inversion, resolved, reconstruct)

    def _generate(self, inversion: Inversion, s: TranslationSettings, reconstruct: bool) -> Steps[Translation]:
        target_index, used = self.classes.index(s.target), s.used_steps
        diffusion = self.diffusion_in(inversion.batch)
        mask = (yield from edit_mask_steps(diffusion, inversion, target_index, s.mask_draws)) if s.confine else None
        relative = s.reference == "reconstruction"
        source_key = (inversion.source_index, used, s.guidance)
        generated = inversion.generated.get((target_index, used, s.guidance))
        reconstruction = inversion.generated.get(source_key)
        # DDIM with eta = 0 and DPM-Solver++ (not its SDE variant) never draw noise: the seed cannot change a cached image.
        if generated is None or ((reconstruct or relative) and reconstruction is None):
            generated, made = yield from diffusion.render(inversion, target_index, used, s.guidance, s.seed,
                                                          reconstruct or relative)
            if target_index == inversion.source_index:
                reconstruction = generated
            elif made is not None:
                reconstruction = made
        return compose(inversion, generated, reconstruction, mask, s, self.processor, self.checkpoint_id,
                       self.info.calibration)

    def is_generated(self, inversion: Inversion, target: str | int | None = None, strength: float | None = None,
                     guidance: float | None = None, confine: bool | None = None, *,
                     settings: TranslationSettings | None = None) -> bool:
        """Whether `generate` at these settings would only read the cache (no UNet call)."""
        s = self._for(inversion, settings, target=target, strength=strength, guidance=guidance, confine=confine)
        target_index = self.classes.index(s.target)
        needed = [s.target] + [s.source] * (s.reference == "reconstruction")
        masked = not s.confine or mask_calls_left(inversion, target_index, s.mask_draws) == 0
        return masked and all(inversion.is_cached(c, s.strength, s.guidance) for c in needed)

    def prefetch_steps(self, inversion: Inversion, strengths: Sequence[float], settings: TranslationSettings | None = None,
                       **overrides: Any) -> Steps[int]:
        """Generate `strengths`, in the order given, into the inversion's image cache; returns how many.

        The widget spends idle time here: afterwards a slider move to one of them costs a
        heatmap. Strengths already cached are skipped; it stops before the cache would have to
        forget the first ones (`cache_budget`)."""
        s = self._for(inversion, settings, **overrides)
        with_source = s.reference == "reconstruction"  # what `generate` would then also need
        rungs: list[int] = []
        for strength in strengths:
            rung = self._for(inversion, s, strength=strength).replace(confine=False)  # images only, not masks
            if rung.used_steps not in rungs and not self.is_generated(inversion, settings=rung):
                rungs.append(rung.used_steps)
        image_bytes = int(np.prod(inversion.normalised.shape)) * np.dtype(np.float32).itemsize
        rungs = rungs[: max(0, inversion.generated.free_bytes() // (image_bytes * (1 + with_source)))]
        target_index, diffusion = self.classes.index(s.target), self.diffusion_in(inversion.batch)
        for k, used in enumerate(rungs):
            yield from tagged(diffusion.render(inversion, target_index, used, s.guidance, None, with_source),
                              k + 1, len(rungs), "strength")
        return len(rungs)

    def edit_mask_steps(self, inversion: Inversion, target: str | int, draws: int | None = None) -> Steps[np.ndarray]:
        """Where the condition matters: weights (C, H, W) in [0, 1] (`edit_mask`); `draws` default: the model's `mask_draws`."""
        draws = draws or self.defaults.mask_draws
        return edit_mask_steps(self.diffusion_in(inversion.batch), inversion, self.info.class_index(target), draws)

    def translate_steps(self, image: Any, source: str | int | None = None, target: str | int | None = None,
                        strength: float | None = None, steps: int | None = None, guidance: float | None = None,
                        seed: int | None = None, channel_axis: int | None = None, signed: bool | None = None,
                        sigma: float | None = None, confine: bool | None = None, *,
                        settings: TranslationSettings | None = None, batch: str | None = None) -> Steps[Translation]:
        """Generator form of `translate`: inversion then generation, one `Progress` per step.
        Settings and the image are checked now, not after a minute of inversion."""
        s = self.resolve(settings, source=source, target=target, strength=strength, steps=steps, guidance=guidance,
                         seed=seed, signed=signed, sigma=sigma, confine=confine, batch=batch)
        if s.source is None or s.target is None:
            raise PhenotwinError(f"a translation needs a source and a target condition; this model knows "
                                 f"{', '.join(map(repr, self.classes))}.")
        prepared = self.processor.preprocess(image, channel_axis, s.match_intensities)

        def run():
            inversion = yield from self._invert(prepared, s, s.used_steps)  # no deeper than this strength needs
            return (yield from self._generate(inversion, s, True))

        return run()

    def sample_steps(self, target: str | int, count: int = 1, seed: int = 0, steps: int | None = None,
                     guidance: float | None = None, batch: str | None = None) -> Steps[np.ndarray]:
        """Generator form of `sample`: new images of a condition drawn from seeded noise (training
        sample grids, memorisation checks: two models given the same seed start from the same noise).
        Always DDIM: the solver setting is a translation's."""
        s = self.resolve(target=target, steps=steps, guidance=guidance, batch=batch)
        return self.diffusion_in(s.batch).sample_from_noise(self.classes.index(s.target), count, seed, s.steps, s.guidance)

    # -- plain calls, with an optional progress callback and cancel flag ------------------

    def sample(self, target, count=1, seed=0, steps=None, guidance=None, progress=None, cancel: CancelFlag = None,
               batch=None):
        """`count` images of condition `target` (in `batch`) from seeded noise, (count, C, S, S) in model range [-1, 1]."""
        return drive(self.sample_steps(target, count, seed, steps, guidance, batch), progress, cancel)

    def invert(self, image, source=None, steps=None, channel_axis=None, progress=None, cancel: CancelFlag = None, *,
               strength=None, settings=None, batch=None) -> Inversion:
        """Invert `image` under its `source` condition, all the way or as deep as `strength` needs (`invert_steps`)."""
        return drive(self.invert_steps(image, source, steps, channel_axis, settings=settings, strength=strength,
                                       batch=batch), progress, cancel)

    def extend(self, inversion, strength=1.0, progress=None, cancel: CancelFlag = None) -> Inversion:
        """Invert `inversion` further, as deep as `strength` needs (see `extend_steps`)."""
        return drive(self.extend_steps(inversion, strength), progress, cancel)

    def generate(self, inversion, target=None, strength=None, guidance=None, seed=None, reconstruct=True, signed=None,
                 sigma=None, confine=None, progress=None, cancel: CancelFlag = None, *, settings=None) -> Translation:
        """Regenerate a cached `Inversion` under `target` at `strength` (see `generate_steps`)."""
        return drive(self.generate_steps(inversion, target, strength, guidance, seed, reconstruct, signed, sigma,
                                         confine, settings=settings), progress, cancel)

    def translate(self, image, source=None, target=None, strength=None, steps=None, guidance=None, seed=None,
                  channel_axis=None, signed=None, sigma=None, confine=None, progress=None, cancel: CancelFlag = None,
                  *, settings=None, batch=None) -> Translation:
        """Translate `image` from condition `source` to `target`.

        Returns a `Translation` with the translated image (input units, dtype and layout),
        the difference heatmap and the reconstruction PSNR of the input under its own
        condition; `.inversion` holds the cached inversion for `generate()`.
        """
        return drive(self.translate_steps(image, source, target, strength, steps, guidance, seed, channel_axis, signed,
                                          sigma, confine, settings=settings, batch=batch), progress, cancel)
