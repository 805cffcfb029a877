"""CDCL against SimCLR on plates neither encoder saw (issue 16): does metadata buy batch robustness?

Both encoders train on the same synthetic training plates (`phenotwin synthetic --batches`) with
the same steps, batch, crop, width and seed (`phenotwin embed train --method cdcl|simclr`); both
are then measured by `phenotwin embed evaluate` on held-out plates drawn with another seed: other
cells and other batch effects (gain, background, blur, illumination, density). Reported per
encoder: kNN condition accuracy, kNN batch accuracy with its chance level, silhouette by condition
and by batch (cosine), on the held-out plates and, for reference, on the training plates.

Everything goes through the `phenotwin` command, so the numbers are those a user gets:

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/embed_heldout.py --work /tmp/embed-heldout \
        [--steps 200] [-n 30] [--size 48] [--train-plates 4] [--heldout-plates 2] [--seeds 0 1 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROWS = (("knn_condition_accuracy", "kNN condition accuracy", "condition_chance"),
        ("knn_batch_accuracy", "kNN batch accuracy", "batch_chance"),
        ("silhouette_condition", "silhouette by condition", None),
        ("silhouette_batch", "silhouette by batch", None))


def phenotwin(*args: str) -> float:
    """Run `phenotwin ARGS` in this interpreter; returns its wall-clock seconds (stops on failure)."""
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "phenotwin", *args], check=True)
    return time.monotonic() - began


def train_and_measure(args, method: str, seed: int, train: Path, heldout: Path) -> dict:
    """Train (unless already trained at these steps) and measure one encoder on the held-out plates."""
    encoder = args.work / f"enc-{method}-seed{seed}"
    info = encoder / "encoder.json"
    seconds = None
    if not info.is_file() or json.loads(info.read_text()).get("steps") != args.steps:
        seconds = phenotwin("embed", "train", "--data", str(train), "--out", str(encoder), "--method", method,
                            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seed", str(seed),
                            "--save-every", str(args.steps), "--overwrite")
    measured = args.work / f"heldout-{method}-seed{seed}.json"
    phenotwin("embed", "evaluate", "--encoder", str(encoder), "--data", str(heldout), "--json", str(measured))
    return {"seed": seed, "heldout": json.loads(measured.read_text()),
            "training": json.loads(info.read_text())["metrics"], "train_seconds": seconds}


def summarise(runs: list[dict]) -> dict:
    """Each metric's mean and (min, max) over the seeds' runs."""
    return {key: (float(np.mean([r[key] for r in runs])), float(np.min([r[key] for r in runs])),
                  float(np.max([r[key] for r in runs]))) for key in runs[0] if isinstance(runs[0][key], float)}


def table(results: dict, where: str) -> list[str]:
    methods = list(results)
    lines = [f"| {where} | " + " | ".join(methods) + " | chance |", "|---" * (len(methods) + 2) + "|"]
    for key, name, chance in ROWS:
        values = " | ".join("{:.3f} ({:.3f}–{:.3f})".format(*results[m][where][key]) for m in methods)
        level = f"{results[methods[0]][where][chance][0]:.3f}" if chance else ""
        lines.append(f"| {name} | {values} | {level} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the plates and the encoders")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("-n", type=int, default=30, help="control/treated pairs per plate")
    parser.add_argument("--size", type=int, default=48, help="image size")
    parser.add_argument("--train-plates", type=int, default=4)
    parser.add_argument("--heldout-plates", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds (each used for both methods); the table gives the mean and the spread")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.work
    train, heldout = work / "plates", work / "plates-heldout"
    if not (train / "batches.csv").is_file():
        phenotwin("synthetic", "--out", str(train), "-n", str(args.n), "--batches", str(args.train_plates),
                  "--size", str(args.size), "--seed", "0")
    if not (heldout / "batches.csv").is_file():  # another seed: other cells and other plate effects
        phenotwin("synthetic", "--out", str(heldout), "-n", str(args.n), "--batches", str(args.heldout_plates),
                  "--size", str(args.size), "--seed", "1", "--start", "100000")
    results = {}
    for method in ("cdcl", "simclr"):
        results[method] = {"runs": [train_and_measure(args, method, seed, train, heldout) for seed in args.seeds]}
        for where in ("heldout", "training"):
            results[method][where] = summarise([run[where] for run in results[method]["runs"]])
    lines = [f"{args.train_plates} training plates, {args.heldout_plates} held-out plates (seed 1: other cells and "
             f"effects), {args.n} pairs a plate, {args.size} px; {args.steps} steps, batch {args.batch_size}, "
             f"seeds {' '.join(map(str, args.seeds))} (mean, and min-max over seeds)", "",
             *table(results, "heldout"), "", *table(results, "training")]
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps({"settings": vars(args) | {"work": str(work), "json": str(args.json)},
                                         "results": results}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
