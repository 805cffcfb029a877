"""`Translator`: the one entry point for inference, shared by the CLI, napari and tests.

A translation follows PhenDiff / Phen-LDiff: the image is inverted to noise with
deterministic DDIM inversion under its own (source) condition, then regenerated with DDIM
under the target condition. The inversion trajectory is cached, so generating again with
another target or another strength starts from the cached state at the right noise level
and costs only the generation steps: this is what makes scrubbing strength cheap. On large
fields only an evenly spaced subset of the states is kept (a memory budget); a state in
between is recomputed exactly from the one below it. Generated images are cached per
(condition, strength, guidance), so returning to a strength already seen costs nothing.

With `confine`, the change is kept only where the model's own predictions under the two
conditions disagree (a soft DiffEdit mask, computed once per image and target): what the
condition does not touch (another channel, the rest of the cell) stays (almost) as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from phenotwin import imaging
from phenotwin.errors import PhenotwinError
from phenotwin.heatmap import difference_map
from phenotwin.progress import CancelFlag, Progress, Steps, drive

if TYPE_CHECKING:
    import torch

    from phenotwin.checkpoint import Checkpoint


REFERENCES = ("reconstruction", "input")
# Bytes of inversion states an `Inversion` keeps (float32, on the model's device). A 64 px
# model keeps all 51 states of a 50-step inversion in 1.6 MB; a 2048² two-channel field
# (32 MiB a state) keeps 8 of them, instead of 1.7 GB for all.
TRAJECTORY_BUDGET = 256 * 2**20
# Bytes of generated images (translations and reconstructions) an `Inversion` caches for
# scrubbing; the oldest go first. 8 images of a 2048² two-channel field.
CACHE_BUDGET = 256 * 2**20
# The edit mask (DiffEdit, Couairon et al. 2022): the input noised to these levels (fractions
# of the training timesteps), CONFINE_DRAWS noise draws each, the clean images predicted under
# both conditions compared; their absolute difference, summed and smoothed (Gaussian sigma in
# pixels), weights the change from 0 to 1, reaching 1 at CONFINE_RAMP of its maximum.
# Chosen on 16 held-out demo pairs from index 300 000 (docs/training.md, The demo model).
CONFINE_LEVELS = (0.3, 0.5, 0.7)
CONFINE_DRAWS = 4
CONFINE_SMOOTHING = 1.0
CONFINE_RAMP = 0.5
CONFINE_CALLS = len(CONFINE_LEVELS) * CONFINE_DRAWS  # model calls (of two images) per edit mask


def psnr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """PSNR in dB of model-range ([-1, 1]) images."""
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(reference, estimate):
        return float("inf")
    return float(peak_signal_noise_ratio(reference, estimate, data_range=2.0))


def kept_states(steps: int, state_bytes: int, budget: int = TRAJECTORY_BUDGET) -> list[int]:
    """Which of the `steps + 1` inversion states to keep within `budget` bytes: evenly spread,
    always the clean start (state 0, to recompute from) and the last one (strength 1)."""
    count = min(steps + 1, max(2, budget // max(1, state_bytes)))
    return sorted({round(i * steps / (count - 1)) for i in range(count)})


@dataclass
class Inversion:
    """A source image inverted under its condition, with (a bounded subset of) its DDIM trajectory.

    `states[k]` is the sample after k inversion steps (k = 0: the clean image or its latent),
    so a generation at strength s starts from state round(s * steps); `Translator` recomputes
    a state that was not kept from the nearest kept one below it (see `kept_states`).
    """

    source: str
    source_index: int
    steps: int
    states: dict[int, torch.Tensor]
    model_input: np.ndarray  # (C, H', W') model range, padded to at least the model size
    normalised: np.ndarray  # (C, H, W) model range, at the image's own size
    layout: imaging.ImageLayout
    checkpoint_id: str
    autoencoder_psnr: float | None = None
    refinements: int = 0  # fixed-point iterations per inversion step, to recompute states identically
    # Generated images (model range, cropped) by (class index, inversion steps used, guidance),
    # oldest first; under the source class they are the reconstructions.
    generated: dict[tuple[int, int, float], np.ndarray] = field(default_factory=dict, repr=False)
    # Edit masks (C, H, W) in [0, 1] by target class index (see `Translator.edit_mask_steps`).
    edit_masks: dict[int, np.ndarray] = field(default_factory=dict, repr=False)


@dataclass
class Translation:
    """A translated image, its difference heatmap and how well the model reconstructs the input."""

    image: np.ndarray  # in the input's units, dtype and layout
    heatmap: np.ndarray  # (H, W) difference summed over channels, normalised units
    heatmap_channels: np.ndarray  # (C, H, W)
    normalised: np.ndarray  # (C, H, W) the translation shown (`image`) in model range, for metrics
    generated: np.ndarray  # (C, H, W) the model's raw output under the target condition, model range
    reconstruction_psnr: float  # dB, regenerating the input under its own condition
    source: str
    target: str
    strength: float  # the strength actually used: inversion steps used / steps
    steps: int
    guidance: float
    seed: int | None
    checkpoint_id: str
    autoencoder_psnr: float | None = None
    reference: str = "reconstruction"
    edit_mask: np.ndarray | None = None  # (C, H, W) weights the change was confined to, or None
    inversion: Inversion | None = field(default=None, repr=False)  # reuse it to scrub without re-inverting

    def metadata(self) -> dict[str, Any]:
        """Provenance to store next to the result (napari layer metadata, OME-TIFF)."""
        from phenotwin import __version__

        return {
            "checkpoint": self.checkpoint_id,
            "source": self.source,
            "target": self.target,
            "strength": self.strength,
            "steps": self.steps,
            "guidance": self.guidance,
            "seed": self.seed,
            "reconstruction_psnr": self.reconstruction_psnr,
            "autoencoder_psnr": self.autoencoder_psnr,
            "reference": self.reference,
            "confine": self.edit_mask is not None,
            "phenotwin_version": __version__,
        }


class Translator:
    """Loads a checkpoint once and translates images between its conditions.

    >>> translator = Translator("my-model")                      # doctest: +SKIP
    >>> result = translator.translate(image, "control", "treated")  # doctest: +SKIP
    >>> result.image, result.heatmap, result.reconstruction_psnr    # doctest: +SKIP
    """

    trajectory_budget = TRAJECTORY_BUDGET
    cache_budget = CACHE_BUDGET

    def __init__(
        self,
        checkpoint: Checkpoint | str | os.PathLike,
        device: str = "auto",
        dtype: Any = None,
        inversion_refinements: int | None = None,
        reference: str | None = None,
    ):
        import torch

        from phenotwin.checkpoint import Checkpoint, load_checkpoint
        from phenotwin.engine import Denoiser, pick_device

        loaded = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        self.device = pick_device(device)
        if dtype is None:
            # float16 halves time and memory on CUDA; CPU and MPS stay exact in float32.
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.info = loaded.info
        self.checkpoint_id = loaded.id
        self.checkpoint_path = loaded.path
        self.scheduler_config = loaded.scheduler_config
        self.denoiser = Denoiser(loaded, self.device, dtype)
        self._schedulers: dict[int, tuple[Any, Any]] = {}
        if inversion_refinements is None:
            inversion_refinements = int(self.info.defaults.get("inversion_refinements", 0))
        if inversion_refinements < 0:
            raise PhenotwinError(f"inversion_refinements must be 0 or more, got {inversion_refinements}.")
        # Extra model evaluations per inversion step (fixed-point iterations); 0 = plain DDIM inversion.
        self.inversion_refinements = inversion_refinements
        reference = reference or self.info.defaults.get("reference", "reconstruction")
        if reference not in REFERENCES:
            raise PhenotwinError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}.")
        # "reconstruction": translation = input + (target rendering - source rendering);
        # "input": the raw target rendering (PhenDiff), compared with the input.
        self.reference = reference

    @property
    def classes(self) -> list[str]:
        return list(self.info.classes)

    @property
    def image_size(self) -> int:
        return self.info.image_size

    @property
    def channels(self) -> int:
        return self.info.channels

    def _size_multiple(self) -> int:
        from phenotwin.engine import vae_downsampling

        return vae_downsampling(self.denoiser.vae) if self.denoiser.vae is not None else 1

    def _schedulers_for(self, steps: int):
        from phenotwin.engine import inference_schedulers

        if steps not in self._schedulers:
            self._schedulers[steps] = inference_schedulers(self.scheduler_config, steps)
        return self._schedulers[steps]

    # -- validation, done eagerly so that errors appear before any work starts ------------

    def _steps(self, steps: int | None) -> int:
        steps = self.info.defaults["steps"] if steps is None else steps
        limit = int(self.scheduler_config.get("num_train_timesteps", 1000))
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= limit:
            raise PhenotwinError(f"steps must be a whole number from 1 to {limit}, got {steps!r}. 50 is a good default.")
        return int(steps)

    @staticmethod
    def _strength(strength: float) -> float:
        if not isinstance(strength, (int, float, np.floating)) or not 0.0 < float(strength) <= 1.0:
            raise PhenotwinError(
                f"strength must be in (0, 1], got {strength!r}: 1 inverts all the way to noise (strongest change), "
                "smaller values keep more of the original image."
            )
        return float(strength)

    @staticmethod
    def _guidance(guidance: float) -> float:
        if not isinstance(guidance, (int, float, np.floating)) or not np.isfinite(guidance) or guidance < 0:
            raise PhenotwinError(f"guidance must be a number >= 0 (0 = no guidance), got {guidance!r}.")
        return float(guidance)

    def confine_setting(self, confine: bool | None = None) -> bool:
        """`confine` as given, or the model's default when None; validated."""
        confine = self.info.defaults["confine"] if confine is None else confine
        if not isinstance(confine, (bool, np.bool_)):
            raise PhenotwinError(f"confine must be true or false, got {confine!r}.")
        return bool(confine)

    def check_settings(self, source=None, target=None, strength=None, steps=None, guidance=None):
        """Validate settings (None = the model's default) and return them resolved:
        (source index, target index, strength, steps, guidance); indices are None when not given."""
        defaults = self.info.defaults
        return (
            None if source is None else self.info.class_index(source),
            None if target is None else self.info.class_index(target),
            self._strength(defaults["strength"] if strength is None else strength),
            self._steps(steps),
            self._guidance(defaults["guidance"] if guidance is None else guidance),
        )

    # -- inversion ---------------------------------------------------------------------

    def invert_steps(
        self, image: Any, source: str | int, steps: int | None = None, channel_axis: int | None = None
    ) -> Steps[Inversion]:
        """Generator form of `invert`: yields a `Progress` per step, returns the `Inversion`."""
        source_index = self.info.class_index(source)
        steps = self._steps(steps)
        model_input, normalised, layout = imaging.prepare(
            image, self.channels, self.info.normalization, self.image_size, channel_axis, self._size_multiple()
        )
        return self._invert(model_input, normalised, layout, source_index, steps)

    def _invert(self, model_input, normalised, layout, source_index: int, steps: int) -> Steps[Inversion]:
        import torch

        den = self.denoiser
        with torch.inference_mode():
            sample = den.encode(torch.from_numpy(model_input)[None].to(self.device))
            autoencoder_psnr = None
            if den.vae is not None:
                autoencoder_psnr = psnr(model_input, den.decode(sample)[0].clamp(-1, 1).cpu().numpy())
        keep = set(kept_states(steps, sample.numel() * sample.element_size(), self.trajectory_budget))
        states = {0: sample}
        for k, sample in enumerate(self._inversion_steps(sample, 0, steps, steps, source_index,
                                                         self.inversion_refinements), start=1):
            if k in keep:
                states[k] = sample
            yield Progress("invert", k, steps)
        return Inversion(
            source=self.classes[source_index],
            source_index=source_index,
            steps=steps,
            states=states,
            model_input=model_input,
            normalised=normalised,
            layout=layout,
            checkpoint_id=self.checkpoint_id,
            autoencoder_psnr=autoencoder_psnr,
            refinements=self.inversion_refinements,
        )

    def _inversion_steps(self, sample, start: int, stop: int, steps: int, source_index: int, refinements: int):
        """Inversion states start+1 .. stop of a `steps`-step inversion from state `start`,
        one at a time; the same computation whether run first or to recompute a state."""
        import torch

        inverse, _ = self._schedulers_for(steps)
        labels = torch.tensor([source_index], device=self.device)
        for t in inverse.timesteps[start:stop]:
            previous = sample
            sample = self._step(inverse, previous, t, labels)
            # Fixed-point refinement: re-evaluate the model at the new sample, so this step is
            # the exact inverse of the DDIM step that generation will take (sharper reconstruction).
            for _ in range(refinements):
                sample = self._step(inverse, previous, t, labels, model_input=sample)
            yield sample

    def _state(self, inversion: Inversion, k: int) -> Steps[torch.Tensor]:
        """Inversion state k: kept, or recomputed from the nearest kept state below it."""
        if k in inversion.states:
            return inversion.states[k]
        start = max(j for j in inversion.states if j < k)
        sample = inversion.states[start]
        for i, sample in enumerate(self._inversion_steps(sample, start, k, inversion.steps, inversion.source_index,
                                                         inversion.refinements), start=1):
            yield Progress("invert", i, k - start)
        return sample

    # -- generation --------------------------------------------------------------------

    def generate_steps(
        self,
        inversion: Inversion,
        target: str | int,
        strength: float | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        reconstruct: bool = True,
        signed: bool = False,
        sigma: float = 0.0,
        confine: bool | None = None,
    ) -> Steps[Translation]:
        """Generator form of `generate`: regenerate a cached inversion under `target`.

        Costs round(strength * steps) UNet calls, nothing for an image already generated,
        and never re-inverts (on a large field whose state at this strength was not kept, a
        few inversion steps rebuild it from the kept state below). The source condition
        is generated in the same batch (once per strength, then cached): it measures how
        faithfully the model reproduces the input, and with reference "reconstruction" the
        translation is taken relative to it. `reconstruct=False` skips it in "input" mode.
        `confine` (default: the model's) keeps the change only where the condition matters
        (`edit_mask_steps`); it reuses the cached generations, so switching it costs no step.
        """
        if inversion.checkpoint_id != self.checkpoint_id:
            raise PhenotwinError(
                "this inversion was made with another model "
                f"({inversion.checkpoint_id}, not {self.checkpoint_id}); invert the image again with this model."
            )
        _, target_index, strength, _, guidance = self.check_settings(None, target, strength, None, guidance)
        used_steps = max(1, round(strength * inversion.steps))
        confine = self.confine_setting(confine)
        return self._generate(inversion, target_index, used_steps, guidance, seed, reconstruct, signed, sigma, confine)

    def _generate(self, inversion, target_index, used_steps, guidance, seed, reconstruct, signed, sigma, confine):
        mask = (yield from self._edit_mask(inversion, target_index)) if confine else None
        source_key = (inversion.source_index, used_steps, guidance)
        relative = self.reference == "reconstruction"
        cached = inversion.generated.get((target_index, used_steps, guidance))
        # DDIM with eta = 0 never draws noise, so the seed cannot change a cached image.
        if cached is not None and not ((reconstruct or relative) and source_key not in inversion.generated):
            generated = cached  # already generated: costs nothing
        else:
            generated = yield from self._sample(
                inversion, target_index, used_steps, guidance, seed, reconstruct or relative
            )
        reconstruction = inversion.generated.get(source_key)
        if relative or mask is not None:
            # Relative: the change the model makes between its own rendering of the input under
            # the source and under the target condition, applied to the input itself: whatever
            # the model cannot reproduce (camera noise, fine texture, the low-frequency drift of
            # DDIM inversion) cancels, and where nothing changes the input is kept.
            change = generated - (reconstruction if relative else inversion.normalised)
            if mask is not None:
                change = change * mask
            shown = np.clip(inversion.normalised + change, -1.0, 1.0)
        else:
            shown = generated
        heat = difference_map(inversion.normalised, shown, signed=signed, sigma=sigma)
        return Translation(
            image=imaging.denormalise(shown, inversion.layout),
            heatmap=heat.total,
            heatmap_channels=heat.per_channel,
            normalised=shown,
            generated=generated,
            reconstruction_psnr=psnr(inversion.normalised, reconstruction) if reconstruction is not None else float("nan"),
            source=inversion.source,
            target=self.classes[target_index],
            strength=used_steps / inversion.steps,
            steps=inversion.steps,
            guidance=guidance,
            seed=seed,
            checkpoint_id=self.checkpoint_id,
            autoencoder_psnr=inversion.autoencoder_psnr,
            reference=self.reference,
            edit_mask=mask,
            inversion=inversion,
        )

    def _sample(self, inversion, target_index, used_steps, guidance, seed, reconstruct) -> Steps[np.ndarray]:
        """DDIM from the cached trajectory; the source class rides along in the batch when a
        reconstruction at this strength is still missing."""
        import torch

        _, sampler = self._schedulers_for(inversion.steps)
        source_key = (inversion.source_index, used_steps, guidance)
        is_source = target_index == inversion.source_index
        with_reconstruction = reconstruct and not is_source and source_key not in inversion.generated
        labels = torch.tensor([target_index] + [inversion.source_index] * with_reconstruction, device=self.device)
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        start = yield from self._state(inversion, used_steps)
        sample = start.repeat(len(labels), 1, 1, 1)
        for i, t in enumerate(sampler.timesteps[inversion.steps - used_steps :]):
            sample = self._step(sampler, sample, t, labels, guidance, generator)
            yield Progress("generate", i + 1, used_steps)
        images = self._decode(sample)
        height, width = inversion.normalised.shape[1:]
        # Drop the padding; copies, so a cached image does not hold the whole batch alive.
        translated = images[0][:, :height, :width].copy()
        self._remember(inversion, (target_index, used_steps, guidance), translated)
        if with_reconstruction:  # last, so the budget cannot evict it before `_generate` reads it
            self._remember(inversion, source_key, images[1][:, :height, :width].copy())
        return translated

    def is_generated(self, inversion: Inversion, target: str | int, strength: float, guidance: float | None = None,
                     confine: bool | None = None) -> bool:
        """Whether `generate` at these settings would only read the cache (no UNet call)."""
        _, target_index, strength, _, guidance = self.check_settings(None, target, strength, None, guidance)
        used = max(1, round(strength * inversion.steps))
        keys = [(target_index, used, guidance)] + [(inversion.source_index, used, guidance)] * (
            self.reference == "reconstruction")
        masked = (not self.confine_setting(confine) or target_index == inversion.source_index
                  or target_index in inversion.edit_masks)
        return masked and all(key in inversion.generated for key in keys)

    def prefetch_steps(
        self, inversion: Inversion, target: str | int, strengths: list[float], guidance: float | None = None
    ) -> Steps[int]:
        """Generate `strengths`, in the order given, into the inversion's image cache.

        A new strength costs round(strength * steps) UNet calls and cannot reuse another
        strength's trajectory, so the widget spends idle time here: afterwards a slider move
        to one of these strengths costs a heatmap. Strengths already cached are skipped; it
        stops before the cache would have to forget the first ones (`cache_budget`).
        Returns how many strengths it generated. Cancel it like any other steps."""
        from phenotwin.progress import tagged

        _, target_index, _, _, guidance = self.check_settings(None, target, None, None, guidance)
        with_source = self.reference == "reconstruction"  # what `generate` would then also need
        rungs: list[int] = []
        for strength in strengths:
            used = max(1, round(self._strength(strength) * inversion.steps))
            if used not in rungs and not self.is_generated(inversion, target_index, strength, guidance):
                rungs.append(used)
        image_bytes = int(np.prod(inversion.normalised.shape)) * np.dtype(np.float32).itemsize
        free = self.cache_budget - sum(image.nbytes for image in inversion.generated.values())
        rungs = rungs[: max(0, free // (image_bytes * (1 + with_source)))]
        for k, used in enumerate(rungs):
            yield from tagged(self._sample(inversion, target_index, used, guidance, None, with_source),
                              k + 1, len(rungs), "strength")
        return len(rungs)

    def edit_mask_steps(self, inversion: Inversion, target: str | int) -> Steps[np.ndarray]:
        """Where the condition matters for this image: weights (C, H, W) in [0, 1], cached.

        DiffEdit's mask (Couairon et al. 2022): the input is noised, the model predicts the
        clean image under the source and under the target condition, and the two disagree
        where the condition changes something. diffusers' DiffEdit pipeline is bound to text
        prompts and one binary mask over SD latents; this one serves pixel and latent models,
        keeps one mask per image channel (a channel the condition leaves alone changes
        little) and stays soft: a binary mask would tie most pixels of the heatmap at zero.
        Costs CONFINE_CALLS model calls of two images, seeded; a stage of its own ("edit mask").
        """
        return self._edit_mask(inversion, self.info.class_index(target))

    def _edit_mask(self, inversion: Inversion, target_index: int) -> Steps[np.ndarray]:
        import torch
        from skimage.filters import gaussian

        cached = inversion.edit_masks.get(target_index)
        if cached is not None:
            return cached
        height, width = inversion.normalised.shape[1:]
        difference = np.zeros(inversion.normalised.shape, np.float32)
        if target_index != inversion.source_index:
            _, sampler = self._schedulers_for(inversion.steps)
            clean = inversion.states[0]
            labels = torch.tensor([target_index, inversion.source_index], device=self.device)
            generator = torch.Generator(device="cpu").manual_seed(0)
            last = int(sampler.config.num_train_timesteps) - 1
            levels = [round(level * last) for level in CONFINE_LEVELS for _ in range(CONFINE_DRAWS)]
            for i, t in enumerate(levels):
                noise = torch.randn(clean.shape, generator=generator).to(self.device)
                with torch.inference_mode():
                    noisy = sampler.add_noise(clean, noise, torch.tensor([t], device=self.device)).repeat(2, 1, 1, 1)
                    output = self.denoiser.predict(noisy, t, labels)
                    # DDIM's step converts any prediction type to its clean-image estimate.
                    predicted = sampler.step(output, t, noisy).pred_original_sample
                    images = self.denoiser.decode(predicted).cpu().numpy()
                difference += np.abs(images[0] - images[1])[:, :height, :width]
                yield Progress("edit mask", i + 1, len(levels))
        # A sum, not a mean: only the ratio to its own maximum counts.
        smooth = gaussian(difference, sigma=CONFINE_SMOOTHING, channel_axis=0, preserve_range=True)
        peak = float(smooth.max())
        mask = np.clip(smooth / (CONFINE_RAMP * peak), 0.0, 1.0) if peak > 0 else np.zeros_like(smooth)
        inversion.edit_masks[target_index] = mask.astype(np.float32)
        return inversion.edit_masks[target_index]

    def _remember(self, inversion: Inversion, key, image: np.ndarray) -> None:
        """Cache a generated image; beyond `cache_budget`, forget the oldest others."""
        cache = inversion.generated
        cache[key] = image
        while len(cache) > 1 and sum(a.nbytes for a in cache.values()) > self.cache_budget:
            del cache[next(k for k in cache if k != key)]

    def translate_steps(
        self,
        image: Any,
        source: str | int,
        target: str | int,
        strength: float | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        channel_axis: int | None = None,
        signed: bool = False,
        sigma: float = 0.0,
        confine: bool | None = None,
    ) -> Steps[Translation]:
        """Generator form of `translate`: inversion then generation, one `Progress` per step."""
        # Validate the generation settings now, not after a minute of inversion.
        _, target_index, strength, steps, guidance = self.check_settings(source, target, strength, steps, guidance)
        confine = self.confine_setting(confine)
        inverting = self.invert_steps(image, source, steps, channel_axis)

        def run():
            inversion = yield from inverting
            return (yield from self.generate_steps(inversion, target_index, strength, guidance, seed, True, signed, sigma,
                                                   confine))

        return run()

    # -- sampling from noise ------------------------------------------------------------

    def sample_steps(
        self, target: str | int, count: int = 1, seed: int = 0, steps: int | None = None, guidance: float | None = None
    ) -> Steps[np.ndarray]:
        """Generator form of `sample`: new images of a condition drawn from seeded noise.

        Used for training sample grids and memorisation checks: two models given the same
        seed start from the same noise.
        """
        _, target_index, _, steps, guidance = self.check_settings(None, target, None, steps, guidance)
        return self._sample_from_noise(target_index, count, seed, steps, guidance)

    def _sample_from_noise(self, target_index, count, seed, steps, guidance) -> Steps[np.ndarray]:
        import torch

        _, sampler = self._schedulers_for(steps)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn((count, *self.denoiser.sample_shape()), generator=generator)
        sample = (noise * sampler.init_noise_sigma).to(self.device)
        labels = torch.full((count,), target_index, device=self.device)
        for i, t in enumerate(sampler.timesteps):
            sample = self._step(sampler, sample, t, labels, guidance)
            yield Progress("sample", i + 1, steps)
        return self._decode(sample)

    # Grad-mode contexts are thread-local state: one held open across a `yield` would leak
    # into the caller (a GUI callback, another job on the same worker thread). So each
    # model call gets its own inference_mode block and the generators yield outside them.

    def _step(self, scheduler, sample, t, labels, guidance: float = 0.0, generator=None, model_input=None):
        """One DDIM (or inverse DDIM) step from `sample`, the model evaluated at `model_input` (default: `sample`)."""
        import torch

        with torch.inference_mode():
            output = self.denoiser.predict(sample if model_input is None else model_input, t, labels, guidance)
            extra = {"generator": generator} if generator is not None else {}
            return scheduler.step(output, int(t), sample, **extra).prev_sample

    def _decode(self, sample) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.denoiser.decode(sample).clamp(-1, 1).cpu().numpy()

    # -- plain calls, with an optional progress callback and cancel flag ------------------

    def sample(self, target, count=1, seed=0, steps=None, guidance=None, progress=None, cancel: CancelFlag = None):
        """`count` images of condition `target` from seeded noise, (count, C, S, S) in model range [-1, 1]."""
        return drive(self.sample_steps(target, count, seed, steps, guidance), progress, cancel)

    def invert(self, image, source, steps=None, channel_axis=None, progress=None, cancel: CancelFlag = None) -> Inversion:
        """Invert `image` under its `source` condition (see `invert_steps`)."""
        return drive(self.invert_steps(image, source, steps, channel_axis), progress, cancel)

    def generate(self, inversion, target, strength=None, guidance=None, seed=None, reconstruct=True,
                 signed=False, sigma=0.0, confine=None, progress=None, cancel: CancelFlag = None) -> Translation:
        """Regenerate a cached `Inversion` under `target` at `strength` (see `generate_steps`)."""
        return drive(
            self.generate_steps(inversion, target, strength, guidance, seed, reconstruct, signed, sigma, confine),
            progress, cancel,
        )

    def translate(self, image, source, target, strength=None, steps=None, guidance=None, seed=None,
                  channel_axis=None, signed=False, sigma=0.0, confine=None, progress=None,
                  cancel: CancelFlag = None) -> Translation:
        """Translate `image` from condition `source` to `target`.

        Returns a `Translation` with the translated image (input units, dtype and layout),
        the difference heatmap and the reconstruction PSNR of the input under its own
        condition; `.inversion` holds the cached inversion for `generate()`.
        """
        return drive(
            self.translate_steps(image, source, target, strength, steps, guidance, seed, channel_axis, signed, sigma,
                                 confine),
            progress,
            cancel,
        )
