"""What does a model say about images that are not its cells? Issue 18: "a garbage input never reads fair or good".

Each garbage input (crops of scikit-image's `cell()` and `coins()`, uniform noise) is translated
at the model's defaults, once as a 16-bit file (8-bit data times 257) and once with intensity
matching on (`match_intensities`, which maps the image's own percentiles onto the training
range, so the intensities cannot give it away). Printed: the reconstruction PSNR, the input-fit
level and the trust verdict. The held-out table's 5th percentile and median are printed for
scale: the PSNR alone does not always separate garbage from real cells; the input fit is the
first line of defence and the verdict the second.

    python benchmarks/garbage_verdicts.py [--checkpoint DIR ...]     # default: both shipped models
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path


def garbage() -> dict:
    """Garbage of the shipped models' 64 px, as 8-bit-range arrays (one channel, repeated per channel)."""
    import numpy as np
    from skimage import data

    rng = np.random.default_rng(0)
    return {"cell() at (200, 200)": data.cell()[200:264, 200:264], "cell() at (100, 300)": data.cell()[100:164, 300:364],
            "coins()": data.coins()[100:164, 100:164], "uniform noise": rng.integers(0, 256, size=(64, 64))}


def main() -> None:
    import numpy as np
    import torch

    from phenotwin import Translator
    from phenotwin.assets import SUBTLE_MODEL, demo_model_path
    from phenotwin.trust import GOOD_QUANTILE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", nargs="+", default=[str(demo_model_path()), str(SUBTLE_MODEL)])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | input | as 16-bit: PSNR, fit, verdict | intensity-matched: PSNR, fit, verdict |")
    print("|---|---|---|---|")
    for checkpoint in args.checkpoint:
        translator = Translator(checkpoint, device="cpu")
        source, target = translator.classes[:2]
        defaults = translator.resolve(source=source, target=target)
        table = (translator.info.calibration or {}).get("reconstruction_psnr", {}).get(str(defaults.steps), {})
        values = table.get(repr(float(defaults.strength)), [])
        if values:
            print(f"| {Path(checkpoint).name} | held-out cells ({len(values)}) | 5th percentile "
                  f"{np.quantile(values, GOOD_QUANTILE):.1f} dB, median {np.median(values):.1f} dB | |")
        for name, crop in garbage().items():
            cells = []
            image = np.stack([crop] * translator.channels).astype(np.uint16) * 257
            for matched in (False, True):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # garbage does not fit, on purpose
                    result = translator.translate(image, settings=defaults.replace(match_intensities=matched),
                                                  channel_axis=0)
                cells.append(f"{result.reconstruction_psnr:.1f} dB, {result.fit.level}, **{result.trust.level}**")
            print(f"| {Path(checkpoint).name} | {name} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
