"""Which lever raises reconstruction PSNR most per model call? Issue 18's reconstruction study.

For each held-out image, each step count and each number of fixed-point refinements, the
image is inverted under its own condition and regenerated (guidance 0, no edit mask) at each
strength; the reconstruction PSNR is the one every result reports and the trust verdict
ranks. Model calls per image: the inversion's steps x (1 + refinements) plus the
generation's steps (the reconstruction rides in the batch of the target's generation).

    python benchmarks/reconstruction_levers.py [--checkpoint DIR] [--data DIR] [-n 6]
        [--steps 50 100 200] [--refinements 0 1 2] [--strengths 0.5 1.0] [--exact [STEPS ...]] [--garbage] [--json out.json]

`--exact` adds an exact inversion (BDIA-DDIM, Zhang et al. 2023: a leapfrog of DDIM moves that can
be run backwards exactly, the same model calls as DDIM) at full strength, on the held-out images
and on inputs the model was never made for (noise, a flat image, scikit-image's `cell()`): the
question is not only how high the PSNR goes, but whether the reconstruction still tells a good
input from garbage, since it is the trust signal every result reports.

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
    from phenotwin.synthetic import make_pairs

    if data is not None:
        images = load_eval_folder(data, translator.image_size, translator.channels, n).images
        return {c: list(v[:n]) for c, v in images.items()}
    pairs = from_pairs(make_pairs(n, size=translator.image_size, channels=translator.channels, seed=0, start=500_000))
    return {c: list(v[:n]) for c, v in pairs.images.items()}  # `from_pairs` gives camera units already


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


def _ddim_move(scheduler, output, sample, t_from: int, t_to: int | None):
    """DDIM from level t_from to t_to (None: the clean image) with the model's output at t_from."""
    alphas = scheduler.alphas_cumprod.to(sample.device, sample.dtype)
    a_from = alphas[t_from]
    a_to = alphas.new_tensor(1.0) if t_to is None else alphas[t_to]
    if scheduler.config.prediction_type == "v_prediction":
        x0 = a_from.sqrt() * sample - (1 - a_from).sqrt() * output
        eps = a_from.sqrt() * output + (1 - a_from).sqrt() * sample
    else:
        eps = output
        x0 = (sample - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def bdia_reconstruction(translator, image, source: str, steps: int) -> float:
    """Reconstruction PSNR of an exact (BDIA, gamma = 1) inversion and regeneration under `source`, full depth.

    Written here, not in the pipeline, to measure the lever: z_(i+1) = z_(i-1) + D(z_i: t_i -> t_(i+1))
    - D(z_i: t_i -> t_(i-1)) inverts the leapfrog z_(i-1) = z_(i+1) - D(..-> t_(i+1)) + D(..-> t_(i-1))
    exactly; only the first inversion step (a plain inverse DDIM step) is approximate."""
    import torch

    from phenotwin.pipeline.heatmap import psnr

    diffusion = translator.diffusion
    _, sampler = diffusion.schedulers(steps)
    levels = [int(t) for t in sampler.timesteps.flip(0)]  # rising: level of state 1 .. state `steps`
    label = diffusion.labels([translator.classes.index(source)])
    prepared = translator.processor.preprocess(image, 0)
    clean, _ = diffusion.encode(prepared.model_input)

    def level(i):  # state i's noise level; state 0 is the clean image
        return None if i == 0 else levels[i - 1]

    def model(z, i):
        with torch.inference_mode():
            return diffusion.denoiser.predict(z, level(i), label)

    def move(z, out, i, j):
        return _ddim_move(sampler, out, z, level(i), level(j))

    inverse, _ = diffusion.schedulers(steps)
    states = [clean, diffusion.step(inverse, clean, inverse.timesteps[0], label)]  # the pipeline's first step
    for i in range(1, steps):
        out = model(states[i], i)
        states.append(states[i - 1] + move(states[i], out, i, i + 1) - move(states[i], out, i, i - 1))
    z_next, z = states[steps], states[steps - 1]  # generation runs the leapfrog back down from the top pair
    for i in range(steps - 1, 0, -1):
        out = model(z, i)
        z_next, z = z, z_next - move(z, out, i, i + 1) + move(z, out, i, i - 1)
    reconstruction = diffusion.decode(z)[0]
    return float(psnr(prepared.model_input, reconstruction))


def garbage_inputs(translator) -> dict:
    """Inputs of the model's shape and intensity range that are not its cells: a good trust signal
    reconstructs them worse than its held-out cells (a flat field is easy for any inversion)."""
    import numpy as np
    from skimage import data as skdata
    from skimage.transform import resize

    size, channels = translator.image_size, translator.channels
    rng = np.random.default_rng(0)
    low, high = (np.asarray(translator.info.normalization[k], float) for k in ("low", "high"))
    span = (high - low)[:, None, None]
    cell = resize(skdata.cell().astype(float) / 255, (size, size), anti_aliasing=True)
    return {
        "noise": low[:, None, None] + span * rng.random((channels, size, size)),
        "flat": low[:, None, None] + 0.5 * span * np.ones((channels, size, size)),
        "skimage cell()": low[:, None, None] + span * np.stack([cell] * channels),
    }


def exact_inversion(translator, images, steps_list) -> list[dict]:
    """BDIA against DDIM at full strength, on held-out images and on garbage of the model's shape."""
    import numpy as np

    source = translator.classes[0]
    rows = []
    for steps in steps_list:
        for name, inputs in [("held-out", [im for batch in images.values() for im in batch])] + [
                (key, [value]) for key, value in garbage_inputs(translator).items()]:
            ddim = [float(translator.translate(im, source, translator.classes[1], strength=1.0, steps=steps,
                                               guidance=0.0, confine=False, channel_axis=0).reconstruction_psnr)
                    for im in inputs]
            exact = [bdia_reconstruction(translator, im, source, steps) for im in inputs]
            rows.append({"steps": steps, "input": name, "images": len(inputs), "ddim_psnr_mean": float(np.mean(ddim)),
                         "ddim_psnr_min": float(np.min(ddim)), "exact_psnr_mean": float(np.mean(exact)),
                         "exact_psnr_min": float(np.min(exact))})
            print(f"steps {steps} {name}: DDIM {np.mean(ddim):.1f} dB, exact (BDIA) {np.mean(exact):.1f} dB",
                  flush=True)
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
    parser.add_argument("--exact", type=int, nargs="*", default=None, metavar="STEPS",
                        help="also an exact (BDIA) inversion at these step counts (default 50), on garbage too")
    parser.add_argument("--garbage", action="store_true",
                        help="the same steps and refinements on garbage inputs too: does the trust signal survive?")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from phenotwin.assets import demo_model_path
    from phenotwin.io import write_json

    checkpoint = args.checkpoint or demo_model_path()
    from phenotwin import Translator

    translator = Translator(checkpoint, device="cpu")
    images = held_out(translator, args.data, args.n)
    exact = []
    if args.exact is not None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the garbage inputs do not fit, on purpose
            exact = exact_inversion(translator, images, args.exact or [50])
    rows = measure(checkpoint, images, args.steps, args.refinements, args.strengths)
    print(markdown(rows))
    garbage = {}
    for name, image in (garbage_inputs(translator).items() if args.garbage else ()):
        garbage[name] = measure(checkpoint, {translator.classes[0]: [image]}, args.steps, args.refinements,
                                args.strengths)
        print(f"\n{name}:\n{markdown(garbage[name])}")
    if args.json:
        write_json(args.json, {"checkpoint": str(checkpoint), "rows": rows, "exact": exact, "garbage": garbage})
    return 0


if __name__ == "__main__":
    sys.exit(main())
