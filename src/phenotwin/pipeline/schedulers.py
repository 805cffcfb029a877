"""Noise schedules at inference: the matched DDIM pair, and the one map from strength to steps.

Like diffusers' img2img `get_timesteps`, a strength s < 1 runs only the first round(s * steps)
inversion steps and generates back down from there; `inversion_steps` is the only place that
rule is written, so the CLI, napari, evaluation and the caches agree on it.
"""

from __future__ import annotations

from typing import Any


def inversion_steps(strength: float, steps: int) -> int:
    """How many of `steps` inversion (and generation) steps a strength in (0, 1] uses: at least one."""
    return max(1, round(strength * steps))


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
