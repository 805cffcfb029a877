"""Draw docs/images/hard-cells.png: why the trust verdict ranks against a percentile, not the worst cell.

    .venv/bin/python docs/make_hard_cells.py

Three held-out cells of the shipped demo model (its calibration set, `phenotwin synthetic --start
400000`), translated at its defaults: the hardest of them (its reconstruction moves a nucleus:
fair), a large cell below most (good) and a typical one. Each row: the input, its
reconstruction (the input regenerated under its own condition), the translation, the verdict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "images" / "hard-cells.png"
CELLS = (400012, 400014, 400003)  # two nuclei in one crop; a large cell; a typical cell


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from phenotwin import Translator
    from phenotwin.assets import demo_model_path
    from phenotwin.synthetic import as_camera_units, make_pairs

    torch.set_num_threads(1)
    demo = Translator(demo_model_path(), device="cpu")
    figure, axes = plt.subplots(len(CELLS), 3, figsize=(7.5, 2.6 * len(CELLS)))
    for row, index in zip(axes, CELLS):
        cell = as_camera_units(make_pairs(1, size=64, channels=2, seed=0, start=index).control[0])
        result = demo.translate(cell, "control", "nocodazole", channel_axis=0)
        shown = demo.processor.to_model_range(cell[None])[0]  # all three in the model's range, on one scale
        nucleus = [shown[0], result.reconstruction[0], result.normalised[0]]
        low, high = np.percentile(shown[0], (0.5, 99.5))
        for axis, image, title in zip(row, nucleus, ("input (nucleus)", "reconstruction", "translation")):
            axis.imshow(image, cmap="gray", vmin=low, vmax=high)
            axis.set_title(title, fontsize=9)
            axis.set_axis_off()
        row[0].text(2, 61, f"cell {index}", color="yellow", fontsize=8)
        row[1].text(2, 61, f"{result.reconstruction_psnr:.1f} dB: {result.trust.level}", color="yellow", fontsize=8)
    figure.suptitle("The demo model's hard tail: atypical cells are redrawn, not reproduced", fontsize=10)
    figure.tight_layout()
    figure.savefig(OUT, dpi=90)
    print(OUT)


if __name__ == "__main__":
    main()
