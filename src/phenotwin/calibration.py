"""`phenotwin calibrate`: a model's trust verdict and its default settings, measured on its own held-out images.

Settings tuned by hand for one phenotype do not transfer (the demo's strength 0.4 +
guidance 1 + edit mask was three times worse than strength 1.0 alone on a real-texture
phenotype, and the reverse held on the demo), and a fixed dB threshold cannot tell garbage
from a good image. So, on held-out images of the model's own conditions:

1. intensity statistics of the images, when the model has none (the input-fit check);
2. the reconstruction PSNR at each strength of STRENGTHS (and each step count asked for):
   the distribution a result's trust verdict is ranked against (`phenotwin.trust`);
3. a sweep of strength x guidance x edit mask at the model's step count: a condition
   classifier gives the flip rate, the mean heatmap gives the size of the change. The
   criterion: **the gentlest change that flips**, i.e. among the settings whose flip rate is
   at least FLIP_TARGET times the classifier's own held-out accuracy (else the best flip
   rate reached, less FLIP_SLACK), the lowest strength, then the smallest mean change. A
   translation should change what the condition changes and nothing more: on a subtle
   phenotype the gentlest change that flips is also the one that does not overshoot.

The chosen settings become the model's `defaults` in phenotwin.json; the tables go to
`calibration` there and to training/calibration.csv, with a plot.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.evaluate.classifier import CLASSIFIER_EPOCHS, CLASSIFIER_IMAGES
from phenotwin.progress import Progress, Steps, relabel

STRENGTHS = (0.25, 0.5, 0.75, 1.0)
GUIDANCES = (0.0, 1.0)
CONFINES = (False, True)
FLIP_TARGET = 0.9
FLIP_SLACK = 0.05
# Below this held-out accuracy the classifier cannot tell the conditions apart well enough for
# its flip rates to choose anything: every setting "fails to flip" and the smallest change (none)
# would win. The defaults are then kept, and the calibration says why.
MIN_CLASSIFIER_ACCURACY = 0.8
CALIBRATION_VERSION = 1


def flip_bar(rows: list[dict[str, Any]], classifier_accuracy: float) -> float:
    """The flip rate a setting must reach: FLIP_TARGET of what the classifier achieves on real
    images (one right 86% of the time cannot call more translations the target than real targets
    without them overshooting), else the best reached less FLIP_SLACK."""
    target = FLIP_TARGET * min(1.0, classifier_accuracy)
    best_flip = max(row["flip_rate"] for row in rows)
    return target if best_flip >= target else best_flip - FLIP_SLACK


def choose(rows: list[dict[str, Any]], classifier_accuracy: float = 1.0) -> dict[str, Any]:
    """The gentlest setting that flips (see the module docstring): the lowest strength, then the
    smallest mean change. Strength first, as the mean change cannot see a redrawn cell: on the
    subtle phenotype strength 0.75 with the edit mask changed no more on average than 0.5 with
    guidance and mask, yet lay 1.44 times further from the true counterfactual than the input
    did (0.72 at 0.5): somewhere between 0.5 and 0.75 the model starts to redraw the cell instead of changing it."""
    bar = flip_bar(rows, classifier_accuracy)
    flipping = [row for row in rows if row["flip_rate"] >= bar]
    return min(flipping, key=lambda row: (row["strength"], row["mean_change"], -row["flip_rate"]))


def _plan(translator, data, n: int, step_counts: list[int] | None, sweep: bool):
    """What a calibration runs: (step counts, strengths, sweep grid, directions, images per source)."""
    base = translator.defaults
    step_counts = sorted(set(step_counts or [base.steps]) | {base.steps})
    rungs = sorted(set(STRENGTHS) | {base.strength})
    grid = [(s, g, c) for s in rungs for g in GUIDANCES for c in CONFINES] if sweep else []
    directions = [(src, tgt) for src in translator.classes for tgt in translator.classes if src != tgt]
    per_direction = max(1, n // (len(translator.classes) - 1))  # each condition is the source of n translations
    counts = {src: min(per_direction, len(data.images[src])) for src, _ in directions}
    return step_counts, rungs, grid, directions, counts


def _guidances(base_guidance: float, swept: bool) -> list[float]:
    """The guidances generated at: the sweep's, plus the model's own (its verdict table needs it)."""
    return sorted({*GUIDANCES, base_guidance}) if swept else [base_guidance]


def unet_calls(translator, data, n: int = 8, step_counts: list[int] | None = None, sweep: bool = True) -> int:
    """How many UNet calls `calibrate_steps` makes with these arguments: what a time budget plans with."""
    from phenotwin.pipeline.edit_mask import CONFINE_CALLS

    step_counts, rungs, _, directions, counts = _plan(translator, data, n, step_counts, sweep)
    base = translator.defaults.steps

    def cost(steps: int, swept: bool) -> int:
        generations = sum(translator.resolve(steps=steps, strength=s).used_steps for s in rungs)
        return steps + generations * len(_guidances(translator.defaults.guidance, swept)) + CONFINE_CALLS * swept

    return sum(counts[src] * cost(steps, sweep and steps == base) for src, _ in directions for steps in step_counts)


def calibrate_steps(translator, data, n: int = 8, step_counts: list[int] | None = None, sweep: bool = True,
                    seed: int = 0, classifier_epochs: int = CLASSIFIER_EPOCHS, classifier=None) -> Steps[dict[str, Any]]:
    """Measure (see the module docstring) on `data`, an `evaluate.translation.EvalSet`; returns the
    `calibration` record with the chosen `defaults`. Writes nothing. `classifier` (a trained
    `evaluate.classifier.ConditionClassifier`) replaces the one trained on `data`, e.g. one trained
    on the training images when only a few are held out."""
    from phenotwin.evaluate.metrics import auroc, counterfactual_ratio, smooth
    from phenotwin.evaluate.translation import condition_classifier, require_conditions
    from phenotwin.pipeline.edit_mask import CONFINE_CALLS

    require_conditions(translator, data)
    if n < 2:
        raise PhenotwinError(f"calibration needs at least 2 images per condition (-n), got {n}.")
    base = translator.defaults
    step_counts, rungs, grid, directions, counts = _plan(translator, data, n, step_counts, sweep)

    if sweep and classifier is None:
        yield Progress("classifier", 0, 1)
        classifier, _ = condition_classifier(translator, data, seed, classifier_epochs)
        yield Progress("classifier", 1, 1)

    total = unet_calls(translator, data, n, step_counts, sweep)
    done, psnrs, outcomes = 0, {}, {key: [] for key in grid}
    for steps in step_counts:
        swept = sweep and steps == base.steps
        for src, tgt in directions:
            for i in range(counts[src]):
                image = data.images[src][i]
                inversion = yield from relabel(translator.invert_steps(image, src, steps, channel_axis=0),
                                               "calibrate", done, total)
                done += steps
                if swept:
                    yield from relabel(translator.edit_mask_steps(inversion, tgt), "calibrate", done, total)
                    done += CONFINE_CALLS
                for guidance in _guidances(base.guidance, swept):
                    for strength in rungs:
                        rung = translator.resolve(source=src, target=tgt, steps=steps, strength=strength,
                                                  guidance=guidance, seed=seed, confine=False)
                        for confine in CONFINES if swept else (False,):
                            result = yield from relabel(
                                translator.generate_steps(inversion, settings=rung.replace(confine=confine)),
                                "calibrate", done, total)
                            if not confine:  # the edit mask leaves the reconstruction as it is
                                psnrs.setdefault(guidance, {}).setdefault(str(steps), {}).setdefault(
                                    repr(strength), []).append(float(result.reconstruction_psnr))
                            if (strength, guidance, confine) in outcomes:
                                outcomes[(strength, guidance, confine)].append((src, tgt, i, result))
                        done += rung.used_steps
    rows = []
    for (strength, guidance, confine), results in outcomes.items():
        translations = np.stack([r.normalised for *_, r in results])
        targets = np.array([translator.classes.index(t) for _, t, _, _ in results])
        row = {"strength": strength, "guidance": guidance, "confine": confine, "images": len(results),
               "flip_rate": float(np.mean(classifier.predict(translations) == targets)),
               "mean_change": float(np.mean([r.heatmap.mean() for *_, r in results])),
               "reconstruction_psnr": float(np.mean([r.reconstruction_psnr for *_, r in results]))}
        if data.aligned:  # synthetic pairs: the true counterfactual and change mask are known
            sources = np.stack([translator.processor.to_model_range(data.images[s][i:i + 1])[0] for s, _, i, _ in results])
            truth = np.stack([translator.processor.to_model_range(data.images[t][i:i + 1])[0] for _, t, i, _ in results])
            masks = np.stack([data.masks[i] for *_, i, _ in results])
            row["counterfactual_ratio"] = counterfactual_ratio(translations, sources, truth)
            row["heatmap_auroc_sigma2"] = auroc(smooth(np.stack([r.heatmap for *_, r in results]), 2), masks)
        rows.append(row)
    record: dict[str, Any] = {
        "version": CALIBRATION_VERSION, "data_fingerprint": data.fingerprint,
        "images_per_condition": {src: counts[src] for src, _ in directions}, "strengths": rungs,
    }
    if rows:
        record.update(sweep=rows, classifier_accuracy=classifier.held_out_accuracy, criterion=(
            f"lowest strength, then smallest mean change, among settings with flip rate >= {FLIP_TARGET} x the "
            f"classifier's held-out accuracy (else the best flip rate - {FLIP_SLACK})"))
        if classifier.held_out_accuracy >= MIN_CLASSIFIER_ACCURACY:
            chosen = choose(rows, classifier.held_out_accuracy)
            record["chosen"] = {k: chosen[k] for k in ("strength", "guidance", "confine")}
        else:
            record["not_chosen"] = (
                f"the model's defaults were kept: the condition classifier tells these held-out images apart only "
                f"{classifier.held_out_accuracy:.0%} of the time (at least {MIN_CLASSIFIER_ACCURACY:.0%} needed), "
                "so its flip rates cannot choose a setting. Calibrate on more held-out images per condition (-n and "
                "more files), or the conditions differ too little in these images to be told apart.")
    # Guidance lowers the reconstruction PSNR (37.1 -> 34.8 dB on the demo at strength 1), so the
    # verdict's table is the one measured at the guidance the model will use by default.
    guidance = record.get("chosen", {}).get("guidance", base.guidance)
    record["reconstruction_guidance"] = guidance
    record["reconstruction_psnr"] = {k: {s: sorted(v) for s, v in by.items()} for k, by in psnrs[guidance].items()}
    return record


def apply(checkpoint: str | os.PathLike, record: dict[str, Any], statistics: dict[str, Any] | None) -> Path:
    """Write the calibration into the model: defaults, the record, statistics if it had none; the table and a plot."""
    from dataclasses import replace

    from phenotwin.checkpoint import INFO_FILE, TRAINING_DIR, read_info
    from phenotwin.io import write_csv, write_text

    folder = Path(checkpoint)
    info = read_info(folder)
    previous = info.calibration or {}
    if not record.get("sweep") and previous.get("sweep"):
        # A verdict-only calibration (--no-sweep) adds step counts to the verdict's table; the
        # sweep that chose the defaults stays, and so do the step counts it measured at the same guidance.
        same = previous.get("reconstruction_guidance", 0.0) == record["reconstruction_guidance"]
        table = {**(previous.get("reconstruction_psnr", {}) if same else {}), **record["reconstruction_psnr"]}
        record = {**previous, "reconstruction_psnr": table, "reconstruction_guidance": record["reconstruction_guidance"]}
    defaults = {**info.defaults, **record.get("chosen", {})}
    provenance = {**info.provenance, "inference_defaults": (
        f"calibrated by phenotwin calibrate: {record['criterion']}" if "chosen" in record else
        info.provenance.get("inference_defaults"))}
    info = replace(info, defaults=defaults, calibration=record, provenance=provenance,
                   intensity_statistics=info.intensity_statistics or statistics)
    write_text(folder / INFO_FILE, info.to_json())
    if record.get("sweep"):
        rows = record["sweep"]
        write_csv(folder / TRAINING_DIR / "calibration.csv", list(rows[0]), rows)
        _plot(rows, record.get("chosen"), flip_bar(rows, record.get("classifier_accuracy", 1.0)),
              folder / TRAINING_DIR / "calibration.png")
    return folder / INFO_FILE


def _plot(rows: list[dict[str, Any]], chosen: dict[str, Any] | None, bar: float, path: Path) -> None:
    """Flip rate against the size of the change, one line per (guidance, confine) over strength."""
    from matplotlib.figure import Figure

    from phenotwin.io import write_png_figure

    figure = Figure(figsize=(5.5, 4), dpi=110)
    axes = figure.add_subplot()
    for guidance in GUIDANCES:
        for confine in CONFINES:
            line = sorted((r for r in rows if r["guidance"] == guidance and r["confine"] == confine),
                          key=lambda r: r["strength"])
            axes.plot([r["mean_change"] for r in line], [r["flip_rate"] for r in line], marker="o",
                      label=f"guidance {guidance:g}{', confined' if confine else ''}")
    if chosen is not None:  # None: the classifier was too weak to choose (`not_chosen`)
        pick = next(r for r in rows if all(r[k] == v for k, v in chosen.items()))
        axes.scatter([pick["mean_change"]], [pick["flip_rate"]], s=160, facecolors="none", edgecolors="black",
                     label=f"chosen: strength {pick['strength']:g}")
    axes.axhline(bar, color="grey", linestyle=":", linewidth=1, label=f"flip rate needed: {bar:.2f}")
    axes.set_xlabel("mean change (heatmap, normalised units)")
    axes.set_ylabel("flip rate (held-out)")
    axes.set_title("Calibration: the gentlest change that flips")
    axes.legend(fontsize=7)
    write_png_figure(path, figure)


def add_parser(commands) -> None:
    calibrate = commands.add_parser(
        "calibrate", help="measure a model on held-out images: its trust verdict and its default settings",
        description="Translate held-out images of every condition (not the training images) at several settings; "
        "store the reconstruction quality the trust verdict is judged against, and the settings with the smallest "
        "change that flips a condition classifier as the model's defaults. See docs/evaluation.md.",
    )
    calibrate.add_argument("checkpoint", type=Path, help="model folder (contains phenotwin.json); updated in place")
    calibrate.add_argument("--data", type=Path, required=True, help="held-out images: DIR/<condition>/*.tif")
    calibrate.add_argument("-n", type=int, default=8, help="images per condition (default: %(default)s)")
    calibrate.add_argument("--steps", type=int, nargs="+", default=None,
                           help="step counts to calibrate the verdict at (default: the model's)")
    calibrate.add_argument("--classifier-data", type=Path, default=None,
                           help="images to train the flip-rate classifier on, DIR/<condition>/*.tif (default: "
                           f"--data; up to {CLASSIFIER_IMAGES} a condition, however small -n is)")
    calibrate.add_argument("--no-sweep", action="store_true",
                           help="only the trust verdict; keep the model's defaults (much faster)")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    from phenotwin import Translator
    from phenotwin.evaluate.translation import load_eval_folder
    from phenotwin.input_fit import training_statistics
    from phenotwin.progress import drive, tqdm_steps

    translator = Translator(args.checkpoint, device=args.device)
    data = load_eval_folder(args.data, translator.image_size, translator.channels, args.n)
    if data.fingerprint and data.fingerprint == (translator.info.provenance or {}).get("data_fingerprint"):
        raise PhenotwinError(f"{args.data} is the model's training data; calibrate on held-out images of the same "
                             "conditions (images the model never saw), or the verdict would flatter it.")
    classifier = None
    if not args.no_sweep:  # more images than the -n translated ones: a classifier of a few cannot judge a flip
        from phenotwin.evaluate.translation import condition_classifier

        examples = load_eval_folder(args.classifier_data or args.data, translator.image_size, translator.channels,
                                    CLASSIFIER_IMAGES)
        classifier, _ = condition_classifier(translator, examples, args.seed)
    record = drive(calibrate_steps(translator, data, n=args.n, step_counts=args.steps, sweep=not args.no_sweep,
                                   seed=args.seed, classifier=classifier), tqdm_steps("calibrate"))
    statistics, normalization = None, translator.info.normalization
    if translator.info.intensity_statistics is None and normalization["mode"] == "fixed":
        images = [im for c in translator.classes for im in data.images[c]]
        statistics = training_statistics(images, np.asarray(normalization["low"], float),
                                         np.asarray(normalization["high"], float))
    written = apply(args.checkpoint, record, statistics)
    if "chosen" in record:
        chosen = record["chosen"]
        print(f"defaults: strength {chosen['strength']:g}, guidance {chosen['guidance']:g}, "
              f"confine {'on' if chosen['confine'] else 'off'} ({record['criterion']})")
    elif "not_chosen" in record:
        print(f"warning: {record['not_chosen']}", file=sys.stderr)
    for steps, by_strength in record["reconstruction_psnr"].items():
        print(f"held-out reconstruction at {steps} steps: " + ", ".join(
            f"strength {float(s):g}: {np.median(v):.1f} dB (worst {min(v):.1f})" for s, v in by_strength.items()))
    print(f"wrote {written}")
    return 0
