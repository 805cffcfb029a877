"""The `phenotwin` command: `demo`, `synthetic`, `train`, `translate`, `evaluate` and `calibrate`."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from phenotwin.errors import Cancelled, PhenotwinError, PhenotwinWarning
from phenotwin.pipeline.schedulers import SOLVERS


def demo_checkpoint() -> tuple[Path | None, str]:
    """The shipped demo model if this install has one."""
    from phenotwin.assets import demo_model_path

    path = demo_model_path()
    return (path, "shipped demo model") if path is not None else (None, "none shipped")


def run_demo(out: Path, n: int = 4, steps: int | None = None, strength: float | None = None,
             device: str = "auto") -> dict:
    """Write synthetic paired cells, their translation and heatmaps to `out`; return a summary.

    The cells are held-out images in the 16-bit camera units the demo model was trained on
    (`synthetic.as_camera_units`): a float image in [0, 1] would look black to it. Steps and
    strength default to the model's own."""
    import numpy as np

    from phenotwin import Translator, synthetic
    from phenotwin.evaluate.metrics import auroc
    from phenotwin.io import safe_name, write_json, write_tiff
    from phenotwin.montage import save_montage
    from phenotwin.progress import tqdm_steps

    checkpoint, origin = demo_checkpoint()
    if checkpoint is None:
        from phenotwin.testing import make_tiny_checkpoint

        checkpoint = make_tiny_checkpoint(out / "untrained-model", kind="pixel", channels=2, size=64, overwrite=True,
                                          normalization={"mode": "fixed", "low": [0, 0], "high": [65535, 65535]})
        origin = "UNTRAINED random model (no demo model is installed): translations are meaningless"
        print(f"warning: {origin}", file=sys.stderr)
    translator = Translator(checkpoint, device=device)
    size, channels = translator.image_size, translator.channels
    source, target = translator.classes[:2]
    # Held-out images: the demo model's training set starts at index 0.
    pairs = synthetic.make_pairs(n, size=size, channels=channels, phenotype="obvious", seed=0, start=100_000)
    control, treated = synthetic.as_camera_units(pairs.control), synthetic.as_camera_units(pairs.treated)
    rows, summary = [], {"checkpoint": translator.checkpoint_id, "model": origin, "images": []}
    for i in range(n):
        result = translator.translate(control[i], source, target, strength=strength, steps=steps, channel_axis=0,
                                      progress=tqdm_steps(f"image {i + 1}/{n}"))
        name = f"cell_{i:02d}"
        meta = result.metadata()
        write_tiff(out / f"{name}_{safe_name(source)}.tif", control[i], "CYX", {"condition": source, "synthetic": True})
        write_tiff(out / f"{name}_{safe_name(target)}_true.tif", treated[i], "CYX", {"condition": target, "synthetic": True})
        write_tiff(out / f"{name}_{safe_name(target)}_translated.tif", result.image, "CYX", meta)
        write_tiff(out / f"{name}_heatmap.tif", result.heatmap, "YX", meta)
        write_tiff(out / f"{name}_true_change.tif", pairs.change_mask[i].astype(np.uint8), "YX", {})
        rows.append((control[i], result.image, treated[i], result.heatmap, pairs.change_mask[i]))
        summary["images"].append({"name": name, "reconstruction_psnr": result.reconstruction_psnr,
                                  "mean_change": float(result.heatmap.mean()),
                                  "heatmap_auroc": auroc(result.heatmap[None], pairs.change_mask[i][None]),
                                  "settings": result.settings.to_dict()})
    save_montage(
        out / "overview.png", rows, [f"{source} (input)", f"{target} (translated)", f"{target} (true)", "heatmap", "true change"]
    )
    write_json(out / "summary.json", summary)
    return summary


def run_translate(args: argparse.Namespace) -> int:
    from phenotwin.batch import InputSelection, run_batch
    from phenotwin.pipeline.settings import TranslationSettings
    from phenotwin.progress import tqdm_steps

    settings = TranslationSettings(source=args.source, target=args.target, strength=args.strength, steps=args.steps,
                                   guidance=args.guidance, seed=args.seed, confine=args.confine, solver=args.solver,
                                   match_intensities=args.match_intensities, batch=args.batch)
    selection = InputSelection(channels=tuple(args.channels) if args.channels is not None else None,
                               axes=args.axes.upper() if args.axes else None)
    try:
        result = run_batch(args.checkpoint, args.input, args.output, settings, selection, device=args.device,
                           recursive=args.recursive, overwrite=args.overwrite, step_progress=tqdm_steps,
                           strict_fit=args.strict_fit, batches_csv=args.batches_csv)
    except KeyboardInterrupt:
        print(f"interrupted: finished images are kept in {args.output}; run the same command again to continue",
              file=sys.stderr)
        return exit_code(KeyboardInterrupt())
    finally:
        _leave_process_group()
    if result.summary is not None:
        print(f"translated {result.done}, already done {result.already_done}, failed {result.failed} "
              f"-> {result.summary}")
    return exit_code(failed=result.failed)


