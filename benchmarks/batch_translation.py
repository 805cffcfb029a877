"""Batch-aware translation (issue 16): does a model trained with the plates' batch labels change the
condition and keep the plate?

Two pixel models train with `phenotwin train` on the same synthetic plates (`phenotwin synthetic
--batches`: known gain, background, blur, illumination gradient and density per plate, the same
biology on each), with the same steps, size, width and seed: one reads the folder's batches.csv
(a label per condition and plate, the batch hidden in a fraction of steps), the other is trained
with --no-batches. Both translate held-out control cells of the same plates (other cells: other
wells of the same plates, `--start`) to the treated condition at the same settings:

- the batch model told each image's plate (`batch=...`, what `phenotwin translate --batch` does);
- the batch model with the batch unknown (`batch=None`);
- the model without batches.

Judged per translation, on its plate's true counterfactual (the same cells treated, with the same
plate effect, from `make_plates`):
- condition flip rate: a condition classifier (`evaluate.classifier`, trained on every plate)
  calls the translation treated;
- batch kept: a batch classifier (the same network, trained to tell the plates apart) puts the
  translation on its source's plate (its accuracy on real held-out cells is the ceiling);
- counterfactual ratio: MSE(translation, true treated twin) / MSE(input, twin) (1 = no better
  than doing nothing), and heatmap AUROC against the true change mask.

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/batch_translation.py --work /tmp/batch-translation \
        [--train-steps 1500] [-n 40] [--batches 3] [--size 32] [--eval-n 8] [--steps 50] [--strength 1.0 0.6] \
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SEED = 0
HELD_OUT_START = 100_000  # other cells of the same plates (the training plates start at 0)
CLASSIFIER_START = 200_000


def phenotwin(*args: str) -> float:
    """Run `phenotwin ARGS` in this interpreter; returns its wall-clock seconds (stops on failure)."""
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "phenotwin", *args], check=True)
    return time.monotonic() - began


def train_models(args) -> dict[str, float | None]:
    """The two models (kept when already trained at these steps); seconds each took to train."""
    plates = args.work / "plates"
    if not (plates / "batches.csv").is_file():
        phenotwin("synthetic", "--out", str(plates), "-n", str(args.n), "--batches", str(args.batches),
                  "--size", str(args.size), "--seed", str(SEED))
    seconds = {}
    for name, extra in (("batches", []), ("no-batches", ["--no-batches"])):
        out = args.work / f"model-{name}"
        info = out / "phenotwin.json"
        if info.is_file() and json.loads(info.read_text())["provenance"]["steps"] == args.train_steps:
            seconds[name] = None
            continue
        seconds[name] = phenotwin("train", "--data", str(plates), "--out", str(out), "--size", str(args.size),
                                  "--steps", str(args.train_steps), "--checkpoint-every", str(args.train_steps),
                                  "--seed", str(SEED), "--no-calibrate", "--overwrite", *extra)
    return seconds


def model_range(images: np.ndarray, normalization: dict) -> np.ndarray:
    """Camera units -> the model's [-1, 1] (its fixed training normalisation), as a translation sees them."""
    from phenotwin.preprocessing import normalise

    return normalise(images, np.asarray(normalization["low"]), np.asarray(normalization["high"]))


