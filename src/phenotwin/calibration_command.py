"""`phenotwin calibrate`: the command, and a calibration written into its model (phenotwin.json's
defaults and record, the sweep's CSV tables and plot).

Separate from `phenotwin.calibration`, which measures and writes nothing (training calls it too).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from phenotwin.calibration import CONFINES, GUIDANCES, VERDICT_IMAGES, calibrate_steps
from phenotwin.calibration_choice import RECONSTRUCTION_TOLERANCE_DB, SWEPT, describe, flip_bar, second_look_note
from phenotwin.errors import PhenotwinError
from phenotwin.evaluate.classifier import CLASSIFIER_IMAGES
from phenotwin.trust import GOOD_QUANTILE


def apply(checkpoint: str | os.PathLike, record: dict[str, Any], statistics: dict[str, Any] | None) -> Path:
    """Write the calibration into the model: defaults, the record, statistics if it had none; the table and a plot."""
    from dataclasses import replace

    from phenotwin.checkpoint import INFO_FILE, TRAINING_DIR, read_info
    from phenotwin.io import write_csv, write_text
    from phenotwin.trust import measured_with

    folder = Path(checkpoint)
    info = read_info(folder)
    previous = info.calibration or {}
    if not record.get("sweep") and previous.get("sweep"):
        # A verdict-only calibration (--no-sweep) adds step counts to the verdict's table; the
        # sweep that chose the defaults stays, and so do the step counts it measured at the same guidance.
        measured = ("reconstruction_guidance", "reconstruction_solver", "reconstruction_refinements")
        same = (previous.get("reconstruction_guidance", 0.0) == record["reconstruction_guidance"]
                and measured_with(previous) == measured_with(record))
        table = {**(previous.get("reconstruction_psnr", {}) if same else {}), **record["reconstruction_psnr"]}
        stopped = record.get("verdict_images_stopped")  # the table was measured again: the old one no longer holds
        record = {**previous, "reconstruction_psnr": table, **{k: record[k] for k in measured},
                  "verdict_images_per_condition": record["verdict_images_per_condition"]}  # the sweep's count stays
        record.pop("verdict_images_stopped", None)
        if stopped:
            record["verdict_images_stopped"] = stopped
    defaults = {**info.defaults, **record.get("chosen", {})}
    provenance = {**info.provenance, "inference_defaults": (
        f"calibrated by phenotwin calibrate: {record['criterion']}" if "chosen" in record else
        info.provenance.get("inference_defaults"))}
    info = replace(info, defaults=defaults, calibration=record, provenance=provenance,
                   intensity_statistics=info.intensity_statistics or statistics)
    write_text(folder / INFO_FILE, info.to_json())
    if record.get("sweep"):
        rows = record["sweep"]
        table = [_columns(row) for row in rows]
        write_csv(folder / TRAINING_DIR / "calibration.csv", list(table[0]), table)
        if record.get("cost_search"):
            tried = [_columns(row) for row in record["cost_search"]]
            write_csv(folder / TRAINING_DIR / "calibration-cost.csv", list(tried[0]), tried)
        _plot(rows, record.get("chosen"), flip_bar(rows, record.get("classifier_accuracy", 1.0)),
              folder / TRAINING_DIR / "calibration.png")
    return folder / INFO_FILE


def _columns(row: dict[str, Any]) -> dict[str, Any]:
    """A row for the CSV: each per-direction entry its own column ("flip_rate control->treated")."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key.removesuffix('_by_direction')} {d}": v for d, v in value.items()})
        else:
            flat[key] = value
    return flat


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
        pick = next(r for r in rows if all(r[k] == chosen[k] for k in SWEPT))
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
    calibrate.add_argument("--verdict-images", type=int, default=VERDICT_IMAGES, metavar="N",
                           help="images per condition the trust verdict's table at the defaults is measured on, "
                           "when more than -n and --data holds them: the verdict ranks a result against their 5th "
                           "percentile, which a few images place poorly (default: %(default)s)")
    calibrate.add_argument("--steps", type=int, nargs="+", default=None,
                           help="step counts to calibrate the verdict at (default: the model's)")
    calibrate.add_argument("--classifier-data", type=Path, default=None,
                           help="images to train the flip-rate classifier on, DIR/<condition>/*.tif (default: "
                           f"--data; up to {CLASSIFIER_IMAGES} a condition, however small -n is)")
    calibrate.add_argument("--no-sweep", action="store_true",
                           help="only the trust verdict; keep the model's defaults (much faster)")
    calibrate.add_argument("--reconstruction-tolerance", type=float, default=RECONSTRUCTION_TOLERANCE_DB,
                           metavar="DB", help="how much held-out reconstruction (dB) a cheaper solver or step count "
                           "may lose to become the default; more is faster but a weaker trust signal "
                           "(default: %(default)s)")
    calibrate.add_argument("--reconstruction-target", type=float, default=None, metavar="DB",
                           help="reconstruct the held-out images at least this well (e.g. 38), with more steps or "
                                "a fixed-point refinement when the model's own do not (dearer translations); "
                                "default: no target, only cheaper settings are tried")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    from phenotwin import Translator
    from phenotwin.evaluate.translation import load_eval_folder
    from phenotwin.input_fit import training_statistics
    from phenotwin.progress import drive, tqdm_steps

    if not args.reconstruction_tolerance >= 0:
        raise PhenotwinError(f"--reconstruction-tolerance must be 0 dB or more, got {args.reconstruction_tolerance}.")
    if args.reconstruction_target is not None and not 0 < args.reconstruction_target < 100:
        raise PhenotwinError(f"--reconstruction-target is a PSNR in dB, e.g. 38; got {args.reconstruction_target}.")
    if args.reconstruction_target is not None and args.no_sweep:
        raise PhenotwinError("--reconstruction-target needs the sweep (it searches the chosen setting's steps and "
                             "refinements): drop --no-sweep.")
    translator = Translator(args.checkpoint, device=args.device)
    if args.verdict_images < 0:
        raise PhenotwinError(f"--verdict-images is a number of images, 0 or more; got {args.verdict_images}.")
    data = load_eval_folder(args.data, translator.image_size, translator.channels, max(args.n, args.verdict_images))
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
                                   seed=args.seed, classifier=classifier,
                                   reconstruction_tolerance=args.reconstruction_tolerance,
                                   reconstruction_target=args.reconstruction_target,
                                   verdict_images=args.verdict_images), tqdm_steps("calibrate"))
    statistics, normalization = None, translator.info.normalization
    if translator.info.intensity_statistics is None and normalization["mode"] == "fixed":
        images = [im for c in translator.classes for im in data.images[c]]
        statistics = training_statistics(images, np.asarray(normalization["low"], float),
                                         np.asarray(normalization["high"], float))
    written = apply(args.checkpoint, record, statistics)
    if "chosen" in record:
        print(f"defaults: {describe(record['chosen'])} ({record['criterion']})")
        looked = second_look_note(record)
        if looked:
            print(looked)
    elif "not_chosen" in record:
        print(f"warning: {record['not_chosen']}", file=sys.stderr)
    if "reconstruction_target_missed" in record:
        print(f"warning: {record['reconstruction_target_missed']}", file=sys.stderr)
    for steps, by_strength in record["reconstruction_psnr"].items():
        print(f"held-out reconstruction at {steps} steps: " + ", ".join(
            f"strength {float(s):g}: {np.median(v):.1f} dB (5th percentile {np.quantile(v, GOOD_QUANTILE):.1f}, worst "
            f"{min(v):.1f})" for s, v in by_strength.items()))
    print(f"wrote {written}")
    return 0
