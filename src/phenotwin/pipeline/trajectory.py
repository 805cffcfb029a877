"""DDIM or DPM-Solver++ one step at a time on one denoiser: inversion, its trajectory, generation, sampling.

The inversion trajectory is what makes scrubbing cheap: a generation at strength s starts
from the state after round(s * steps) inversion steps. An inversion need not go all the way
at once: it is run as deep as the first strength needs, and extended later (in the
background, or on demand by a deeper generation) from its deepest state, with the same
computation, so the states are bit-identical to a full inversion's. On large fields only an
evenly spaced subset of the states is kept (a memory budget) and the deepest one; a state in
between is recomputed exactly from the one below it, with the same computation that made it.

A DDIM inversion state k + 1 depends only on state k. A multistep solver's (DPM-Solver++) step
also needs the model output of the step before (its history), so each state of such an
inversion is stored with that output (`Inversion.history`, counted in the memory budget), and
a step is a pure function of (state, previous output, step index) (`Diffusion.multistep`): the
history is handed to a copy of diffusers' scheduler for that one step, never carried over in
it. Extending, recomputing and a full inversion then make the same states bit for bit, and a
generation starts a fresh history from its start state.

Grad-mode contexts are thread-local state: one held open across a `yield` would leak into
the caller (a GUI callback, another job on the same worker thread). So each model call
gets its own inference_mode block and the generators yield outside them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from phenotwin.pipeline.heatmap import psnr
from phenotwin.pipeline.schedulers import (
    SOLVER_ORDER,
    dpm_solver_schedulers,
    generation_steps,
    inference_schedulers,
    refinement_output,
)
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
    always the clean start (state 0, to recompute from) and the last one (strength 1).
    `state_bytes`: of a state with what it is stored with (`Diffusion.state_bytes`)."""
    count = min(steps + 1, max(2, budget // max(1, state_bytes)))
    return sorted({round(i * steps / (count - 1)) for i in range(count)})


class Diffusion:
    """A denoiser and its noise schedule, stepped by DDIM and inverse DDIM, or by DPM-Solver++ and its inverse."""

    def __init__(self, denoiser: Denoiser, scheduler_config: dict[str, Any]):
        self.denoiser = denoiser
        self.device = denoiser.device
        self.scheduler_config = scheduler_config
        # Added to every condition index: the first label of a batch's row (`in_batch_row`).
        self.label_offset = 0
        self._schedulers: dict[tuple[str, int], tuple[Any, Any]] = {}

    def in_batch_row(self, row: int) -> Diffusion:
        """This diffusion conditioned within batch row `row` (its schedulers shared, not built again)."""
        import copy

        other = copy.copy(self)
        other.label_offset = row * (self.denoiser.info.null_class + 1)
        return other

    def schedulers(self, steps: int, solver: str = "ddim"):
        """(inverse, sampler) of `solver` for `steps` steps, built once. DPM-Solver++'s are templates
        that are never stepped themselves (`multistep` steps a copy)."""
        key = (solver, steps)
        if key not in self._schedulers:
            build = inference_schedulers if solver == "ddim" else dpm_solver_schedulers
            self._schedulers[key] = build(self.scheduler_config, steps)
        return self._schedulers[key]

    @staticmethod
    def state_bytes(sample, solver: str) -> int:
        """Bytes of one inversion state and what is stored with it: a multistep solver's previous model output."""
        return sample.numel() * sample.element_size() * (1 if solver == "ddim" else SOLVER_ORDER)

    def labels(self, indices: list[int]):
        import torch

        return torch.tensor(indices, device=self.device) + self.label_offset

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
        states, history = inversion.states, inversion.history
        sample = states[start]
        keep = set(kept_states(inversion.steps, self.state_bytes(sample, inversion.solver), inversion.trajectory_budget))
        new_states = self.inversion_states(sample, start, stop, inversion.steps, inversion.source_index,
                                           inversion.refinements, inversion.solver, history.get(start))
        for k, (state, output) in enumerate(new_states, start=start + 1):
            states[k] = state
            if output is not None:
                history[k] = output
            inversion.depth = k
            if k - 1 not in keep:
                del states[k - 1]  # the previous deepest state, not one the budget keeps
                history.pop(k - 1, None)
            yield Progress("invert", k - start, stop - start)
        return inversion

    def inversion_states(self, sample, start: int, stop: int, steps: int, source_index: int, refinements: int,
                         solver: str = "ddim", output=None):
        """Inversion states start+1 .. stop of a `steps`-step inversion from state `start`, one at a
        time, each with what the next step needs besides it (None for DDIM; DPM-Solver++: the model
        output of the step that made it, `output` being state `start`'s); the same computation
        whether run first or to recompute a state."""
        inverse, _ = self.schedulers(steps, solver)
        labels = self.labels([source_index])
        if solver != "ddim":  # no refinements: `settings._solver` refuses them
            for k in range(start, stop):
                sample, output = self.multistep(inverse, k, sample, labels, output)
                yield sample, output
            return
        for t in inverse.timesteps[start:stop]:
            previous = sample
            sample = self.step(inverse, previous, t, labels)
            # Fixed-point refinement: re-evaluate the model at the new sample, so this step is
            # the exact inverse of the DDIM step that generation will take (sharper reconstruction).
            for _ in range(refinements):
                sample = self.refine(inverse, previous, t, labels, sample)
            yield sample, None

    def state(self, inversion: Inversion, k: int) -> Steps[torch.Tensor]:
        """Inversion state k: kept, recomputed from the nearest kept state below it, or (deeper than
        the inversion went) reached by extending it."""
        if k > inversion.depth:
            yield from self.extend(inversion, k)
        if k in inversion.states:
            return inversion.states[k]
        start = max(j for j in inversion.states if j < k)
        rebuilt = self.inversion_states(inversion.states[start], start, k, inversion.steps, inversion.source_index,
                                        inversion.refinements, inversion.solver, inversion.history.get(start))
        for i, (sample, _) in enumerate(rebuilt, start=1):
            state = sample  # the last one is state k
            yield Progress("invert", i, k - start)
        return state

    def render(self, inversion: Inversion, target_index: int, used: int, guidance: float, seed: int | None,
               reconstruct: bool) -> Steps[tuple[np.ndarray, np.ndarray | None]]:
        """The inversion's solver from its state `used`: (translation, reconstruction or None), both
        cached on the inversion (which serves one solver, so its cache keys need none); the source
        class rides along in the batch when a reconstruction at this depth is still missing."""
        source_key = (inversion.source_index, used, guidance)
        with_reconstruction = (reconstruct and target_index != inversion.source_index
                               and source_key not in inversion.generated)
        start = yield from self.state(inversion, used)
        images = yield from self.generate(start, [target_index] + [inversion.source_index] * with_reconstruction,
                                          inversion.steps, used, guidance, seed, inversion.solver)
        height, width = inversion.normalised.shape[1:]
        # Drop the padding; copies, so a cached image does not hold the whole batch alive.
        translated = images[0][:, :height, :width].copy()
        inversion.generated.remember((target_index, used, guidance), translated)
        reconstruction = images[1][:, :height, :width].copy() if with_reconstruction else None
        if reconstruction is not None:
            inversion.generated.remember(source_key, reconstruction)
        return translated, reconstruction

    def generate(self, start, label_indices: list[int], steps: int, used_steps: int, guidance: float,
                 seed: int | None, solver: str = "ddim") -> Steps[np.ndarray]:
        """From `start` (the state after `used_steps` of `steps` inversion steps) down to the clean
        image, one image per label; decoded. DDIM: the last `used_steps` of `steps` levels.
        DPM-Solver++: from the sampler's level equal to the state's (`generation_steps`: one step
        more below the top), with a fresh history, so the result depends on `start` alone."""
        import torch

        _, sampler = self.schedulers(steps, solver)
        labels = self.labels(label_indices)
        sample = start.repeat(len(labels), 1, 1, 1)
        if solver != "ddim":
            count = generation_steps(solver, used_steps, steps)
            output = None
            for i, index in enumerate(range(steps - count, steps)):
                sample, output = self.multistep(sampler, index, sample, labels, output, guidance)
                yield Progress("generate", i + 1, count)
            return self.decode(sample)
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
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

    def step(self, scheduler, sample, t, labels, guidance: float = 0.0, generator=None):
        """One DDIM (or inverse DDIM) step from `sample`."""
        import torch

        with torch.inference_mode():
            output = self.denoiser.predict(sample, t, labels, guidance)
            extra = {"generator": generator} if generator is not None else {}
            return scheduler.step(output, int(t), sample, **extra).prev_sample

    def refine(self, inverse, sample, t, labels, guess):
        """One fixed-point iteration of the inverse DDIM step from `sample`: the model evaluated at
        the current `guess` of the next state."""
        import torch

        with torch.inference_mode():
            output = refinement_output(inverse, self.denoiser.predict(guess, t, labels, 0.0), guess, sample, t)
            return inverse.step(output, int(t), sample).prev_sample

    def multistep(self, scheduler, index: int, sample, labels, previous, guidance: float = 0.0):
        """Step `index` of a DPM-Solver++ grid (`scheduler`: inverse or sampler) from `sample`:
        (the next sample, this step's model output as the solver keeps it, its clean-image estimate).

        A pure function of its arguments: `previous` (the output of the step before, None at the
        first step of a run, which is then first order) is handed to a shallow copy of the
        scheduler as its whole history, with the step index; diffusers' arithmetic is unchanged,
        so a run of these steps equals diffusers' own loop, and the template is never changed."""
        import copy

        import torch

        t = scheduler.timesteps[index]
        with torch.inference_mode():
            output = self.denoiser.predict(sample, t, labels, guidance)
            solver = copy.copy(scheduler)
            solver._step_index = index
            solver.model_outputs = [None, previous]  # second order: the history is one output
            solver.lower_order_nums = 0 if previous is None else 1  # second order from the second step on
            following = solver.step(output, t, sample).prev_sample
            return following, solver.model_outputs[-1]

    def decode(self, sample) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.denoiser.decode(sample).clamp(-1, 1).cpu().numpy()
