"""How the calibration judges a setting on held-out images, and its cost search (issue 17): the
chosen setting again with cheaper solvers, step counts and refinements, cheapest first; the first
that keeps its quality becomes the default. With a reconstruction target (issue 18) the search also
tries dearer settings: the same three at the model's steps and at twice them (one fixed-point
refinement and more steps were the levers measured best per call on the real texture,
docs/evaluation.md), and keeps the cheapest that reaches the target.

The quality kept is the trust signal's: on the demo model every cheaper setting flipped and
localised as well and translated within 37-51 dB of the 100-step result (the input plus the
generated change: the reconstruction error cancels), but reconstructed 2.5-11 dB worse, and at
20 DDIM steps garbage inputs reconstructed as well as real cells (docs/evaluation.md).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Step counts tried, as fractions of the model's; the dearer ones only with a reconstruction target.
CHEAPER_STEPS = (0.2, 0.5)
DEARER_STEPS = (1.0, 2.0)


def flips(row: dict[str, Any], bar: float, errors: float = 1.0) -> bool:
    """Whether a setting reaches `bar`, within the sampling noise of its translations: a flip rate
    of n translations is known to about one standard error, sqrt(bar (1 - bar) / n) (0.075 at 16,
    i.e. one cell), and one cell decided the demo's recalibration against the edit mask. Pooled and
    in each direction on its own images: the texture model's textured -> control flipped 0.62
    held-out where the pooled calibration saw 0.875. Rows recorded without the breakdown are
    judged pooled. `errors`: how many standard errors below the bar still count (0: the bar itself)."""
    def reaches(rate: float, n: int) -> bool:
        return rate >= bar - errors * math.sqrt(max(0.0, bar * (1.0 - bar)) / max(1, n))

    counts = row.get("images_by_direction", {})
    return reaches(row["flip_rate"], row["images"]) and all(
        reaches(rate, counts[direction]) for direction, rate in row.get("flip_rate_by_direction", {}).items())


def weakest_flip_rate(row: dict[str, Any]) -> float:
    """The flip rate of a row's weakest direction (the pooled rate in rows without the breakdown)."""
    return min([row["flip_rate"], *row.get("flip_rate_by_direction", {}).values()])


def judge(translator, data, classifier, results) -> dict[str, Any]:
    """A setting's row: flip rate, mean change and reconstruction of its (src, tgt, i, Translation)
    results, and with aligned synthetic pairs the ground-truth counterfactual ratio and AUROC. The
    flip rate also per direction ("control->treated"), with its image count: a pooled rate can
    hide a direction that does not flip (`flips`)."""
    from phenotwin.evaluate.metrics import auroc, counterfactual_ratio, smooth

    translations = np.stack([r.normalised for *_, r in results])
    targets = np.array([translator.classes.index(t) for _, t, _, _ in results])
    hits = classifier.predict(translations) == targets
    row = {"images": len(results), "flip_rate": float(np.mean(hits)),
           "mean_change": float(np.mean([r.heatmap.mean() for *_, r in results])),
           "reconstruction_psnr": float(np.mean([r.reconstruction_psnr for *_, r in results]))}
    # Synthetic pairs: the true counterfactual and change mask are known, for the images the folder
    # was loaded with masks for (`load_eval_folder`'s n).
    known = [k for k, (*_, i, _) in enumerate(results) if data.aligned and i < len(data.masks)]
    if known:
        model_range = translator.processor.to_model_range
        picked = [results[k] for k in known]
        sources = np.stack([model_range(data.images[s][i:i + 1])[0] for s, _, i, _ in picked])
        truth = np.stack([model_range(data.images[t][i:i + 1])[0] for _, t, i, _ in picked])
        masks = np.stack([data.masks[i] for *_, i, _ in picked])
        row["counterfactual_ratio"] = counterfactual_ratio(translations[known], sources, truth)
        row["heatmap_auroc_sigma2"] = auroc(smooth(np.stack([r.heatmap for *_, r in picked]), 2), masks)
    by_direction: dict[str, list[bool]] = {}
    for (src, tgt, _, _), hit in zip(results, hits):
        by_direction.setdefault(f"{src}->{tgt}", []).append(bool(hit))
    row["flip_rate_by_direction"] = {d: float(np.mean(h)) for d, h in by_direction.items()}
    row["images_by_direction"] = {d: len(h) for d, h in by_direction.items()}
    return row


