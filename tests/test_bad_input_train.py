"""Bad input to `phenotwin train`, as a new user would give it (issue 13).

Every case runs twice: through the Python API (the error's type and message) and through
`phenotwin.cli.main` (the exit code, 2 for a bad invocation or input found up front, and the
message on stderr). Both times every file of the data, the models and the output is hashed
before and after: a refused call writes nothing and loses nothing.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

from phenotwin.cli import build_parser, main
from phenotwin.errors import PhenotwinError
from phenotwin.train.config import OutputFolderInUse
from phenotwin.train.trainer import TrainConfig, Trainer, train

RNG = np.random.default_rng(0)
GOOD = RNG.integers(0, 4000, (2, 40, 40), dtype=np.uint16)


def write_images(root: Path, spec: dict[str, list[np.ndarray]]) -> Path:
    for name, images in spec.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            tifffile.imwrite(root / name / f"{i}.tif", image)
    return root


@dataclass
class World:
    """What the cases start from; shared, so each case must leave it exactly as it was."""

    root: Path
    data: Path  # two conditions of 16-bit, 2-channel images
    model: Path  # a finished run with its training state (size 32, width 8, seed 0)
    pixel_base: Path  # a phenotwin checkpoint to fine-tune
    donor: Path  # a latent checkpoint, for --vae


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from phenotwin.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("world")
    data = write_images(root / "data", {"control": [GOOD, GOOD[:, ::-1]], "treated": [GOOD[::-1], GOOD.T.copy()]})
    model = train(TrainConfig(data=str(data), out=str(root / "model"), size=32, steps=2, batch_size=2,
                              checkpoint_every=2, width=8, warmup_steps=1, sample_steps=2))
    pixel_base = make_tiny_checkpoint(root / "pixel-base", kind="pixel", channels=2, classes=("a", "b"))
    donor = make_tiny_checkpoint(root / "donor", kind="latent", channels=2, size=32)
    return World(root, data, model, pixel_base, donor)


def listing(*folders: Path) -> dict[str, str]:
    """Every entry under `folders` with a hash of each file's content."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for folder in folders if folder.exists() for p in sorted(folder.rglob("*"))}


def copy_of_model(w: World, tmp: Path) -> Path:
    out = tmp / "out"
    shutil.copytree(w.model, out)
    return out


def base_args(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--size", "32", "--steps", "2", "--batch-size", "2",
            "--width", "8", "--checkpoint-every", "2", "--warmup-steps", "1"]


def flags(*extra: str) -> Callable[[World, Path], list[str]]:
    """A case that adds flags to a good invocation (a later flag wins over the one before)."""
    return lambda w, tmp: [*base_args(w.data, tmp / "out"), *extra]


def resume(*extra: str) -> Callable[[World, Path], list[str]]:
    """A case that resumes a copy of the finished run with `extra` flags."""
    return lambda w, tmp: [*base_args(w.data, copy_of_model(w, tmp)), "--resume", *extra]


def on_data(spec: Callable[[Path], object], *extra: str) -> Callable[[World, Path], list[str]]:
    """A case whose data folder `spec(root)` builds."""
    def build(w: World, tmp: Path) -> list[str]:
        root = tmp / "bad-data"
        root.mkdir()
        spec(root)
        return [*base_args(root, tmp / "out"), *extra]
    return build


def in_model(*paths: str, extra: tuple[str, ...] = ("--overwrite",)) -> Callable[[World, Path], list[str]]:
    """A case that trains into a copy of the finished run holding files phenotwin did not write."""
    def build(w: World, tmp: Path) -> list[str]:
        out = copy_of_model(w, tmp)
        for path in paths:
            if path.endswith("/"):
                shutil.copytree(w.data, out / path)
            else:
                (out / path).write_text("the user's own")
        return [*base_args(w.data, out), *extra]
    return build


