"""`phenotwin evaluate memorization | translation`: parsers and runners (cli.py only dispatches here)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(commands) -> None:
    """Add `evaluate` with its two subcommands to the `phenotwin` subparsers."""
    evaluate = commands.add_parser("evaluate", help="check a model: memorisation, translation quality (see docs/evaluation.md)")
    checks = evaluate.add_subparsers(dest="check", required=True, metavar="CHECK")

    mem = checks.add_parser(
        "memorization", help="does the model generalise or recall its training images? (Phen-LDiff Fig. 4)",
        description="Compare two models trained on disjoint halves of the same data: give --model-a, --model-b and "
        "--train-data-a, or --data to split it and train both here (small, fast models: --steps, --width).",
    )
    mem.add_argument("--out", type=Path, required=True, help="folder for memorization.png/.json (and trained models)")
    mem.add_argument("--model-a", type=Path, help="model trained on one half")
    mem.add_argument("--model-b", type=Path, help="model trained on the other half")
    mem.add_argument("--train-data-a", type=Path, help="model A's training folder (for the nearest-training search)")
    mem.add_argument("--held-out", type=Path,
                     help="real images model A never saw, the baseline (default with --data: model B's half)")
    mem.add_argument("--data", type=Path, help="instead of models: split this folder in halves and train on each")
    mem.add_argument("--steps", type=int, default=300, help="with --data: training steps per model (default: %(default)s)")
    mem.add_argument("--width", type=int, default=16, help="with --data: UNet width (default: %(default)s)")
    mem.add_argument("--batch-size", type=int, default=16, help="with --data (default: %(default)s)")
    mem.add_argument("--size", type=int, default=None, help="with --data: model image size (default: the images')")
    mem.add_argument("--overwrite", action="store_true", help="with --data: retrain models already in --out")
    mem.add_argument("-n", type=int, default=32, help="images generated per condition and model (default: %(default)s)")
    mem.add_argument("--sample-steps", type=int, default=50, help="DDIM steps per generated image (default: %(default)s)")
    mem.add_argument("--seed", type=int, default=0)
    mem.add_argument("--device", default="auto")

    tr = checks.add_parser(
        "translation", help="flip rate, reconstruction, FID/KID and (synthetic data) ground-truth checks, as a report",
        description="Translate held-out images (not used in training) between the model's conditions and measure the "
        "results. With a `phenotwin synthetic` folder the true counterfactuals and change masks are used too.",
    )
    tr.add_argument("--checkpoint", required=True, help="checkpoint folder")
    tr.add_argument("--data", type=Path, required=True, help="held-out images: DIR/<condition>/*.tif, not the training images")
    tr.add_argument("--out", type=Path, required=True, help="folder for report.md, translation.json and the plots")
    tr.add_argument("--classifier-data", type=Path, default=None,
                    help="images to train the condition classifier on (default: --data)")
    tr.add_argument("-n", type=int, default=16, help="images translated per direction (default: %(default)s)")
    tr.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    tr.add_argument("--strength", type=float, nargs="+", default=None, help="strength(s) (default: the model's)")
    tr.add_argument("--source", default=None, help="only translate from this condition (default: every direction)")
    tr.add_argument("--target", default=None, help="only translate to this condition")
    tr.add_argument("--inception-weights", default=None,
                    help="torch-fidelity's InceptionV3 weights file for FID/KID (never downloaded)")
    tr.add_argument("--features", default=None, metavar="ENCODER_DIR",
                    help="also FID/KID in the features of an encoder of `phenotwin embed train` (offline; "
                    "docs/embedding.md)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    from phenotwin.progress import drive, tqdm_steps

    bar = tqdm_steps("evaluate")
    if args.check == "memorization":
        from phenotwin.evaluate.memorization import check_steps
        from phenotwin.evaluate.report import write_memorization

        result = drive(check_steps(
            args.out, args.model_a, args.model_b, args.train_data_a, args.held_out, args.data, train_steps=args.steps,
            width=args.width, batch_size=args.batch_size, size=args.size, overwrite=args.overwrite, count=args.n,
            seed=args.seed, sample_steps=args.sample_steps, device=args.device), bar)
        files = write_memorization(result, args.out)
        print(f"verdict: {result['verdict']} - {result['reason']}")
        print(f"median similarity A vs B {result['a_vs_b']['median']:.3f}, nearest training image "
              f"{result['nearest_train']['median']:.3f}"
              + (f"; held-out real images to nearest training image {result['held_out_to_train']['median']:.3f}"
                 if result["held_out_to_train"] else ""))
        print(f"wrote {files['plot']} and {files['json']}")
        return 0

    from phenotwin.evaluate.report import translation_verdicts, write_translation_report
    from phenotwin.evaluate.translation import evaluate_folder_steps

    result = drive(evaluate_folder_steps(
        args.checkpoint, args.data, args.classifier_data, n=args.n, steps=args.steps, strengths=args.strength,
        source=args.source, target=args.target, inception_weights=args.inception_weights, seed=args.seed,
        device=args.device, features=args.features), bar)
    files = write_translation_report(result, args.out)
    for line in translation_verdicts(result):
        print(line, file=sys.stderr if line.startswith(("FID/KID skipped", "WARNING")) else sys.stdout)
    if "encoder" in result["fid_kid"]:
        from phenotwin.embed.fid import describe

        print("\n".join(describe(result["fid_kid"]["encoder"])))
    print(f"wrote {files['report']} and {files['json']}")
    return 0
