"""Does a model really translate? Quality of control -> treated translations on held-out synthetic pairs.

For each held-out pair (never used in training: the training set starts at index 0, these at
100 000) the control image is inverted once and regenerated under the treated condition at
several strengths (reusing the inversion), and we report:
- flip rate: fraction of translations a condition classifier (trained here on other real
  synthetic images, its held-out accuracy reported) calls the target condition;
- heatmap AUROC against the true change mask, pooled over pixels of all images;
- reconstruction PSNR of invert-then-regenerate under the source condition;
- counterfactual ratio: MSE(translation, true treated image) / MSE(control, true treated image).

    python benchmarks/demo_quality.py [--checkpoint DIR] [-n 64] [--steps 50] [--refinements K]
                                      [--guidance W] [--sigma S] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

TARGETS = {"flip_rate": (">=", 0.95), "heatmap_auroc": (">=", 0.95), "reconstruction_psnr": (">=", 36.0),
           "counterfactual_ratio": ("<=", 0.5)}


def smooth(heatmaps: np.ndarray, sigma: float) -> np.ndarray:
    """The heatmap smoothing `generate(sigma=...)` applies, done here so one run reports several."""
    if sigma <= 0:
        return heatmaps
    from skimage.filters import gaussian

    return np.stack([gaussian(h, sigma=sigma, preserve_range=True) for h in heatmaps])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped demo model")
    parser.add_argument("-n", type=int, default=64, help="held-out pairs (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    parser.add_argument("--refinements", type=int, default=None, help="inversion refinements (default: the model's)")
    parser.add_argument("--guidance", type=float, default=0.0)
    parser.add_argument("--sigma", type=float, default=0.0, help="heatmap smoothing (pixels)")
    parser.add_argument("--classifier-images", type=int, default=1500, help="per condition")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from phenotwin import Translator
    from phenotwin.evaluate.classifier import train_classifier
    from phenotwin.evaluate.metrics import auroc, counterfactual_ratio
    from phenotwin.imaging import normalise
    from phenotwin.models import demo_model_path
    from phenotwin.synthetic import as_camera_units as to_raw
    from phenotwin.synthetic import make_pairs

    checkpoint = args.checkpoint or demo_model_path()
    if checkpoint is None:
        print("no checkpoint given and no demo model installed", file=sys.stderr)
        return 2
    translator = Translator(checkpoint, inversion_refinements=args.refinements)
    info = translator.info
    source, target = info.classes
    low, high = np.asarray(info.normalization["low"]), np.asarray(info.normalization["high"])

    def model_range(images):
        return np.stack([normalise(im.astype(np.float64), low, high) for im in to_raw(images)])

    started = time.time()
    reference = make_pairs(args.classifier_images, size=info.image_size, channels=info.channels, seed=0, start=200_000)
    images = np.concatenate([model_range(reference.control), model_range(reference.treated)])
    labels = np.repeat([0, 1], len(reference.control))
    classifier = train_classifier(images, labels, [source, target])
    print(f"classifier held-out accuracy {classifier.held_out_accuracy:.3f} ({time.time() - started:.0f} s)")

    held_out = make_pairs(args.n, size=info.image_size, channels=info.channels, seed=0, start=100_000)
    raw_control = to_raw(held_out.control)
    treated = model_range(held_out.treated)
    per_strength = {s: {"translations": [], "heatmaps": [], "psnr": []} for s in args.strengths}
    started = time.time()
    for i in range(args.n):
        inversion = translator.invert(raw_control[i], source, steps=args.steps, channel_axis=0)
        for s in args.strengths:
            result = translator.generate(inversion, target, strength=s, guidance=args.guidance)
            per_strength[s]["translations"].append(result.normalised)
            per_strength[s]["heatmaps"].append(result.heatmap)
            per_strength[s]["psnr"].append(result.reconstruction_psnr)
        if (i + 1) % 8 == 0:
            print(f"  {i + 1}/{args.n} images, {time.time() - started:.0f} s", flush=True)
    control = model_range(held_out.control)
    rows = []
    for s in args.strengths:
        translations = np.stack(per_strength[s]["translations"])
        heatmaps = np.stack(per_strength[s]["heatmaps"])
        rows.append({
            "strength": s,
            "flip_rate": float((classifier.predict(translations) == 1).mean()),
            "heatmap_auroc": auroc(smooth(heatmaps, args.sigma), held_out.change_mask),
            "heatmap_auroc_by_sigma": {sigma: auroc(smooth(heatmaps, sigma), held_out.change_mask) for sigma in (0, 1, 2)},
            "reconstruction_psnr": float(np.mean(per_strength[s]["psnr"])),
            "counterfactual_ratio": counterfactual_ratio(translations, control, treated),
        })
    report = {
        "checkpoint": translator.checkpoint_id,
        "held_out_pairs": args.n,
        "steps": args.steps,
        "inversion_refinements": translator.inversion_refinements,
        "guidance": args.guidance,
        "heatmap_sigma": args.sigma,
        "classifier_accuracy": classifier.held_out_accuracy,
        "source_flip_rate": float((classifier.predict(control) == 1).mean()),
        "seconds": time.time() - started,
        "by_strength": rows,
        "targets": TARGETS,
    }
    print(f"\n{'strength':>8} {'flip':>6} {'AUROC':>6} {'PSNR dB':>8} {'ratio':>6}")
    for row in rows:
        print(f"{row['strength']:>8.2f} {row['flip_rate']:>6.3f} {row['heatmap_auroc']:>6.3f} "
              f"{row['reconstruction_psnr']:>8.2f} {row['counterfactual_ratio']:>6.3f}")
    print(f"(untranslated controls called '{target}': {report['source_flip_rate']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
