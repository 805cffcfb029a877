"""The `phenotwin` command: `demo` and `translate` (training and evaluation add their own)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Sequence

from phenotwin.errors import Cancelled, PhenotwinError, PhenotwinWarning


def _progress_bar(description: str):
    """A tqdm bar fed by `Progress` events; one bar per stage."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(event) -> None:
        bar = bars.get(event.stage)
        if bar is None:
            bar = bars[event.stage] = tqdm(total=event.total, desc=f"{description} {event.stage}", unit="step", leave=False)
        bar.update(event.step - bar.n)
        if event.step >= event.total:
            bar.close()

    return update


def demo_checkpoint() -> tuple[Path | None, str]:
    """The shipped demo model if this install has one."""
    from phenotwin.models import demo_model_path

    path = demo_model_path()
    return (path, "shipped demo model") if path is not None else (None, "none shipped")


def run_demo(out: Path, n: int = 4, steps: int = 50, strength: float = 1.0, device: str = "auto") -> dict:
    """Write synthetic paired cells, their translation and heatmaps to `out`; return a summary."""
    import numpy as np

    from phenotwin import Translator, synthetic
    from phenotwin.io import write_json, write_tiff
    from phenotwin.montage import save_montage

    checkpoint, origin = demo_checkpoint()
    if checkpoint is None:
        from phenotwin.testing import make_tiny_checkpoint

        checkpoint = make_tiny_checkpoint(out / "untrained-model", kind="pixel", channels=2, size=64)
        origin = "UNTRAINED random model (no demo model is installed): translations are meaningless"
        print(f"warning: {origin}", file=sys.stderr)
    translator = Translator(checkpoint, device=device)
    size, channels = translator.image_size, translator.channels
    source, target = translator.classes[:2]
    # Held-out images: the demo model's training set starts at index 0.
    pairs = synthetic.make_pairs(n, size=size, channels=channels, phenotype="obvious", seed=0, start=100_000)
    rows, summary = [], {"checkpoint": translator.checkpoint_id, "model": origin, "images": []}
    for i in range(n):
        result = translator.translate(
            pairs.control[i], source, target, strength=strength, steps=steps, channel_axis=0,
            progress=_progress_bar(f"image {i + 1}/{n}"),
        )
        name = f"cell_{i:02d}"
        meta = result.metadata()
        write_tiff(out / f"{name}_{source}.tif", pairs.control[i], "CYX", {"condition": source, "synthetic": True})
        write_tiff(out / f"{name}_{target}_true.tif", pairs.treated[i], "CYX", {"condition": target, "synthetic": True})
        write_tiff(out / f"{name}_{target}_translated.tif", result.image, "CYX", meta)
        write_tiff(out / f"{name}_heatmap.tif", result.heatmap, "YX", meta)
        write_tiff(out / f"{name}_true_change.tif", pairs.change_mask[i].astype(np.uint8), "YX", {})
        rows.append((pairs.control[i], result.image, pairs.treated[i], result.heatmap, pairs.change_mask[i]))
        summary["images"].append({"name": name, "reconstruction_psnr": result.reconstruction_psnr,
                                  "mean_change": float(result.heatmap.mean())})
    save_montage(
        out / "overview.png", rows, [f"{source} (input)", f"{target} (translated)", f"{target} (true)", "heatmap", "true change"]
    )
    write_json(out / "summary.json", summary)
    return summary


def run_translate(args: argparse.Namespace) -> int:
    from phenotwin import Translator
    from phenotwin.io import read_image, write_tiff

    translator = Translator(args.checkpoint, device=args.device)
    out = Path(args.output)
    failures = 0
    for file in args.input:
        path = Path(file)
        try:
            image = read_image(path)
            result = translator.translate(
                image, args.source, args.target, strength=args.strength, steps=args.steps, guidance=args.guidance,
                seed=args.seed, channel_axis=args.channel_axis, progress=_progress_bar(path.name),
            )
        except PhenotwinError as err:
            print(f"skipped {path}: {err}", file=sys.stderr)
            failures += 1
            continue
        axes = "YX" if result.image.ndim == 2 else ("CYX" if args.channel_axis == 0 else "YXC")
        meta = {**result.metadata(), "input": str(path)}
        write_tiff(out / f"{path.stem}_{result.target}.tif", result.image, axes, meta)
        write_tiff(out / f"{path.stem}_{result.target}_heatmap.tif", result.heatmap, "YX", meta)
        print(f"{path.name}: reconstruction PSNR {result.reconstruction_psnr:.1f} dB, "
              f"mean change {result.heatmap.mean():.4f} -> {out}")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phenotwin",
        description="See the same cells under another experimental condition (diffusion-model translation).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="translate synthetic cells with the demo model and write the results")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for the results (default: %(default)s)")
    demo.add_argument("-n", type=int, default=4, help="how many synthetic cells to translate (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
    demo.add_argument("--strength", type=float, default=1.0, help="inversion strength in (0, 1] (default: %(default)s)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: %(default)s)")

    tr = commands.add_parser("translate", help="translate image files from one condition to another")
    tr.add_argument("--checkpoint", required=True, help="checkpoint folder (contains phenotwin.json)")
    tr.add_argument("--input", required=True, nargs="+", help="image file(s): TIFF or PNG")
    tr.add_argument("--source", required=True, help="the condition the images were acquired in")
    tr.add_argument("--target", required=True, help="the condition to translate to")
    tr.add_argument("--output", required=True, help="output folder")
    tr.add_argument("--strength", type=float, default=None, help="inversion strength in (0, 1] (default: the model's)")
    tr.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    tr.add_argument("--guidance", type=float, default=None, help="classifier-free guidance, 0 = none")
    tr.add_argument("--seed", type=int, default=None, help="recorded with the results for reproducibility")
    tr.add_argument("--channel-axis", type=int, default=None, choices=[0, -1],
                    help="axis holding the channels in multichannel images (0 = first, -1 = last)")
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("always", PhenotwinWarning)
    try:
        if args.command == "demo":
            summary = run_demo(args.out, n=args.n, steps=args.steps, strength=args.strength, device=args.device)
            psnrs = ", ".join(f"{image['reconstruction_psnr']:.1f}" for image in summary["images"])
            print(f"wrote {len(summary['images'])} translations to {args.out} (overview.png); "
                  f"reconstruction PSNR (dB): {psnrs}")
            return 0
        if args.command == "translate":
            return run_translate(args)
    except PhenotwinError as err:
        print(f"phenotwin: error: {err}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("phenotwin: cancelled", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
