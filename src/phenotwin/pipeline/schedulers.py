"""Noise schedules at inference: the matched pairs of each solver, and the one map from strength to steps.

Like diffusers' img2img `get_timesteps`, a strength s < 1 runs only the first round(s * steps)
inversion steps and generates back down from there; `inversion_steps` is the only place that
rule is written, so the CLI, napari, evaluation and the caches agree on it, and
`generation_steps` the only place that says how many steps a generation from there takes.

Two solvers (`TranslationSettings.solver`): "ddim" (DDIM and inverse DDIM, the default) and
"dpm++" (DPM-Solver++, second-order multistep: diffusers' `DPMSolverMultistepInverseScheduler`
and `DPMSolverMultistepScheduler`), which reconstructs better at few steps.
"""

from __future__ import annotations

from typing import Any


def inversion_steps(strength: float, steps: int) -> int:
    """How many of `steps` inversion (and generation) steps a strength in (0, 1] uses: at least one."""
    return max(1, round(strength * steps))


SOLVERS = ("ddim", "dpm++")
# DPM-Solver++'s order: its step uses the model output of this step and of the one before.
SOLVER_ORDER = 2
# What a DPM-Solver++ pair takes from a model's scheduler config: the noise schedule and what the
# model predicts. The rest (spacing, final level, thresholding, sigma variants) is set here, so that
# the two grids meet level for level (`dpm_solver_schedulers`) whatever scheduler a model was saved with.
NOISE_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                       "prediction_type", "rescale_betas_zero_snr")


def generation_steps(solver: str, used: int, steps: int) -> int:
    """Generation steps (model calls) from the state after `used` of `steps` inversion steps.

    DDIM's pair mirrors level for level: `used` steps back down. DPM-Solver++'s inverse starts
    from its first noise level rather than from the clean image, so its states sit one level
    above DDIM's and the generation takes one step more, down to the clean image; except from
    the top, where the inverse's last step stays at the top level (`dpm_solver_schedulers`)."""
    return used if solver == "ddim" else min(used + 1, steps)


def inference_schedulers(scheduler_config: dict[str, Any], steps: int):
    """A matched pair (DDIM inverse, DDIM) whose step levels mirror each other exactly.

    Inversion step i moves the sample up to level inverse.timesteps[i]; generation step j
    moves it down from sampler.timesteps[j]; they visit the same levels in reverse order,
    which is what lets generation start from any point of a cached inversion trajectory.
    """
    import torch
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    config = dict(scheduler_config)
    # Clipping x0 breaks the invertibility of DDIM, and 'linspace' has no inverse in diffusers.
    config["clip_sample"] = False
    if config.get("timestep_spacing") not in ("leading", "trailing"):
        config["timestep_spacing"] = "leading"
    sampler = DDIMScheduler.from_config(config)
    inverse = DDIMInverseScheduler.from_config(config)
    sampler.set_timesteps(steps)
    inverse.set_timesteps(steps)
    if len(sampler.timesteps) > steps:
        # diffusers builds "trailing" timesteps with np.arange over a float stride: for some
        # step counts (61, 103, 121, ... of 1000) a rounding error adds a last level at t = -1,
        # which indexes the noisiest alpha and makes one step more than asked. Drop it.
        sampler.timesteps = sampler.timesteps[:steps]
        inverse.timesteps = inverse.timesteps[-steps:]
    if not torch.equal(sampler.timesteps.flip(0), inverse.timesteps):
        raise RuntimeError(
            f"DDIM and inverse DDIM timesteps disagree for {steps} steps "
            f"({sampler.timesteps.tolist()[:3]}... vs {inverse.timesteps.tolist()[-3:]})"
        )
    return inverse, sampler


