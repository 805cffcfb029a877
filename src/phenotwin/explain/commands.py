"""`phenotwin explain`: its parser and runner (cli.py only dispatches here)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path


def add_parser(commands) -> None:
    from phenotwin.explain.vae import VAE_CPU_SECONDS, VAE_STEPS  # numpy only: torch is imported when it trains

    explain = commands.add_parser(
        "explain", help="what changed in each cell, with confidence intervals, and a sparse model and formula",
        description="Measure per-cell features in plain words (shape, intensity, texture, fragments, distance from "
        "the nucleus) in the real images of two conditions and, with --translated, in translations of the source "
        "images; write effect sizes with bootstrap intervals, their agreement, a sparse model, a symbolic formula "
        "and a forest plot into --out. See docs/explain.md.",
    )
    explain.add_argument("--data", type=Path, required=True, help="real images: DIR/<condition>/*.tif")
    explain.add_argument("--out", type=Path, required=True, help="folder for report.md, the CSV tables, explain.json "
                         "and forest.png")
    explain.add_argument("--translated", type=Path, default=None,
                         help="the --output folder of `phenotwin translate` run on source images: each translation "
                         "is compared with its own source cell by cell")
    explain.add_argument("--labels", type=Path, default=None,
                         help="cell labels, one integer TIFF per image with the image's path below --data "
                         "(default: segment here and write them to OUT/labels/ for checking)")
    explain.add_argument("--source", default=None, help="the condition translated from (default: the translations', "
                         "else the first condition folder)")
    explain.add_argument("--target", default=None, help="the condition translated to (default: the other one)")
    explain.add_argument("--channel-names", nargs="+", default=None, metavar="NAME",
                         help="one name per channel, used in the feature names (e.g. nucleus golgi)")
    explain.add_argument("--nucleus-channel", type=int, default=0,
                         help="index of the nuclear stain; -1: none (distances from the cell centre) "
                         "(default: %(default)s)")
    explain.add_argument("-k", type=int, default=5, help="features the sparse model may use (default: %(default)s)")
    explain.add_argument("--no-formula", action="store_true", help="skip the symbolic formula (its search is the "
                         "slowest part)")
    explain.add_argument("--no-cnn", action="store_true", help="skip the image black box (the CNN of phenotwin "
                         "evaluate on the cell crops)")
    explain.add_argument("--no-vae", action="store_true", help="skip the β-VAE of the cell crops and the sparse "
                         "model on its factors (about a minute of CPU at the default budget)")
    explain.add_argument("--vae-steps", type=int, default=None, metavar="STEPS",
                         help=f"the β-VAE's training steps (default: {VAE_STEPS}, about {VAE_CPU_SECONDS} s of CPU "
                         "for any number of cells)")
    explain.add_argument("-n", type=int, default=None, help="at most this many images per condition")
    explain.add_argument("--seed", type=int, default=0)
    explain.add_argument("--overwrite", action="store_true",
                         help="replace the files of an earlier explanation in --out (never anything else)")


def run(args: argparse.Namespace, argv=None) -> int:
    from phenotwin.explain.pipeline import explain_steps
    from phenotwin.explain.report import check_output, write_explanation
    from phenotwin.progress import drive, tqdm_steps

    check_output(args.out, args.overwrite)  # before any work
    started, cpu_started = time.perf_counter(), time.process_time()
    nucleus = None if args.nucleus_channel is not None and args.nucleus_channel < 0 else args.nucleus_channel
    result = drive(explain_steps(args.data, translated=args.translated, labels_dir=args.labels, source=args.source,
                                 target=args.target, channel_names=args.channel_names, nucleus_channel=nucleus,
                                 k=args.k, formula=not args.no_formula, seed=args.seed, max_images=args.n,
                                 cnn=not args.no_cnn, vae=not args.no_vae, vae_steps=args.vae_steps),
                   tqdm_steps("explain"))
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started  # what the work cost, whatever else shares the CPU
    command = "phenotwin " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    report = write_explanation(result, args.out, overwrite=args.overwrite, command=command, seconds=seconds,
                               cpu_seconds=cpu_seconds)
    for effects in (result.paired, result.between):
        if effects:
            print(f"{effects[0].kind}: " + "; ".join(e.text() for e in effects[:3]))
    for model in result.models:
        print(f"{model.name}: held-out accuracy {model.accuracy:.3f} ({model.relative_to_black_box:.2f} of the random "
              f"forest, {model.relative_to_cnn:.2f} of the CNN), {model.n_features} feature(s)")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {report} ({seconds:.0f} s, {cpu_seconds:.0f} s of CPU)")
    return 0
