"""Does a model really translate? Quality of control -> treated translations on held-out synthetic pairs.

A thin wrapper over `phenotwin.evaluate.translation` (the code behind `phenotwin evaluate
translation`) for the demo model: held-out pairs start at index 100 000 (training used 0-999),
the condition classifier is trained on other cells from index 200 000, and several strengths
reuse one inversion per image. Reports flip rate, heatmap AUROC against the true change mask
(raw and Gaussian-smoothed), reconstruction PSNR/SSIM and the counterfactual ratio, beside
the ratio a perfect model would reach (the true puncta drawn again elsewhere).

    python benchmarks/demo_quality.py [--checkpoint DIR] [-n 64] [--steps 50] [--refinements K]
                                      [--guidance W] [--confine | --no-confine] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

TARGETS = {"flip_rate": (">=", 0.95), "heatmap_auroc": (">=", 0.95), "reconstruction_psnr": (">=", 36.0),
           "counterfactual_ratio": ("<=", 0.5)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped demo model")
    parser.add_argument("-n", type=int, default=64, help="held-out pairs (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    parser.add_argument("--refinements", type=int, default=None, help="inversion refinements (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's")
    parser.add_argument("--confine", action=argparse.BooleanOptionalAction, default=None,
                        help="confine the change to the edit mask (default: the model's)")
    parser.add_argument("--classifier-images", type=int, default=1500, help="per condition")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from phenotwin import Translator
    from phenotwin.assets import demo_model_path
    from phenotwin.evaluate.metrics import counterfactual_ratio
    from phenotwin.evaluate.report import public
    from phenotwin.evaluate.translation import from_pairs, translation_steps
    from phenotwin.io import write_json
    from phenotwin.progress import drive
    from phenotwin.synthetic import make_pairs

    checkpoint = args.checkpoint or demo_model_path()
    if checkpoint is None:
        print("no checkpoint given and no demo model installed", file=sys.stderr)
        return 2
    translator = Translator(checkpoint, inversion_refinements=args.refinements)
    size, channels = translator.image_size, translator.channels
    held_out = from_pairs(make_pairs(args.n, size=size, channels=channels, seed=0, start=100_000))
    reference = from_pairs(make_pairs(args.classifier_images, size=size, channels=channels, seed=0, start=200_000))
    source, target = held_out.classes
    started = time.time()

    def report(event):
        if event.stage == "translate" and event.step % 500 == 0:
            print(f"  {event.step}/{event.total} diffusion steps, {time.time() - started:.0f} s", flush=True)

    result = public(drive(translation_steps(translator, held_out, reference, n=args.n, steps=args.steps,
                                            strengths=args.strengths, source=source, target=target,
                                            guidance=args.guidance, confine=args.confine), report))
    result["seconds"] = time.time() - started
    # The ratio's floor: a perfect model cannot know where the true counterfactual's puncta fell;
    # the same cells with the phenotype drawn again score this against the truth.
    redrawn = from_pairs(make_pairs(args.n, size=size, channels=channels, seed=0, start=100_000, redraw=1))
    result["perfect_model_ratio"] = counterfactual_ratio(*(translator.processor.to_model_range(images) for images in (
        redrawn.images[target], held_out.images[source], held_out.images[target])))
    result["targets"] = TARGETS
    print(f"classifier held-out accuracy {result['classifier']['held_out_accuracy']:.3f}")
    print(f"\n{'strength':>8} {'flip':>6} {'AUROC σ0/1/2':>20} {'PSNR dB':>8} {'SSIM':>6} {'ratio':>6}")
    for row in result["results"]:
        by_sigma = "/".join(f"{v:.3f}" for v in row["heatmap_auroc_by_sigma"].values())
        print(f"{row['strength']:>8.2f} {row['flip_rate']:>6.3f} {by_sigma:>20} {row['reconstruction_psnr']:>8.2f} "
              f"{row['reconstruction_ssim']:>6.3f} {row['counterfactual_ratio']:>6.3f}")
    print(f"(untranslated controls called '{target}': {result['results'][0]['untranslated_called_target']:.3f})")
    print(f"(ratio of a perfect model, the true puncta drawn again elsewhere: {result['perfect_model_ratio']:.3f})")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