def dpm_solver_schedulers(scheduler_config: dict[str, Any], steps: int):
    """A matched DPM-Solver++ pair (inverse, sampler), second order, on the model's noise schedule.

    Both use "trailing" spacing, whatever the model's: the inverse's levels t_0 < ... < t_(steps-1)
    are then the sampler's in reverse, and its top level (the one its last step moves to) is the
    sampler's first, so inversion state k (k < steps) lies at the sampler's level steps - 1 - k and
    state `steps` at level 0 (`generation_steps`). "leading" spacing would leave the inverse's top
    level above the sampler's first. diffusers' inverse solver has no zero-terminal-SNR rescaling:
    it gets the sampler's alphas (terminal 2**-24 when rescaled) as its betas.
    """
    import numpy as np
    import torch
    from diffusers import DPMSolverMultistepInverseScheduler, DPMSolverMultistepScheduler

    config = {key: scheduler_config[key] for key in NOISE_SCHEDULE_KEYS if key in scheduler_config}
    config.update(algorithm_type="dpmsolver++", solver_order=SOLVER_ORDER, solver_type="midpoint",
                  timestep_spacing="trailing", final_sigmas_type="zero", lower_order_final=True, euler_at_final=False)
    sampler = DPMSolverMultistepScheduler.from_config(config)
    cumulative = sampler.alphas_cumprod.double()
    betas = 1 - cumulative / torch.cat([cumulative.new_ones(1), cumulative[:-1]])
    inverse = DPMSolverMultistepInverseScheduler.from_config(
        {**config, "rescale_betas_zero_snr": False, "trained_betas": betas.tolist()})
    sampler.set_timesteps(steps)
    inverse.set_timesteps(steps)
    if len(sampler.timesteps) > steps:
        # The same rounding error as DDIM's trailing grid (see `inference_schedulers`): a last level
        # at t = -1 (the first of the inverse's). Drop it, and its sigma, from both.
        sampler.timesteps = sampler.timesteps[:steps]
        sampler.sigmas = torch.cat([sampler.sigmas[:steps], sampler.sigmas[-1:]])
        sampler.num_inference_steps = steps
        inverse.timesteps = inverse.timesteps[-steps:]
        inverse.sigmas = inverse.sigmas[-steps - 1 :]
        inverse.num_inference_steps = steps
    # The levels a generation starts from must be the inversion's (float rounding apart: the
    # inverse's alphas are recomputed from its betas).
    starts = [steps - generation_steps("dpm++", used, steps) for used in range(steps + 1)]
    meet = np.allclose(sampler.sigmas[starts].numpy(), inverse.sigmas.numpy(), rtol=1e-3)
    if not (torch.equal(sampler.timesteps.flip(0), inverse.timesteps) and meet):
        raise RuntimeError(
            f"DPM-Solver++ and its inverse disagree for {steps} steps "
            f"(timesteps {sampler.timesteps.tolist()[:3]}... vs {inverse.timesteps.tolist()[-3:]})"
        )
    return inverse, sampler


def refinement_output(inverse, output, guess, sample, t):
    """The model's output at `guess` (a candidate for the next inversion state, level `t`),
    restated so that `inverse.step(result, t, sample)` moves `sample` with the noise the DDIM
    generation step from `guess` will use.

    Needed because diffusers' inverse step reads a v- or x0-prediction against the sample it
    starts from, while a fixed-point refinement evaluates the model at the state it moves to; read
    so, a refinement of a v-prediction model pulled the reconstruction down (subtle model, 25
    steps at strength 0.5: 27.9 -> 26.5 dB). An epsilon prediction needs nothing. The noise is read
    at `guess`'s own level, as the generation step reads it, and given back in the inverse's own
    parametrisation, so that step is then the exact inverse of the generation step. Hand-written:
    diffusers has no fixed-point inversion.
    """
    kind = inverse.config.prediction_type
    if kind == "epsilon":
        return output
    # The two levels of this inverse step, as DDIMInverseScheduler.step takes them.
    previous_t = t - inverse.config.num_train_timesteps // inverse.num_inference_steps
    start = float(inverse.alphas_cumprod[previous_t] if previous_t >= 0 else inverse.initial_alpha_cumprod)
    level = float(inverse.alphas_cumprod[int(t)])
    if kind == "v_prediction":
        noise = level**0.5 * output + (1 - level) ** 0.5 * guess
        return (noise - (1 - start) ** 0.5 * sample) / start**0.5
    # "sample": the output is the clean image. Restated alike, but its fixed point is reached slowly
    # (+0.3 dB for one iteration on a random tiny model, where v and epsilon gain more than 3).
    noise = (guess - level**0.5 * output) / (1 - level) ** 0.5
    return (sample - (1 - start) ** 0.5 * noise) / start**0.5
