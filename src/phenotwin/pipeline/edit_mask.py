"""Where the condition matters for an image: a soft, per-channel DiffEdit edit mask.

DiffEdit's mask (Couairon et al. 2022): the input is noised, the model predicts the clean
image under the source and under the target condition, and the two disagree where the
condition changes something. diffusers' DiffEdit pipeline is bound to text prompts and one
binary mask over SD latents; this one serves pixel and latent models, keeps one mask per
image channel (a channel the condition leaves alone changes little) and stays soft: a
binary mask would tie most pixels of the heatmap at zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from phenotwin.progress import Progress, Steps

if TYPE_CHECKING:
    from phenotwin.pipeline.outputs import Inversion
    from phenotwin.pipeline.trajectory import Diffusion

# The input noised to these levels (fractions of the training timesteps), CONFINE_DRAWS noise
# draws each, the clean images predicted under both conditions compared; their absolute
# difference, summed and smoothed (Gaussian sigma in pixels), weights the change from 0 to 1,
# reaching 1 at CONFINE_RAMP of its maximum.
# Chosen on 16 held-out demo pairs from index 300 000 (docs/training.md, The demo model).
CONFINE_LEVELS = (0.3, 0.5, 0.7)
CONFINE_DRAWS = 4
CONFINE_SMOOTHING = 1.0
CONFINE_RAMP = 0.5
CONFINE_CALLS = len(CONFINE_LEVELS) * CONFINE_DRAWS  # model calls (of two images) per edit mask


def mask_calls(draws: int) -> int:
    """Model calls of an edit mask with `draws` noise draws per level (`TranslationSettings.mask_draws`)."""
    return len(CONFINE_LEVELS) * draws


def mask_calls_left(inversion: Inversion, target_index: int, draws: int) -> int:
    """Model calls `edit_mask_steps` would still make for this mask (0: it is cached)."""
    if target_index == inversion.source_index or (draws >= CONFINE_DRAWS and target_index in inversion.edit_masks):
        return 0
    kept = inversion.mask_terms.get(target_index, {})
    return sum(1 for term in _terms(draws) if term not in kept)


def _terms(draws: int) -> list[int]:
    """The (level, draw) terms of a mask with `draws` draws per level, by their index in the order the
    noise is drawn (level by level, CONFINE_DRAWS each): a rougher mask is the first draws of a fuller one."""
    return [level * CONFINE_DRAWS + draw for level in range(len(CONFINE_LEVELS)) for draw in range(draws)]


def adopt_edit_masks(donor: Inversion, inversion: Inversion) -> None:
    """Give `inversion` the edit masks `donor` made for the same input, source condition and batch, and
    the terms of its rougher masks. A mask depends on the clean image only, never on the inversion's
    solver or steps (see below), so a preview's mask serves the translation that follows it: its
    draws are not made again, and the translation's mask is the one it would have made alone."""
    same = (donor.checkpoint_id == inversion.checkpoint_id and donor.source_index == inversion.source_index
            and donor.batch == inversion.batch and np.array_equal(donor.model_input, inversion.model_input))
    if same:
        for target, mask in donor.edit_masks.items():
            inversion.edit_masks.setdefault(target, mask)
        for target, terms in donor.mask_terms.items():
            if target not in inversion.edit_masks:
                for term, difference in terms.items():
                    inversion.mask_terms.setdefault(target, {}).setdefault(term, difference)


def edit_mask_steps(diffusion: Diffusion, inversion: Inversion, target_index: int,
                    draws: int = CONFINE_DRAWS) -> Steps[np.ndarray]:
    """Weights (C, H, W) in [0, 1]; `mask_calls_left` seeded model calls of two images, a stage of its
    own ("edit mask"). The full mask (CONFINE_DRAWS) is cached on the inversion per target; a rougher
    one (the widget's preview: one draw per level) keeps its terms there instead, so that the full
    mask made later adds only the draws missing and equals, bit for bit, one made at once."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor
    from skimage.filters import gaussian

    full = draws >= CONFINE_DRAWS
    cached = inversion.edit_masks.get(target_index)
    if cached is not None and full:
        return cached
    height, width = inversion.normalised.shape[1:]
    difference = np.zeros(inversion.normalised.shape, np.float32)
    if target_index != inversion.source_index:
        # DDIM's noising and clean-image estimate whatever the inversion's solver: the mask compares
        # single predictions at fixed noise levels and steps no trajectory, so a DPM-Solver++
        # inversion gets the same mask as a DDIM one (and the same calls).
        _, sampler = diffusion.schedulers(inversion.steps)
        clean = inversion.states[0]
        labels = diffusion.labels([target_index, inversion.source_index])
        generator = torch.Generator(device="cpu").manual_seed(0)
        last = int(sampler.config.num_train_timesteps) - 1
        kept = inversion.mask_terms.get(target_index, {})
        wanted = set(_terms(draws))
        missing = len(wanted - set(kept))
        made = 0
        for term in range(max(wanted) + 1):  # every draw in order, so that each term gets its own noise
            noise = randn_tensor(clean.shape, generator=generator, device=torch.device("cpu")).to(diffusion.device)
            if term not in wanted:
                continue
            if term not in kept:
                t = round(CONFINE_LEVELS[term // CONFINE_DRAWS] * last)
                with torch.inference_mode():
                    noisy = sampler.add_noise(clean, noise, torch.tensor([t], device=diffusion.device)).repeat(2, 1, 1, 1)
                    output = diffusion.denoiser.predict(noisy, t, labels)
                    # DDIM's step converts any prediction type to its clean-image estimate.
                    predicted = sampler.step(output, t, noisy).pred_original_sample
                    images = diffusion.denoiser.decode(predicted).cpu().numpy()
                term_difference = np.abs(images[0] - images[1])[:, :height, :width]
                if not full:
                    inversion.mask_terms.setdefault(target_index, {})[term] = term_difference
                made += 1
                yield Progress("edit mask", made, missing)
            else:
                term_difference = kept[term]
            difference += term_difference
        if full:
            inversion.mask_terms.pop(target_index, None)  # the full mask is cached: its terms are not needed
    # A sum, not a mean: only the ratio to its own maximum counts.
    smooth = gaussian(difference, sigma=CONFINE_SMOOTHING, channel_axis=0, preserve_range=True)
    peak = float(smooth.max())
    mask = np.clip(smooth / (CONFINE_RAMP * peak), 0.0, 1.0).astype(np.float32) if peak > 0 else \
        np.zeros_like(smooth, dtype=np.float32)
    if full:
        inversion.edit_masks[target_index] = mask
    return mask