def searched_settings(translator, chosen, reconstruction_target: float | None = None) -> list:
    """The solver, step count and refinements the cost search tries against the model's own for the
    `chosen` setting, cheapest first: DDIM, DDIM with one fixed-point refinement and DPM-Solver++ at
    CHEAPER_STEPS of the model's steps, those that cost fewer model calls a translation. With a
    `reconstruction_target` the same three also at DEARER_STEPS (at most the model's training
    timesteps), which raise the reconstruction (on the real texture +8.7 dB for one refinement at 50
    steps, about +6 dB a doubling)."""
    from phenotwin.cost import calls_per_image

    base = translator.resolve(**chosen)
    fractions = CHEAPER_STEPS + (DEARER_STEPS if reconstruction_target is not None else ())
    ladder = sorted({min(translator.max_steps, max(2, round(f * base.steps))) for f in fractions})
    options = [translator.resolve(**chosen, steps=steps, solver=solver, inversion_refinements=refinements)
               for steps in ladder for solver, refinements in (("ddim", 0), ("ddim", 1), ("dpm++", 0))
               if (steps, solver, refinements) != (base.steps, base.solver, base.inversion_refinements)]
    if reconstruction_target is None:
        options = [o for o in options if calls_per_image(o) < calls_per_image(base)]
    return sorted(options, key=calls_per_image)


def cost_search(translator, data, classifier, directions, counts, chosen, reference, bar, seed, clock,
                 tolerance: float, reconstruction_target: float | None = None, affordable=None):
    """The cheapest of `searched_settings` that keeps the chosen setting's quality: it flips in every
    direction (within the noise, `flips`) and reconstructs within `tolerance` dB of `reference` (the
    chosen setting's row at the model's own solver and steps). Tried cheapest first; stops at the
    first that does, or at the first for which `affordable(settings)` is False (a time budget: the
    dearer ones after it would not fit either). Returns (rows tried, the settings kept or None, the settings
    left untried). Each row also has `agreement_psnr`: how close its translations are to the
    reference's, in dB.

    With a `reconstruction_target` (dB) the bar is the target instead: the cheapest setting, dearer ones
    included, that flips and reconstructs at least that well; the reference itself when it does. When none
    does, the one that flips and reconstructs best (the closest to the target), and the record says so."""
    from phenotwin.cost import calls_per_image, generation_calls, inversion_calls
    from phenotwin.pipeline.edit_mask import adopt_edit_masks, mask_calls_left
    from phenotwin.pipeline.heatmap import psnr

    # The edit mask compares clean-image estimates of the noised input at fixed levels, whatever the
    # solver and step count: each image's mask is the reference's, not computed again per option.
    mask_donors = {(src, i): ref.inversion for src, _, i, ref in reference["results"]}
    base = translator.resolve(**chosen)
    if reconstruction_target is not None and reference["reconstruction_psnr"] >= reconstruction_target:
        options = [o for o in searched_settings(translator, chosen) if calls_per_image(o) < calls_per_image(base)]
    else:
        options = searched_settings(translator, chosen, reconstruction_target)
    tried = []
    for k, option in enumerate(options):
        if affordable is not None and not affordable(option):
            untried = options[k:]
            break
        results = []
        for src, tgt in directions:
            for i in range(counts[src]):
                settings = option.replace(source=src, target=tgt, seed=seed, batch=data.batch_for(translator, src, i))
                inversion = yield from clock.run(translator.invert_steps(
                    data.images[src][i], channel_axis=0, settings=settings, strength=settings.strength),
                    inversion_calls(settings))
                if (src, i) in mask_donors:
                    adopt_edit_masks(mask_donors[(src, i)], inversion)
                left = mask_calls_left(inversion, translator.classes.index(tgt), settings.mask_draws)
                if settings.confine and left:
                    yield from clock.run(translator.edit_mask_steps(inversion, tgt, settings.mask_draws), left)
                result = yield from clock.run(translator.generate_steps(inversion, settings=settings),
                                              generation_calls(settings))
                results.append((src, tgt, i, result))
        row = {"solver": option.solver, "steps": option.steps, "inversion_refinements": option.inversion_refinements,
               "unet_calls": calls_per_image(option), **judge(translator, data, classifier, results)}
        row["agreement_psnr"] = float(np.mean([psnr(ref.normalised, r.normalised)
                                               for (*_, ref), (*_, r) in zip(reference["results"], results)]))
        floor = reference["reconstruction_psnr"] - tolerance
        if reconstruction_target is not None:
            floor = max(floor, reconstruction_target)
        row["kept"] = flips(row, bar) and row["reconstruction_psnr"] >= floor
        tried.append(row)
        if row["kept"]:
            return tried, option, []
    else:
        untried = []
    closest = [(row, option) for row, option in zip(tried, options) if flips(row, bar)
               and row["reconstruction_psnr"] > reference["reconstruction_psnr"]]
    if reconstruction_target is not None and reference["reconstruction_psnr"] < reconstruction_target and closest:
        row, option = max(closest, key=lambda pair: pair[0]["reconstruction_psnr"])
        row["kept"] = True
        return tried, option, untried
    return tried, None, untried
