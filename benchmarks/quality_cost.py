"""Quality against cost: the judge metrics of a translation against the UNet calls it makes (issue 17).

Each configuration (sampler and step count, guidance on or off, edit mask on or off) translates
the same held-out images at the model's strength, judged by the code of `phenotwin evaluate
translation` (`phenotwin.evaluate.translation.translation_steps`, the condition classifier
trained once and shared by all configurations): flip rate, heatmap AUROC against the true change
mask (raw and Gaussian sigma 2), counterfactual ratio, reconstruction PSNR. The cost is what one
translation makes with the pipeline's partial inversion (only as deep as the strength needs; the
outputs are bit-identical to a full inversion's, tests/test_partial_inversion.py), counted on
the model for one image (checked against `phenotwin.cost.calls_per_image`), in UNet calls
(a batch counts once) and in image evaluations (guidance doubles each generation call's batch;
the reconstruction rides in it too).

The solver is the pipeline's setting (`TranslationSettings.solver`): "ddim", or "dpm++"
(DPM-Solver++, second order: diffusers' `DPMSolverMultistepInverseScheduler` /
`DPMSolverMultistepScheduler`; the edit mask keeps DDIM's clean-image estimate). Each solver (and
refinement count) gets its own `Translator` of the model, with it as its default, so that the evaluation code
inverts and generates with it.

    python benchmarks/quality_cost.py [--model DIR] [--data DIR [--classifier-data DIR]]
        [--phenotype obvious|subtle|texture] [-n 8] [--configs ddim-10 ddim-50 ...]
        [--json out.json] [--plot docs/images/quality-cost.png]

Without --data the held-out pairs are synthetic (`make_pairs` of --phenotype from index 100 000,
the classifier on other cells from index 200 000), as in benchmarks/demo_quality.py; with --data
DIR/<condition>/* (aligned synthetic files for the mask metrics, see `phenotwin synthetic`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

# name -> (sampler, steps, guidance, confine, inversion refinements, edit-mask sampling); None: the model's
# default. Edit-mask sampling (noise levels, draws per level) replaces the pipeline's CONFINE_LEVELS x CONFINE_DRAWS.
FULL_MASK = None
CONFIGS = {
    "ddim-10": ("ddim", 10, None, None, 0, FULL_MASK),
    "ddim-20": ("ddim", 20, None, None, 0, FULL_MASK),
    "ddim-50": ("ddim", 50, None, None, 0, FULL_MASK),
    "ddim-100": ("ddim", 100, None, None, 0, FULL_MASK),
    "ddim-20-refined": ("ddim", 20, None, None, 1, FULL_MASK),
    "ddim-50-refined": ("ddim", 50, None, None, 1, FULL_MASK),
    "ddim-20-no-guidance": ("ddim", 20, 0.0, None, 0, FULL_MASK),
    "ddim-20-no-mask": ("ddim", 20, None, False, 0, FULL_MASK),
    "ddim-100-no-guidance-no-mask": ("ddim", 100, 0.0, False, 0, FULL_MASK),
    "ddim-100-mask-1x4": ("ddim", 100, None, True, 0, ((0.5,), 4)),
    "ddim-100-mask-3x1": ("ddim", 100, None, True, 0, ((0.3, 0.5, 0.7), 1)),
    "ddim-100-mask-1x1": ("ddim", 100, None, True, 0, ((0.5,), 1)),
    "dpm++-10": ("dpm++", 10, None, None, 0, FULL_MASK),
    "dpm++-10-mask-3x1": ("dpm++", 10, None, True, 0, ((0.3, 0.5, 0.7), 1)),
    "dpm++-8-mask-3x1": ("dpm++", 8, None, True, 0, ((0.3, 0.5, 0.7), 1)),
    "dpm++-6-mask-3x1": ("dpm++", 6, None, True, 0, ((0.3, 0.5, 0.7), 1)),
    "dpm++-20": ("dpm++", 20, None, None, 0, FULL_MASK),
    "dpm++-50": ("dpm++", 50, None, None, 0, FULL_MASK),
    "dpm++-20-no-guidance": ("dpm++", 20, 0.0, None, 0, FULL_MASK),
}
METRICS = ("flip_rate", "auroc", "auroc_sigma2", "counterfactual_ratio", "reconstruction_psnr", "agreement_psnr")
AGREEMENT_IMAGES = 4


def image_evaluations(settings, calls: int, confine_calls: int) -> int:
    """The images one translation of `calls` UNet calls pushes through the UNet: the inversion one a
    step, the edit mask two a call, the generation two (target and reconstruction), twice that with
    guidance."""
    inversion = settings.used_steps * (1 + settings.inversion_refinements)
    masking = confine_calls * settings.confine
    generation = calls - inversion - masking
    return inversion + 2 * masking + 2 * (2 if settings.guidance > 0 else 1) * generation


@contextlib.contextmanager
def mask_sampling(sampling: tuple[tuple[float, ...], int] | None):
    """The edit mask's noise levels from `sampling` (levels, draws per level) for one configuration,
    then the pipeline's again; yields the draws (a setting, `mask_draws`). A study of what fewer
    levels cost in quality: the pipeline has no setting for them (a module constant, chosen on the
    demo), so they are swapped here."""
    import phenotwin.pipeline.edit_mask as edit_mask

    saved = edit_mask.CONFINE_LEVELS
    levels, draws = sampling or (saved, edit_mask.CONFINE_DRAWS)
    try:
        edit_mask.CONFINE_LEVELS = levels
        yield draws
    finally:
        edit_mask.CONFINE_LEVELS = saved


def run(args) -> dict:
    import numpy as np

    import phenotwin.evaluate.translation as evaluation
    from phenotwin import Translator, cost
    from phenotwin.assets import demo_model_path
    from phenotwin.pipeline.heatmap import psnr
    from phenotwin.progress import drive
    from phenotwin.synthetic import make_pairs

    model = args.model or demo_model_path()
    translators = {("ddim", 0): Translator(model, device=args.device, solver="ddim", inversion_refinements=0)}

    def translator_for(solver: str, refinements: int):
        """The model with `solver` and `refinements` as its defaults (the evaluation code uses a model's defaults)."""
        if (solver, refinements) not in translators:
            translators[solver, refinements] = Translator(model, device=args.device, solver=solver,
                                                          inversion_refinements=refinements)
        return translators[solver, refinements]

    translator = translators["ddim", 0]
    size, channels = translator.image_size, translator.channels
    if args.data is not None:
        held_out = evaluation.load_eval_folder(args.data, size, channels, args.n)
        reference = (evaluation.load_eval_folder(args.classifier_data, size, channels, 0)
                     if args.classifier_data is not None else None)
        data_name = str(args.data)
    else:
        held_out = evaluation.from_pairs(make_pairs(args.n, size=size, channels=channels, phenotype=args.phenotype,
                                                    seed=0, start=100_000))
        reference = evaluation.from_pairs(make_pairs(args.classifier_images, size=size, channels=channels,
                                                     phenotype=args.phenotype, seed=0, start=200_000))
        data_name = f"synthetic '{args.phenotype}' pairs from index 100 000"
    source, target = args.source or held_out.classes[0], args.target or held_out.classes[1]

    # One classifier for every configuration: trained once, so the configurations differ only in
    # their translations (translation_steps would train its own each time).
    trained = {}
    train_once = evaluation.condition_classifier

    def shared_classifier(*arguments):
        if "classifier" not in trained:
            trained["classifier"] = train_once(*arguments)
        return trained["classifier"]

    evaluation.condition_classifier = shared_classifier
    cost.time_one_call(translator)
    seconds_per_call = cost.SECONDS_PER_CALL[translator.checkpoint_id]
    rows, shown = [], {}
    try:
        for name in args.configs:
            sampler, steps, guidance, confine, refinements, sampling = CONFIGS[name]
            translator = translator_for(sampler, refinements)
            with mask_sampling(sampling) as draws:
                settings = translator.resolve(source=source, target=target, steps=steps, guidance=guidance,
                                              confine=confine, strength=args.strength,
                                              inversion_refinements=refinements, mask_draws=draws)
                mask_calls = cost.confine_calls(settings.replace(confine=True))
                started = time.perf_counter()
                result = drive(evaluation.translation_steps(
                    translator, held_out, reference, n=args.n, steps=settings.steps, strengths=[settings.strength],
                    source=source, target=target, guidance=settings.guidance, confine=settings.confine, seed=0,
                    mask_draws=settings.mask_draws))
                seconds = time.perf_counter() - started
                (judged,) = result["results"]
                before = translator.denoiser.calls  # what one translation makes (partial inversion)
                first = translator.translate(held_out.images[source][0], settings=settings, channel_axis=0)
                calls = translator.denoiser.calls - before
                shown[name] = [first.normalised] + [
                    translator.translate(image, settings=settings, channel_axis=0).normalised
                    for image in held_out.images[source][1:AGREEMENT_IMAGES]]
                if calls != cost.calls_per_image(settings):
                    raise RuntimeError(f"{name}: {calls} UNet calls counted, {cost.calls_per_image(settings)} planned")
            row = {
                "config": name, "sampler": sampler, "steps": settings.steps, "inversion_refinements": refinements,
                "strength": settings.strength,
                "guidance": settings.guidance, "confine": settings.confine, "unet_calls": calls,
                "image_evaluations": image_evaluations(settings, calls, mask_calls),
                "mask_calls": mask_calls if settings.confine else 0, "mask_sampling": sampling,
                "seconds_estimate": calls * seconds_per_call,
                "flip_rate": judged["flip_rate"], "reconstruction_psnr": judged["reconstruction_psnr"],
                "auroc": judged.get("heatmap_auroc"), "auroc_sigma2": judged.get("heatmap_auroc_by_sigma", {}).get("2"),
                "counterfactual_ratio": judged.get("counterfactual_ratio"), "run_seconds": seconds,
            }
            rows.append(row)
            print(format_row(row), flush=True)
    finally:
        evaluation.condition_classifier = train_once
    # How close each configuration's translations are to those at the model's own defaults (what a
    # cheap preview would have to stand in for), in dB over the first AGREEMENT_IMAGES images.
    defaults = Translator(model, device=args.device).defaults  # the model's own, not the overridden solver's
    own = next((r["config"] for r in rows if r["sampler"] == defaults.solver and r["steps"] == defaults.steps
                and r["guidance"] == defaults.guidance and r["confine"] == defaults.confine
                and r["inversion_refinements"] == defaults.inversion_refinements and r["mask_sampling"] is None), None)
    for row in rows:  # None for the defaults' own row (identical: infinite)
        agreement = None if own is None else float(np.mean([psnr(a, b) for a, b in zip(shown[own], shown[row["config"]])]))
        row["agreement_psnr"] = agreement if agreement is not None and np.isfinite(agreement) else None
    classifier = trained["classifier"][0]
    return {"model": translator.checkpoint_id, "data": data_name, "n": args.n, "source": source, "target": target,
            "classifier_held_out_accuracy": classifier.held_out_accuracy, "seconds_per_call": seconds_per_call,
            "device": translator.device.type, "rows": rows}


def _number(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


HEADER = ("| config | steps | guidance | mask | UNet calls | image evals | flip rate | AUROC | AUROC σ2 "
          "| ratio | PSNR dB | vs defaults dB |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def format_row(row) -> str:
    mask = "off" if not row["confine"] else "on" if not row.get("mask_sampling") else \
        f"{len(row['mask_sampling'][0])} level(s) x {row['mask_sampling'][1]}"
    return (f"| {row['config']} | {row['steps']} | {row['guidance']:g} | {mask} "
            f"| {row['unet_calls']} | {row['image_evaluations']} | {_number(row['flip_rate'], 2)} "
            f"| {_number(row['auroc'], 3)} | {_number(row['auroc_sigma2'], 3)} "
            f"| {_number(row['counterfactual_ratio'], 3)} | {_number(row['reconstruction_psnr'], 1)} "
            f"| {_number(row.get('agreement_psnr'), 1)} |")


def plot(study: dict, path: Path) -> None:
    """Each metric against UNet calls, one marker per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from phenotwin.io import write_atomically

    rows = study["rows"]
    titles = {"flip_rate": "flip rate", "auroc": "heatmap AUROC (raw)", "auroc_sigma2": "heatmap AUROC (σ 2)",
              "counterfactual_ratio": "counterfactual ratio (lower is better)",
              "reconstruction_psnr": "reconstruction PSNR (dB)",
              "agreement_psnr": "PSNR to the defaults' translation (dB)"}
    figure, axes = plt.subplots(2, (len(METRICS) + 1) // 2, figsize=(13, 7.5), constrained_layout=True)
    for axis, metric in zip(axes.flat, METRICS):
        for row in rows:
            if row[metric] is None:
                continue
            marker = "s" if row["sampler"] == "dpm++" else ("o" if row["guidance"] > 0 and row["confine"] else "^")
            axis.scatter(row["unet_calls"], row[metric], marker=marker, color="C1" if row["sampler"] == "dpm++" else "C0")
            axis.annotate(row["config"], (row["unet_calls"], row[metric]), fontsize=6, xytext=(3, 3),
                          textcoords="offset points")
        axis.set_xscale("log")
        axis.set_xlabel("UNet calls per translation")
        axis.set_title(titles[metric], fontsize=9)
    figure.suptitle(f"{study['model']} on {study['data']}, n = {study['n']} ({study['source']} → {study['target']})",
                    fontsize=9)
    write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint folder (default: the shipped demo model)")
    parser.add_argument("--data", type=Path, default=None, help="DIR/<condition>/* held-out images")
    parser.add_argument("--classifier-data", type=Path, default=None, help="other images to train the classifier on")
    parser.add_argument("--phenotype", default="obvious", help="synthetic phenotype without --data")
    parser.add_argument("-n", type=int, default=8, help="held-out images (default: %(default)s)")
    parser.add_argument("--classifier-images", type=int, default=400, help="per condition, synthetic data")
    parser.add_argument("--strength", type=float, default=None, help="default: the model's")
    parser.add_argument("--source", default=None)
    parser.add_argument("--target", default=None)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(HEADER, flush=True)
    study = run(args)
    print("\n" + HEADER + "\n" + "\n".join(format_row(row) for row in study["rows"]))
    print(f"\nclassifier held-out accuracy {study['classifier_held_out_accuracy']:.3f}; "
          f"{study['seconds_per_call'] * 1000:.1f} ms per UNet call on {study['device']}; n = {study['n']}")
    if args.json:
        from phenotwin.io import write_json

        write_json(args.json, study)
    if args.plot:
        plot(study, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