def _leave_process_group() -> None:
    """Under `accelerate launch`, leave the process group before exiting, as torch.distributed asks:
    exiting with it alive can abort the process (gloo threads outliving the interpreter)."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _can_open_window() -> bool:
    """napari and Qt are installed and there is a screen to open a window on."""
    import importlib.util
    import os

    if importlib.util.find_spec("napari") is None or importlib.util.find_spec("qtpy") is None:
        return False
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phenotwin",
        description="See the same cells under another experimental condition (diffusion-model translation).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="translate synthetic cells with the demo model and write the results")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for the results (default: %(default)s)")
    demo.add_argument("-n", type=int, default=4, help="how many synthetic cells to translate (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    demo.add_argument("--strength", type=float, default=None, help="inversion strength in (0, 1] (default: the model's)")
    demo.add_argument("--viewer", action="store_true",
                      help="open napari with the demo scene and the Translate widget (falls back to files without a screen)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: %(default)s)")

    syn = commands.add_parser("synthetic", help="write synthetic paired cells as one TIFF folder per condition")
    syn.add_argument("--out", type=Path, required=True, help="folder to write <condition>/*.tif into")
    syn.add_argument("-n", type=int, default=500, help="images per condition (default: %(default)s)")
    syn.add_argument("--phenotype", default="obvious", choices=["obvious", "subtle", "texture"],
                     help="texture: real microscopy texture (scikit-image's cell image) changed inside a known mask")
    syn.add_argument("--size", type=int, default=64, help="image size in pixels (default: %(default)s)")
    syn.add_argument("--channels", type=int, default=2, choices=[1, 2, 3])
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--start", type=int, default=0, help="index of the first cell (disjoint sets: different starts)")
    syn.add_argument("--batches", type=int, default=None, metavar="N",
                     help="N >= 2 plates of -n pairs each, with known batch effects recorded in batches.csv "
                     "(docs/embedding.md)")

    from phenotwin.train.commands import add_parser as add_train_parser

    add_train_parser(commands)

    tr = commands.add_parser(
        "translate", help="translate image files, folders or globs from one condition to another",
        description="Translate every input image (stacks plane by plane) and write, per input, the translation and "
        "its heatmap as OME-TIFF plus a summary.csv. Finished images are skipped when the same command runs again; "
        "`accelerate launch -m phenotwin translate ...` shares the inputs between processes. See docs/batch.md.",
    )
    tr.add_argument("--checkpoint", required=True, help="checkpoint folder (contains phenotwin.json)")
    tr.add_argument("--input", required=True, nargs="+", metavar="FILE_DIR_OR_GLOB",
                    help="image files (TIFF, PNG, JPEG), folders holding them, or quoted glob patterns ('**' recurses)")
    tr.add_argument("--recursive", action="store_true", help="also read images in the subfolders of folder inputs")
    tr.add_argument("--source", required=True, help="the condition the images were acquired in")
    tr.add_argument("--target", required=True, help="the condition to translate to")
    tr.add_argument("--output", required=True, help="output folder (mirrors the input folders below their common parent)")
    tr.add_argument("--strength", type=float, default=None, help="inversion strength in (0, 1] (default: the model's)")
    tr.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the model's)")
    tr.add_argument("--solver", default=None, choices=SOLVERS,
                    help="ddim, or dpm++ (DPM-Solver++: on a trained model, a better reconstruction at few "
                         "steps) (default: the model's)")
    tr.add_argument("--guidance", type=float, default=None, help="classifier-free guidance, 0 = none")
    tr.add_argument("--confine", action=argparse.BooleanOptionalAction, default=None,
                    help="keep the change only where the model's predictions under the two conditions differ "
                    "(a DiffEdit mask per channel; default: the model's)")
    tr.add_argument("--seed", type=int, default=None, help="recorded with the results for reproducibility")
    tr.add_argument("--batch", default=None, metavar="NAME",
                    help="for a model trained with batches (plates, days): the batch every input was acquired in, so "
                    "the translation keeps its look (default: batch unknown)")
    tr.add_argument("--batches-csv", default=None, metavar="CSV",
                    help="each input's batch instead: a CSV with the columns file and batch, one row per input, files "
                    "relative to the CSV's folder (a data folder's batches.csv works)")
    tr.add_argument("--axes", default=None,
                    help="axes of every input when the file does not record them, one letter per axis: e.g. CYX, YXC, "
                    "ZYX, TZCYX (T time, Z depth, Q other such as wells, C channels). Default: from the file")
    tr.add_argument("--channels", type=int, nargs="+", default=None, metavar="INDEX",
                    help="indices along the channel axis that feed the model, in the model's order (e.g. 0 2); "
                    "default: all channels")
    tr.add_argument("--overwrite", action="store_true",
                    help="redo images that --output holds from a run with other settings (default: refuse)")
    tr.add_argument("--strict-fit", action="store_true",
                    help="fail every file whose intensities do not fit the model's training images (default: translate "
                    "it and say so in summary.csv's input_fit column)")
    tr.add_argument("--match-intensities", action="store_true",
                    help="map each image's own percentiles onto the model's training range (images from another "
                    "microscope setting; recorded in the provenance)")
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: %(default)s)")

    from phenotwin.evaluate.commands import add_parser as add_evaluate_parser

    add_evaluate_parser(commands)
    from phenotwin.calibration_command import add_parser as add_calibrate_parser

    add_calibrate_parser(commands)
    from phenotwin.embed.commands import add_parser as add_embed_parser

    add_embed_parser(commands)
    from phenotwin.explain.commands import add_parser as add_explain_parser

    add_explain_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("always", PhenotwinWarning)
    try:
        if args.command == "demo" and args.viewer:
            if _can_open_window():
                from phenotwin._napari.demo import show_demo

                checkpoint, _ = demo_checkpoint()
                if checkpoint is None:
                    from phenotwin.testing import make_tiny_checkpoint

                    checkpoint = make_tiny_checkpoint(args.out / "untrained-model", kind="pixel", channels=2, size=64,
                                                      overwrite=True)
                    print("warning: no demo model is installed; showing an UNTRAINED model", file=sys.stderr)
                show_demo(checkpoint, steps=args.steps)
                return 0
            print("no screen or napari here: writing the demo to files instead", file=sys.stderr)
        if args.command == "demo":
            summary = run_demo(args.out, n=args.n, steps=args.steps, strength=args.strength, device=args.device)
            psnrs = ", ".join(f"{image['reconstruction_psnr']:.1f}" for image in summary["images"])
            print(f"wrote {len(summary['images'])} translations to {args.out} (overview.png); "
                  f"reconstruction PSNR (dB): {psnrs}")
            return 0
        if args.command == "translate":
            return run_translate(args)
        if args.command == "train":
            from phenotwin.train.commands import run as run_train

            return run_train(args, argv)
        if args.command == "calibrate":
            from phenotwin.calibration_command import run as run_calibrate

            return run_calibrate(args)
        if args.command == "evaluate":
            from phenotwin.evaluate.commands import run as run_evaluate

            return run_evaluate(args)
        if args.command == "explain":
            from phenotwin.explain.commands import run as run_explain

            return run_explain(args, argv)
        if args.command == "embed":
            from phenotwin.embed.commands import run as run_embed

            return run_embed(args)
        if args.command == "synthetic":
            from phenotwin.synthetic import make_pairs, write_folders

            if args.batches is not None:
                from phenotwin.synthetic.batches import make_plates, write_plates

                written = write_plates(args.out, make_plates(args.n, args.batches, size=args.size, channels=args.channels,
                                                             phenotype=args.phenotype, seed=args.seed, start=args.start))
                print(", ".join(f"{len(files)} {name}" for name, files in written.items())
                      + f" images on {args.batches} plates in {args.out} (batches.csv)")
                return 0
            pairs = make_pairs(args.n, size=args.size, channels=args.channels, phenotype=args.phenotype,
                               seed=args.seed, start=args.start)
            written = write_folders(args.out, pairs)
            print(", ".join(f"{len(files)} {name}" for name, files in written.items()) + f" images in {args.out}")
            return 0
    except PhenotwinError as err:
        print(f"phenotwin: error: {err}", file=sys.stderr)
        return exit_code(err)
    except (Cancelled, KeyboardInterrupt) as err:
        print("phenotwin: cancelled", file=sys.stderr)
        return exit_code(err)
    return 0


def exit_code(error: BaseException | None = None, failed: int = 0) -> int:
    """The documented exit codes (docs/batch.md): 0 all done; 1 some files failed; 2 a bad
    invocation or input found before any work (every `PhenotwinError`); 130 interrupted."""
    if isinstance(error, (Cancelled, KeyboardInterrupt)):
        return 130
    if isinstance(error, PhenotwinError):
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
