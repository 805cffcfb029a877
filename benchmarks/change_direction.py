"""What limits the counterfactual ratio of a model: the size of its change, where it falls, or its direction.

The ratio is MSE(translation, true counterfactual) / MSE(input, true counterfactual) over aligned
synthetic pairs (`phenotwin synthetic`). Write d for the model's change (translation - input) and t
for the true one. A gain g on the change gives a ratio of |g d - t|^2 / |t|^2, smallest at
g = <d, t> / |d|^2, where it is 1 - cos^2(d, t): no calibration of the change's size (strength,
guidance, a gain) can go below that. The change kept only inside the true change mask (an oracle
edit mask) gives the best any mask could do. Both, per direction, at the model's defaults:

    python benchmarks/change_direction.py --model MODEL --data HELD_OUT -n 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def direction_figures(translations, sources, truths, masks) -> dict:
    """The ratio, the cosine of the change with the true one, the best ratio any gain gives, and the
    ratio with the change kept inside the true change mask only; arrays (N, C, H, W), masks (N, H, W)."""
    import numpy as np

    from phenotwin.evaluate.metrics import counterfactual_ratio

    change, true_change = (translations - sources).ravel(), (truths - sources).ravel()
    cosine = float(change @ true_change / (np.linalg.norm(change) * np.linalg.norm(true_change)))
    inside = np.broadcast_to(masks[:, None], translations.shape)
    oracle = sources + np.where(inside, translations - sources, 0.0)
    return {"counterfactual_ratio": counterfactual_ratio(translations, sources, truths),
            "cosine_with_true_change": cosine, "best_gain": float(change @ true_change / (change @ change)),
            "ratio_at_best_gain": 1.0 - cosine**2,
            "change_size": float(np.linalg.norm(change) / np.linalg.norm(true_change)),
            "share_of_change_inside_true_mask": float(np.sum(np.where(inside, translations - sources, 0.0) ** 2)
                                                      / np.sum((translations - sources) ** 2)),
            "ratio_inside_true_mask_only": counterfactual_ratio(oracle, sources, truths)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="aligned held-out pairs, DIR/<condition>/*")
    parser.add_argument("-n", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from phenotwin import Translator
    from phenotwin.evaluate.translation import load_eval_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    translator = Translator(args.model)
    data = load_eval_folder(args.data, translator.image_size, translator.channels, args.n)
    if not data.aligned:
        sys.exit("--data must hold aligned synthetic pairs (phenotwin synthetic): the true change is needed.")
    out = {"model": str(args.model), "data": str(args.data), "settings": translator.defaults.to_dict(),
           "directions": {}}
    for source in translator.classes:
        for target in translator.classes:
            if source == target:
                continue
            images = data.images[source][:args.n]
            translated = np.stack([translator.translate(image, source, target, channel_axis=0).normalised
                                   for image in images])
            figures = direction_figures(translated, translator.processor.to_model_range(images),
                                        translator.processor.to_model_range(data.images[target][:len(images)]),
                                        data.masks[:len(images)])
            out["directions"][f"{source}->{target}"] = figures
            print(f"{source} -> {target}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
