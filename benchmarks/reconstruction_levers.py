"""Which lever raises reconstruction PSNR most per model call? Issue 18's reconstruction study.

For each held-out image, each step count and each number of fixed-point refinements, the
image is inverted under its own condition and regenerated (guidance 0, no edit mask) at each
strength; the reconstruction PSNR is the one every result reports and the trust verdict
ranks. Model calls per image: the inversion's steps x (1 + refinements) plus the
generation's steps (the reconstruction rides in the batch of the target's generation).

    python benchmarks/reconstruction_levers.py [--checkpoint DIR] [--data DIR] [-n 6]
        [--steps 50 100 200] [--refinements 0 1 2] [--strengths 0.5 1.0] [--json out.json]

Without --data the held-out cells are synthetic pairs of the model's phenotype in camera
units (indices from 500 000, never trained on). With --data (one subfolder per condition),
the first -n images of each condition are used, centre-cropped to the model's size.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path


def held_out(translator, data: Path | None, n: int):
    """{condition: [images]} of held-out images in the model's input units."""
    from phenotwin.evaluate.translation import from_pairs, load_eval_folder
    from phenotwin.synthetic import as_camera_units, make_pairs

    if data is not None:
        images = load_eval_folder(data, translator.image_size, translator.channels, n).images
        return {c: list(v[:n]) for c, v in images.items()}
    pairs = from_pairs(make_pairs(n, size=translator.image_size, channels=translator.channels, seed=0, start=500_000))
    return {c: [as_camera_units(im) for im in v[:n]] for c, v in pairs.images.items()}


def measure(checkpoint, images, steps_list, refinements_list, strengths) -> list[dict]:
    """One row per (steps, refinements, strength): PSNR mean / min over the images, model calls per image."""
    import numpy as np

    from phenotwin import Translator

    rows = []
    for refinements in refinements_list:
        translator = Translator(checkpoint, device="cpu", inversion_refinements=refinements)
        for steps in steps_list:
            psnrs = {s: [] for s in strengths}
            started = time.perf_counter()
            for source, batch in images.items():
                target = next(c for c in translator.classes if c != source)
                for image in batch:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        inversion = translator.invert(image, source, steps, channel_axis=0)
                        for strength in strengths:
                            result = translator.generate(inversion, target, strength=strength, guidance=0.0,
                                                         confine=False, seed=0)
                            psnrs[strength].append(float(result.reconstruction_psnr))
            seconds = (time.perf_counter() - started) / sum(len(b) for b in images.values())
            for strength in strengths:
                used = translator.resolve(steps=steps, strength=strength).used_steps
                values = np.asarray(psnrs[strength])
                rows.append({"steps": steps, "refinements": refinements, "strength": strength,
                             "calls": steps * (1 + refinements) + used, "psnr_mean": float(values.mean()),
                             "psnr_min": float(values.min()), "images": len(values),
                             "seconds_per_image_all_strengths": seconds})
                print(f"steps {steps:4d} refinements {refinements} strength {strength:.2f}: "
                      f"{values.mean():.1f} dB (min {values.min():.1f}) at {rows[-1]['calls']} calls", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| steps | refinements | strength | model calls per image | PSNR mean (min) |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["strength"], r["calls"])):
        lines.append(f"| {r['steps']} | {r['refinements']} | {r['strength']:g} | {r['calls']} | "
                     f"{r['psnr_mean']:.1f} ({r['psnr_min']:.1f}) dB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped demo model")
    parser.add_argument("--data", type=Path, default=None, help="held-out images, one subfolder per condition")
    parser.add_argument("-n", type=int, default=6, help="images per condition (default: %(default)s)")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--refinements", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from phenotwin.assets import demo_model_path
    from phenotwin.io import write_json

    checkpoint = args.checkpoint or demo_model_path()
    from phenotwin import Translator

    images = held_out(Translator(checkpoint, device="cpu"), args.data, args.n)
    rows = measure(checkpoint, images, args.steps, args.refinements, args.strengths)
    print(markdown(rows))
    if args.json:
        write_json(args.json, {"checkpoint": str(checkpoint), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