def user_folder(w: World, tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    return base_args(w.data, tmp / "out")


def out_is_a_file(w: World, tmp: Path) -> list[str]:
    (tmp / "out").write_text("a file")
    return base_args(w.data, tmp / "out")


def data_inside_out(w: World, tmp: Path) -> list[str]:
    shutil.copytree(w.data, tmp / "out" / "images")
    return [*base_args(tmp / "out" / "images", tmp / "out"), "--overwrite"]


def data_is_out(w: World, tmp: Path) -> list[str]:
    shutil.copytree(w.data, tmp / "both")
    return [*base_args(tmp / "both", tmp / "both"), "--overwrite"]


def out_inside_data(w: World, tmp: Path) -> list[str]:
    shutil.copytree(w.data, tmp / "data")
    return base_args(tmp / "data", tmp / "data" / "model")


def base_inside_out(w: World, tmp: Path) -> list[str]:
    out = copy_of_model(w, tmp)
    return [*base_args(w.data, out), "--overwrite", "--method", "full", "--base", str(out)]


def other_data(w: World, tmp: Path) -> list[str]:
    out = copy_of_model(w, tmp)
    data = write_images(tmp / "other", {"control": [GOOD[::-1]], "treated": [GOOD]})
    return [*base_args(data, out), "--resume"]


def broken_state(w: World, tmp: Path) -> list[str]:
    out = copy_of_model(w, tmp)
    (out / "training" / "state" / "progress.json").write_text("{not json")
    return [*base_args(w.data, out), "--resume"]


def other_base(w: World, tmp: Path) -> list[str]:
    return [*resume()(w, tmp), "--method", "full", "--base", str(w.pixel_base)]


def other_vae(w: World, tmp: Path) -> list[str]:
    return [*resume()(w, tmp), "--vae", str(w.donor)]


def bad_base(kind: str) -> Callable[[World, Path], list[str]]:
    def build(w: World, tmp: Path) -> list[str]:
        base = tmp / "base"
        if kind == "empty":
            base.mkdir()
        return [*base_args(w.data, tmp / "out"), "--method", "full", "--base", str(base)]
    return build


def unreadable(root: Path) -> None:
    write_images(root, {"control": [GOOD], "treated": [GOOD]})
    (root / "treated" / "x.tif").write_bytes(b"not a tiff")


def notes_in_condition(root: Path) -> None:
    write_images(root, {"control": [GOOD], "treated": [GOOD]})
    (root / "treated" / "notes.txt").write_text("x")


CONSTANT = np.full((2, 40, 40), 7, dtype=np.uint16)
WITH_NAN = GOOD.astype(np.float32)
WITH_NAN[0, 3, 3] = np.nan
BAD = PhenotwinError
ARGS = SystemExit  # refused by the argument parser itself, with its usage line

CASES = [
    # -- every hyperparameter's range -------------------------------------------------
    ("lr-negative", flags("--learning-rate", "-1"), BAD, "learning_rate (--learning-rate) must be a number in (0, 1]"),
    ("lr-nan", flags("--learning-rate", "nan"), BAD, "must be a number in (0, 1], e.g. 1e-4; got nan"),
    ("lr-inf", flags("--learning-rate", "inf"), BAD, "must be a number in (0, 1], e.g. 1e-4; got inf"),
    ("lr-zero", flags("--learning-rate", "0"), BAD, "learning_rate (--learning-rate) must be a number in (0, 1]"),
    ("lr-huge", flags("--learning-rate", "5"), BAD, "must be a number in (0, 1], e.g. 1e-4; got 5.0"),
    ("lr-text", flags("--learning-rate", "fast"), ARGS, "invalid float value: 'fast'"),
    ("ema-2", flags("--ema-decay", "2"), BAD, "ema_decay (--ema-decay) must be a number in [0, 1)"),
    ("ema-1", flags("--ema-decay", "1"), BAD, "ema_decay (--ema-decay) must be a number in [0, 1)"),
    ("ema-negative", flags("--ema-decay", "-0.1"), BAD, "ema_decay (--ema-decay) must be a number in [0, 1)"),
    ("ema-nan", flags("--ema-decay", "nan"), BAD, "ema_decay (--ema-decay) must be a number in [0, 1)"),
    ("warmup-negative", flags("--warmup-steps", "-5"), BAD, "warmup_steps (--warmup-steps) must be at least 0, got -5"),
    ("dropout-1", flags("--class-dropout", "1"), BAD, "class_dropout (--class-dropout) must be a number in [0, 1)"),
    ("dropout-negative", flags("--class-dropout", "-0.5"), BAD, "class_dropout (--class-dropout) must be a number"),
    ("dropout-nan", flags("--class-dropout", "nan"), BAD, "class_dropout (--class-dropout) must be a number"),
    ("lora-rank-0", flags("--method", "lora", "--base", "b", "--lora-rank", "0"), BAD,
     "lora_rank (--lora-rank) must be at least 1, got 0"),
    ("steps-0", flags("--steps", "0"), BAD, "steps (--steps) must be at least 1, got 0"),
    ("steps-negative", flags("--steps", "-3"), BAD, "steps (--steps) must be at least 1, got -3"),
    ("steps-text", flags("--steps", "many"), ARGS, "invalid int value: 'many'"),
    ("steps-fraction", flags("--steps", "2.5"), ARGS, "invalid int value: '2.5'"),
    ("batch-0", flags("--batch-size", "0"), BAD, "batch_size (--batch-size) must be at least 1, got 0"),
    ("checkpoint-every-0", flags("--checkpoint-every", "0"), BAD, "checkpoint_every (--checkpoint-every) must be at"),
    ("size-0", flags("--size", "0"), BAD, "size (--size) must be at least 8, got 0"),
    ("size-30", flags("--size", "30"), BAD, "size (--size) must be a multiple of 8"),
    ("width-4", flags("--width", "4"), BAD, "width (--width) must be at least 8, got 4"),
    ("width-12", flags("--width", "12"), BAD, "width (--width) must be a multiple of 8"),
    ("seed-negative", flags("--seed", "-1"), BAD, "seed (--seed) must be at least 0, got -1"),
    ("seed-huge", flags("--seed", str(2**32)), BAD, "seed (--seed) must be below 2**32"),
    ("max-per-class-0", flags("--max-per-class", "0"), BAD, "max_per_class (--max-per-class) must be at least 1"),
    # -- choices and combinations ----------------------------------------------------
    ("method-unknown", flags("--method", "dreambooth"), ARGS, "invalid choice: 'dreambooth'"),
    ("prediction-unknown", flags("--prediction-type", "x0"), ARGS, "invalid choice: 'x0'"),
    ("precision-unknown", flags("--mixed-precision", "fp8"), ARGS, "invalid choice: 'fp8'"),
    ("channel-axis-1", flags("--channel-axis", "1"), ARGS, "invalid choice: 1"),
    ("lora-without-base", flags("--method", "lora"), BAD, "fine-tunes an existing model: give --base"),
    ("base-with-scratch", flags("--base", "b"), BAD, "--base is for fine-tuning"),
    ("vae-with-full", flags("--method", "full", "--base", "b", "--vae", "v"), BAD, "--vae is for latent models"),
    ("resume-and-overwrite", flags("--resume", "--overwrite"), BAD, "give only one"),
    ("channel-name-empty", flags("--channel-names", "nucleus", ""), BAD, "channel names must not be empty"),
    ("channel-names-too-few", flags("--channel-names", "nucleus"), BAD,
     "1 channel name(s) given (nucleus) but the images have 2 channel(s)"),
    ("base-missing", bad_base("missing"), BAD, "does not exist. Give a phenotwin model folder"),
    ("vae-missing", flags("--vae", "no-such-vae"), BAD, "the vae folder no-such-vae does not exist"),
    ("base-not-a-model", bad_base("empty"), BAD, "neither a phenotwin checkpoint"),
    # -- the output folder: replace only what phenotwin wrote ---------------------------
    ("out-holds-model", lambda w, tmp: base_args(w.data, copy_of_model(w, tmp)), OutputFolderInUse,
     "already holds a model. Nothing was changed: choose another output folder, or pass --resume"),
    ("overwrite-notes", in_model("notes.txt"), OutputFolderInUse, "holds files phenotwin did not write: notes.txt."),
    ("overwrite-data-folder", in_model("images/"), OutputFolderInUse, "holds files phenotwin did not write: images/."),
    ("overwrite-training-notes", in_model("training/plot.png"), OutputFolderInUse,
     "holds files phenotwin did not write: training/plot.png."),
    ("overwrite-results", in_model("results.csv", "notes.txt"), OutputFolderInUse,
     "did not write: notes.txt, results.csv. Replacing a model replaces only phenotwin's own files"),
    ("no-overwrite-model-and-notes", in_model("notes.txt", extra=()), OutputFolderInUse,
     "already holds a model (notes.txt)"),
    ("out-holds-user-files", user_folder, OutputFolderInUse,
     "already holds files (notes.txt). Nothing was changed: choose another output folder."),
    ("out-is-a-file", out_is_a_file, BAD, "is a file; a model is a folder"),
    ("data-inside-out", data_inside_out, BAD, "lies inside the output folder"),
    ("data-is-out", data_is_out, BAD, "lies inside the output folder"),
    ("out-inside-data", out_inside_data, BAD, "lies inside the data folder"),
    ("base-inside-out", base_inside_out, BAD, "the base folder"),
    # -- --resume: the same run, or a clear refusal ----------------------------------
    ("resume-nothing", flags("--resume"), BAD, "nothing to resume in"),
    ("resume-width", resume("--width", "16"), BAD, "width: saved 8, now 16"),
    ("resume-size", resume("--size", "24"), BAD, "size: saved 32, now 24"),
    ("resume-prediction", resume("--prediction-type", "epsilon"), BAD,
     "prediction_type: saved 'v_prediction', now 'epsilon'"),
    ("resume-zero-snr", resume("--no-zero-snr"), BAD, "zero_snr: saved True, now False"),
    ("resume-learning-rate", resume("--learning-rate", "0.01"), BAD, "learning_rate: saved 0.001, now 0.01"),
    ("resume-ema", resume("--ema-decay", "0.9"), BAD, "ema_decay: saved 0.999, now 0.9"),
    ("resume-seed", resume("--seed", "3"), BAD, "seed: saved 0, now 3). Resume with the saved run's settings (--seed 0)"),
    ("resume-method", other_base, BAD, "method: saved 'scratch', now 'full'"),
    ("resume-vae", other_vae, BAD, "vae: saved None, now"),
    ("resume-channel-axis", resume("--channel-axis", "-1"), BAD, "channel_axis: saved None, now -1"),
    ("resume-other-data", other_data, BAD, "differ from the data this run started with"),
    ("resume-broken-state", broken_state, BAD, "cannot be read (progress.json"),
    # -- data the model cannot learn from (or would learn the wrong thing from) --------
    ("data-missing", lambda w, tmp: base_args(tmp / "nowhere", tmp / "out"), BAD, "does not exist"),
    ("data-no-subfolders", on_data(lambda root: None), BAD, "has no subfolders"),
    ("data-one-condition", on_data(lambda root: write_images(root, {"control": [GOOD]})), BAD, "at least two"),
    ("data-empty-condition", on_data(lambda root: write_images(root, {"control": [GOOD], "treated": []})), BAD,
     "has no images"),
    ("data-unreadable", on_data(unreadable), BAD, "cannot read"),
    ("data-notes", on_data(notes_in_condition), BAD, "non-image file"),
    ("data-too-small", on_data(lambda root: write_images(root, {"control": [GOOD], "treated": [GOOD[:, :20, :20]]})),
     BAD, "smaller than the 32x32 crop"),
    ("data-channel-counts", on_data(lambda root: write_images(root, {"control": [GOOD], "treated": [GOOD[:1]]})),
     BAD, "different channel counts"),
    ("data-nan", on_data(lambda root: write_images(root, {"control": [GOOD], "treated": [WITH_NAN]})), BAD,
     "NaN or infinite"),
    ("bit-depth-8-vs-16", on_data(lambda root: write_images(root, {"control": [GOOD],
                                                                   "treated": [(GOOD // 16).astype(np.uint8)]})),
     BAD, "differ in type or bit depth (control: uint16 (e.g. 0.tif); treated: uint8 (e.g. 0.tif))"),
    ("bit-depth-float-vs-16", on_data(lambda root: write_images(root, {"control": [GOOD],
                                                                       "treated": [GOOD.astype(np.float32)]})),
     BAD, "--allow-mixed-bit-depth"),
    ("constant-condition", on_data(lambda root: write_images(root, {"control": [GOOD], "treated": [CONSTANT] * 2})),
     BAD, "every image of condition 'treated' is constant (e.g. 0.tif holds only the value 7)"),
    ("constant-despite-allow", on_data(lambda root: write_images(root, {"control": [GOOD],
                                                                        "treated": [CONSTANT.astype(np.uint8)]}),
                                       "--allow-mixed-bit-depth"),
     BAD, "is constant"),
]


def error_of(argv: list[str], expected: type[BaseException]):
    """What the Python API raises for the settings `argv` describes."""
    from phenotwin.train.commands import config_from

    with pytest.raises(expected) as caught:
        Trainer(config_from(build_parser().parse_args(argv), command="bad-input test"))
    return caught.value


@pytest.mark.parametrize(("build", "expected", "phrase"), [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_bad_training_input_is_refused_up_front(world, tmp_path, capsys, build, expected, phrase):
    argv = build(world, tmp_path)
    before = listing(world.root, tmp_path)
    error = error_of(argv, expected)
    if expected is not ARGS:
        assert phrase in str(error) or (isinstance(error, OutputFolderInUse) and phrase in error.describe(
            "--resume", "--overwrite")), str(error)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse: its usage line and message, exit 2
        code = exit.code
    stderr = capsys.readouterr().err
    assert code == 2
    assert phrase in stderr, stderr
    assert "Traceback" not in stderr
    assert listing(world.root, tmp_path) == before  # nothing written, nothing lost


def test_there_are_enough_cases():
    assert len(CASES) >= 50 and len({case[0] for case in CASES}) == len(CASES)


def test_a_failure_during_training_exits_1(world, tmp_path, capsys, monkeypatch):
    """A loss that diverges is no bad invocation: exit 1, what was saved kept."""
    import torch

    real = torch.nn.functional.mse_loss
    calls = []

    def diverging(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(torch.nn.functional, "mse_loss", diverging)
    code = main([*base_args(world.data, tmp_path / "out"), "--steps", "4"])
    assert code == 1
    assert re.search(r"training failed at step 2: the loss became nan at step 3", capsys.readouterr().err)
    assert (tmp_path / "out" / "phenotwin.json").is_file()  # the save at step 2 is kept