def run(args) -> dict:
    import torch

    from phenotwin import Translator
    from phenotwin.evaluate.classifier import train_classifier
    from phenotwin.evaluate.metrics import auroc, counterfactual_ratio, smooth
    from phenotwin.synthetic import as_camera_units
    from phenotwin.synthetic.batches import make_plates

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    train_seconds = train_models(args)
    models = {name: Translator(args.work / f"model-{name}", device="cpu") for name in ("batches", "no-batches")}
    plate_names = models["batches"].batches
    normalization = models["batches"].info.normalization

    def camera(plates):
        return [(as_camera_units(p.control).astype(np.float32), as_camera_units(p.treated).astype(np.float32))
                for p in plates.pairs]

    # Judges: trained on other cells of every plate, both conditions.
    judges = make_plates(args.classifier_n, args.batches, size=args.size, seed=SEED, start=CLASSIFIER_START)
    judge_images = camera(judges)
    images = model_range(np.concatenate([im for pair in judge_images for im in pair]), normalization)
    conditions = np.concatenate([[c] * args.classifier_n for _ in judge_images for c in (0, 1)])
    batches = np.concatenate([[plate_names.index(e.batch)] * 2 * args.classifier_n for e in judges.effects])
    classes = models["batches"].classes
    condition_judge = train_classifier(images, conditions, classes)
    batch_judge = train_classifier(images, batches, plate_names)

    held = make_plates(args.eval_n, args.batches, size=args.size, seed=SEED, start=HELD_OUT_START)
    held_images = camera(held)
    sources = np.concatenate([control for control, _ in held_images])
    twins = np.concatenate([treated for _, treated in held_images])
    masks = np.concatenate([p.change_mask for p in held.pairs])
    source_batch = np.concatenate([[plate_names.index(e.batch)] * args.eval_n for e in held.effects])
    real_batch_accuracy = float((batch_judge.predict(model_range(sources, normalization)) == source_batch).mean())

    variants = (("batch given", "batches", True), ("batch unknown", "batches", False),
                ("no batch labels", "no-batches", False))
    rows = []
    for strength in args.strength:
        for label, model_name, told in variants:
            translator = models[model_name]
            translated, heatmaps, ratios, psnrs = [], [], [], []
            began = time.monotonic()
            for image, twin, b in zip(sources, twins, source_batch):
                result = translator.translate(image, classes[0], classes[1], strength=strength, steps=args.steps,
                                              guidance=0.0, confine=False, channel_axis=0,
                                              batch=plate_names[b] if told else None)
                translated.append(model_range(result.image[None], normalization)[0])
                heatmaps.append(result.heatmap)
                ratios.append(counterfactual_ratio(result.image, image, twin))
                psnrs.append(result.reconstruction_psnr)
            translated = np.stack(translated)
            heatmaps = np.stack(heatmaps)
            rows.append({
                "strength": strength, "variant": label, "model": model_name, "images": len(sources),
                "flip_rate": float((condition_judge.predict(translated) == 1).mean()),
                "batch_kept": float((batch_judge.predict(translated) == source_batch).mean()),
                "counterfactual_ratio": float(np.median(ratios)),
                "auroc": auroc(heatmaps, masks), "auroc_sigma2": auroc(smooth(heatmaps, 2.0), masks),
                "reconstruction_psnr": float(np.mean(psnrs)), "seconds": time.monotonic() - began,
            })
            print(format_row(rows[-1]), flush=True)
    return {"rows": rows, "train_seconds": train_seconds, "plates": plate_names, "steps": args.steps,
            "train_steps": args.train_steps, "n_per_plate": args.n, "eval_n_per_plate": args.eval_n,
            "classifier": {"condition_held_out_accuracy": condition_judge.held_out_accuracy,
                           "batch_held_out_accuracy": batch_judge.held_out_accuracy,
                           "batch_accuracy_on_the_sources": real_batch_accuracy,
                           "batch_chance": 1 / len(plate_names)}}


HEADER = ("| strength | model | flip rate | batch kept | counterfactual ratio (median) | AUROC | AUROC σ2 | "
          "reconstruction dB |\n|---:|---|---:|---:|---:|---:|---:|---:|")


def format_row(row: dict) -> str:
    return (f"| {row['strength']:g} | {row['variant']} | {row['flip_rate']:.2f} | {row['batch_kept']:.2f} "
            f"| {row['counterfactual_ratio']:.3f} | {row['auroc']:.3f} | {row['auroc_sigma2']:.3f} "
            f"| {row['reconstruction_psnr']:.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the plates and the two models")
    parser.add_argument("-n", type=int, default=40, help="training pairs per plate (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=3, help="plates (default: %(default)s)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--classifier-n", type=int, default=100, help="judges' cells per plate and condition")
    parser.add_argument("--eval-n", type=int, default=8, help="held-out control cells per plate")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strength", type=float, nargs="+", default=[1.0, 0.6])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    print(HEADER, flush=True)
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
