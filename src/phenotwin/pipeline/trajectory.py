"""DDIM one step at a time on one denoiser: inversion, its trajectory, generation, sampling.

The inversion trajectory is what makes scrubbing cheap: a generation at strength s starts
from the state after round(s * steps) inversion steps. An inversion need not go all the way
at once: it is run as deep as the first strength needs, and extended later (in the
background, or on demand by a deeper generation) from its deepest state, with the same
computation, so the states are bit-identical to a full inversion's. On large fields only an
evenly spaced subset of the states is kept (a memory budget) and the deepest one; a state in
between is recomputed exactly from the one below it, with the same computation that made it.

Grad-mode contexts are thread-local state: one held open across a `yield` would leak into
the caller (a GUI callback, another job on the same worker thread). So each model call
gets its own inference_mode block and the generators yield outside them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from phenotwin.pipeline.heatmap import psnr
from phenotwin.pipeline.schedulers import inference_schedulers
from phenotwin.progress import Progress, Steps

if TYPE_CHECKING:
    import torch

    from phenotwin.modeling.denoiser import Denoiser
    from phenotwin.pipeline.outputs import Inversion

# Bytes of inversion states an `Inversion` keeps (float32, on the model's device). A 64 px
# model keeps all 51 states of a 50-step inversion in 1.6 MB; a 2048² two-channel field
# (32 MiB a state) keeps 8 of them, instead of 1.7 GB for all.
TRAJECTORY_BUDGET = 256 * 2**20


def kept_states(steps: int, state_bytes: int, budget: int = TRAJECTORY_BUDGET) -> list[int]:
    """Which of the `steps + 1` inversion states to keep within `budget` bytes: evenly spread,
    always the clean start (state 0, to recompute from) and the last one (strength 1)."""
    count = min(steps + 1, max(2, budget // max(1, state_bytes)))
    return sorted({round(i * steps / (count - 1)) for i in range(count)})


class Diffusion:
    """A denoiser and its noise schedule, stepped by DDIM and inverse DDIM."""

    def __init__(self, denoiser: Denoiser, scheduler_config: dict[str, Any]):
        self.denoiser = denoiser
        self.device = denoiser.device
        self.scheduler_config = scheduler_config
        self._schedulers: dict[int, tuple[Any, Any]] = {}

    def schedulers(self, steps: int):
        """(inverse, sampler) for `steps` steps, built once."""
        if steps not in self._schedulers:
            self._schedulers[steps] = inference_schedulers(self.scheduler_config, steps)
        return self._schedulers[steps]

    def labels(self, indices: list[int]):
        import torch

        return torch.tensor(indices, device=self.device)

    def encode(self, model_input: np.ndarray) -> tuple[torch.Tensor, float | None]:
        """The clean sample of a model-range image, and how well an autoencoder reproduces it (None without one)."""
        import torch

        den = self.denoiser
        with torch.inference_mode():
            sample = den.encode(torch.from_numpy(model_input)[None].to(self.device))
            if den.vae is None:
                return sample, None
            return sample, psnr(model_input, den.decode(sample)[0].clamp(-1, 1).cpu().numpy())

    def extend(self, inversion: Inversion, depth: int) -> Steps[Inversion]:
        """Invert `inversion` further, from its deepest state to state `depth` (at most its `steps`).

        The first inversion is an extension from state 0; a later one starts where the last
        stopped, so no step is ever computed twice. Each new state replaces the deepest one
        unless the budget keeps that (`kept_states`): at every yield the inversion is whole, so a
        cancelled extension leaves a shallower but valid inversion."""
        start, stop = inversion.depth, min(depth, inversion.steps)
        states = inversion.states
        sample = states[start]
        keep = set(kept_states(inversion.steps, sample.numel() * sample.element_size(), inversion.trajectory_budget))
        new_states = self.inversion_states(sample, start, stop, inversion.steps, inversion.source_index,
                                           inversion.refinements)
        for k, state in enumerate(new_states, start=start + 1):
            states[k] = state
            inversion.depth = k
            if k - 1 not in keep:
                del states[k - 1]  # the previous deepest state, not one the budget keeps
            yield Progress("invert", k - start, stop - start)
        return inversion

    def inversion_states(self, sample, start: int, stop: int, steps: int, source_index: int, refinements: int):
        """Inversion states start+1 .. stop of a `steps`-step inversion from state `start`,
        one at a time; the same computation whether run first or to recompute a state."""
        inverse, _ = self.schedulers(steps)
        labels = self.labels([source_index])
        for t in inverse.timesteps[start:stop]:
            previous = sample
            sample = self.step(inverse, previous, t, labels)
            # Fixed-point refinement: re-evaluate the model at the new sample, so this step is
            # the exact inverse of the DDIM step that generation will take (sharper reconstruction).
            for _ in range(refinements):
                sample = self.step(inverse, previous, t, labels, model_input=sample)
            yield sample

    def state(self, inversion: Inversion, k: int) -> Steps[torch.Tensor]:
        """Inversion state k: kept, recomputed from the nearest kept state below it, or (deeper than
        the inversion went) reached by extending it."""
        if k > inversion.depth:
            yield from self.extend(inversion, k)
        if k in inversion.states:
            return inversion.states[k]
        start = max(j for j in inversion.states if j < k)
        rebuilt = self.inversion_states(inversion.states[start], start, k, inversion.steps, inversion.source_index,
                                        inversion.refinements)
        for i, sample in enumerate(rebuilt, start=1):
            state = sample  # the last one is state k
            yield Progress("invert", i, k - start)
        return state

    def render(self, inversion: Inversion, target_index: int, used: int, guidance: float, seed: int | None,
               reconstruct: bool) -> Steps[tuple[np.ndarray, np.ndarray | None]]:
        """DDIM from the inversion's state `used`: (translation, reconstruction or None), both
        cached on the inversion; the source class rides along in the batch when a reconstruction
        at this depth is still missing."""
        source_key = (inversion.source_index, used, guidance)
        with_reconstruction = (reconstruct and target_index != inversion.source_index
                               and source_key not in inversion.generated)
        start = yield from self.state(inversion, used)
        images = yield from self.generate(start, [target_index] + [inversion.source_index] * with_reconstruction,
                                          inversion.steps, used, guidance, seed)
        height, width = inversion.normalised.shape[1:]
        # Drop the padding; copies, so a cached image does not hold the whole batch alive.
        translated = images[0][:, :height, :width].copy()
        inversion.generated.remember((target_index, used, guidance), translated)
        reconstruction = images[1][:, :height, :width].copy() if with_reconstruction else None
        if reconstruction is not None:
            inversion.generated.remember(source_key, reconstruction)
        return translated, reconstruction

    def generate(self, start, label_indices: list[int], steps: int, used_steps: int, guidance: float,
                 seed: int | None) -> Steps[np.ndarray]:
        """DDIM down the last `used_steps` of `steps` levels from `start`, one image per label; decoded."""
        import torch

        _, sampler = self.schedulers(steps)
        labels = self.labels(label_indices)
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        sample = start.repeat(len(labels), 1, 1, 1)
        for i, t in enumerate(sampler.timesteps[steps - used_steps :]):
            sample = self.step(sampler, sample, t, labels, guidance, generator)
            yield Progress("generate", i + 1, used_steps)
        return self.decode(sample)

    def sample_from_noise(self, target_index: int, count: int, seed: int, steps: int, guidance: float) -> Steps[np.ndarray]:
        """New images of a condition from seeded noise: two models given one seed start from the same noise."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        _, sampler = self.schedulers(steps)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise = randn_tensor((count, *self.denoiser.sample_shape()), generator=generator, device=torch.device("cpu"))
        sample = (noise * sampler.init_noise_sigma).to(self.device)
        labels = self.labels([target_index] * count)
        for i, t in enumerate(sampler.timesteps):
            sample = self.step(sampler, sample, t, labels, guidance)
            yield Progress("sample", i + 1, steps)
        return self.decode(sample)

    def step(self, scheduler, sample, t, labels, guidance: float = 0.0, generator=None, model_input=None):
        """One DDIM (or inverse DDIM) step from `sample`, the model evaluated at `model_input` (default: `sample`)."""
        import torch

        with torch.inference_mode():
            output = self.denoiser.predict(sample if model_input is None else model_input, t, labels, guidance)
            extra = {"generator": generator} if generator is not None else {}
            return scheduler.step(output, int(t), sample, **extra).prev_sample

    def decode(self, sample) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.denoiser.decode(sample).clamp(-1, 1).cpu().numpy()
