"""Bad input, as a new user would give it, through the Python API, checkpoint loading and
`phenotwin translate` (training: test_bad_input_train.py).

Every case asserts the error type, a phrase of its message, the exit code the command gives
for it (2: found before any work), that no traceback reaches the user, and that nothing was
written or lost: the input, output and model folders hash the same before and after.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from phenotwin.checkpoint import INFO_FILE, load_checkpoint
from phenotwin.cli import exit_code, main
from phenotwin.errors import CheckpointError, PhenotwinError
from phenotwin.pipeline.settings import TranslationSettings

ROOT = Path(__file__).resolve().parents[1]
FIXED = {"mode": "fixed", "low": [0.0, 0.0], "high": [4000.0, 4000.0]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    yield


def tree(*folders: Path) -> dict[str, str | None]:
    """sha256 of every file below each folder (None for a folder that does not exist)."""
    digests: dict[str, str | None] = {}
    for folder in folders:
        if not folder.exists():
            digests[str(folder)] = None
            continue
        for path in sorted(folder.rglob("*")):
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return digests


def cells(channels: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((channels, size, size)) * 3000 + 200).astype(np.uint16)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from phenotwin.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny", channels=2, normalization=FIXED)


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    from phenotwin.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("lora") / "sd-lora", kind="stable-diffusion", lora=True,
                                channels=2, normalization=FIXED)


@pytest.fixture(scope="module")
def translator(model):
    from phenotwin import Translator

    return Translator(model, device="cpu")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs") / "plate"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", cells(seed=1), metadata={"axes": "CYX"})
    tifffile.imwrite(folder / "b.tif", cells(seed=2), metadata={"axes": "CYX"})
    return folder


def translate(model: Path, inputs: list, out: Path, *extra: str) -> list[str]:
    return ["translate", "--checkpoint", str(model), "--input", *map(str, inputs), "--source", "control",
            "--target", "treated", "--output", str(out), "--steps", "2", "--device", "cpu", *extra]


def refused(argv: list[str], phrase: str, capsys, *folders: Path) -> str:
    """Run the command; it must exit 2 with `phrase` in one line of stderr, no traceback, nothing changed."""
    before = tree(*folders)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert phrase in err, err[-2000:]
    assert "Traceback" not in err and "phenotwin: error: " in err
    assert tree(*folders) == before, "files were written, changed or removed"
    return err


# -- the Python API: TranslationSettings and Translator ---------------------------------------------

SETTINGS = [
    ("strength 0", {"strength": 0}, "strength must be in (0, 1]"),
    ("strength negative", {"strength": -0.5}, "strength must be in (0, 1]"),
    ("strength above 1", {"strength": 1.5}, "strength must be in (0, 1]"),
    ("strength NaN", {"strength": math.nan}, "strength must be in (0, 1]"),
    ("strength infinite", {"strength": math.inf}, "strength must be in (0, 1]"),
    ("strength text", {"strength": "0.5"}, "strength must be in (0, 1]"),
    ("strength bool", {"strength": True}, "strength must be in (0, 1]"),
    ("steps 0", {"steps": 0}, "steps must be a whole number from 1 to"),
    ("steps negative", {"steps": -3}, "steps must be a whole number from 1 to"),
    ("steps fractional", {"steps": 2.5}, "steps must be a whole number from 1 to"),
    ("steps beyond the schedule", {"steps": 10**6}, "steps must be a whole number from 1 to"),
    ("steps text", {"steps": "50"}, "steps must be a whole number from 1 to"),
    ("guidance negative", {"guidance": -1.0}, "guidance must be a number from 0"),
    ("guidance NaN", {"guidance": math.nan}, "guidance must be a number from 0"),
    ("guidance infinite", {"guidance": math.inf}, "guidance must be a number from 0"),
    ("guidance text", {"guidance": "1"}, "guidance must be a number from 0"),
    ("confine text", {"confine": "yes"}, "confine must be true or false"),
    ("confine number", {"confine": 1}, "confine must be true or false"),
    ("signed text", {"signed": "no"}, "signed must be true or false"),
    ("seed negative", {"seed": -1}, "seed must be a whole number >= 0"),
    ("seed fractional", {"seed": 1.5}, "seed must be a whole number >= 0"),
    ("reference unknown", {"reference": "original"}, "reference must be one of"),
    ("refinements fractional", {"inversion_refinements": 1.5}, "inversion_refinements must be a whole number"),
    ("refinements negative", {"inversion_refinements": -1}, "inversion_refinements must be a whole number"),
    ("sigma negative", {"sigma": -1.0}, "sigma (heatmap smoothing, pixels) must be a number >= 0"),
    ("sigma NaN", {"sigma": math.nan}, "sigma (heatmap smoothing, pixels) must be a number >= 0"),
    ("sigma infinite", {"sigma": math.inf}, "sigma (heatmap smoothing, pixels) must be a number >= 0"),
    ("source unknown", {"source": "Control"}, "unknown condition 'Control'"),
    ("source index out of range", {"source": 5}, "unknown condition 5"),
    ("target unknown", {"target": "drug"}, "unknown condition 'drug'"),
    ("target bool", {"target": True}, "unknown condition True"),
]


@pytest.mark.parametrize("overrides, phrase", [c[1:] for c in SETTINGS], ids=[c[0] for c in SETTINGS])
def test_bad_settings_are_refused_before_any_work(translator, model, overrides, phrase):
    image = cells()
    before, folder = image.copy(), tree(model)
    settings = TranslationSettings(source="control", target="treated").replace(**overrides)
    with pytest.raises(PhenotwinError) as caught:
        translator.translate(image, channel_axis=0, settings=settings)
    assert phrase in str(caught.value) and exit_code(caught.value) == 2
    np.testing.assert_array_equal(image, before)
    assert tree(model) == folder


def test_absurd_guidance_is_refused(translator):
    with pytest.raises(PhenotwinError, match="guidance must be a number from 0 .* to 30, got 1000000.0"):
        translator.resolve(TranslationSettings("control", "treated", guidance=1e6))


def test_unknown_setting_names_are_refused():
    with pytest.raises(PhenotwinError, match=r"unknown setting\(s\) strenght") as caught:
        TranslationSettings.from_dict({"strenght": 0.5})
    assert exit_code(caught.value) == 2


IMAGES = [
    ("three channels for two", lambda: cells(3), 0, "3 channel(s) but the model was trained on 2"),
    ("one channel for two", lambda: cells(1)[0], None, "1 channel(s) but the model was trained on 2"),
    ("NaN pixel", lambda: np.where(np.eye(32, dtype=bool), np.nan, cells().astype(np.float32)), 0, "NaN or infinite"),
    ("infinite pixel", lambda: np.where(np.eye(32, dtype=bool), np.inf, cells().astype(np.float32)), 0,
     "NaN or infinite"),
    ("constant image", lambda: np.full((2, 32, 32), 7, np.uint16), 0, "image is constant"),
    ("too small", lambda: cells(size=8), 0, "at least 16x16"),
    ("boolean mask", lambda: cells() > 1000, 0, "expected uint8, uint16 or float"),
    ("complex values", lambda: cells().astype(np.complex64), 0, "expected uint8, uint16 or float"),
    ("text", lambda: np.full((2, 32, 32), "a"), 0, "expected uint8, uint16 or float"),
    ("a 4-D stack", lambda: np.stack([cells(), cells()]), 0, "a translation takes one 2-D plane"),
    ("3-D without channel_axis", lambda: cells(), None, "no channel_axis was given"),
    ("channel axis in the middle", lambda: cells(), 1, "is not supported"),
    ("channel_axis for a 2-D image", lambda: cells(1)[0], 0, "omit channel_axis for grayscale"),
]


@pytest.mark.parametrize("make, axis, phrase", [c[1:] for c in IMAGES], ids=[c[0] for c in IMAGES])
def test_bad_images_are_refused_and_left_alone(translator, make, axis, phrase):
    image = make()
    before = image.copy()
    with pytest.raises(PhenotwinError) as caught:
        translator.translate(image, "control", "treated", steps=2, channel_axis=axis)
    assert phrase in str(caught.value) and exit_code(caught.value) == 2
    np.testing.assert_array_equal(image, before)


TRANSLATORS = [
    ("refinements fractional", {"inversion_refinements": 1.5}, "inversion_refinements must be a whole number"),
    ("reference unknown", {"reference": "raw"}, "reference must be one of"),
    ("device without CUDA", {"device": "cuda:99"}, "device 'cuda:99'"),
    ("unknown device", {"device": "tpu"}, "unknown device 'tpu'"),
    ("device text with a colon", {"device": "gpu:0"}, "unknown device 'gpu:0'"),
]


@pytest.mark.parametrize("kwargs, phrase", [c[1:] for c in TRANSLATORS], ids=[c[0] for c in TRANSLATORS])
def test_bad_translator_options_are_refused(model, kwargs, phrase):
    from phenotwin import Translator

    before = tree(model)
    with pytest.raises(PhenotwinError) as caught:
        Translator(model, **{"device": "cpu", **kwargs})
    assert phrase in str(caught.value) and exit_code(caught.value) == 2
    assert tree(model) == before


def test_bad_heatmap_sigma_through_run_batch_stops_before_any_file(model, inputs, tmp_path):
    from phenotwin.batch import run_batch

    out = tmp_path / "out"
    before = tree(inputs, out)
    with pytest.raises(PhenotwinError, match="sigma") as caught:
        run_batch(model, [str(inputs)], out, TranslationSettings("control", "treated", steps=2, sigma=-2.0),
                  device="cpu")
    assert exit_code(caught.value) == 2 and tree(inputs, out) == before


# -- checkpoint loading: phenotwin.json and the files beside it -------------------------------------


def _set(key, value):
    def change(info: dict) -> dict:
        return {**info, key: value}

    return change


def _drop(key):
    def change(info: dict) -> dict:
        return {k: v for k, v in info.items() if k != key}

    return change


def _normalization(**values):
    return _set("normalization", {"mode": "fixed", "low": [0.0, 0.0], "high": [4000.0, 4000.0], **values})


INFOS = [
    ("format_version as text", _set("format_version", "1"), "format_version must be a whole number"),
    ("format_version null", _set("format_version", None), "format_version must be a whole number"),
    ("format_version 0", _set("format_version", 0), "format_version must be a whole number"),
    ("format_version fractional", _set("format_version", 1.5), "format_version must be a whole number"),
    ("format_version true", _set("format_version", True), "format_version must be a whole number"),
    ("format_version from the future", _set("format_version", 99), "upgrade napari-phenotwin"),
    ("classes null", _set("classes", None), "classes must be a list of condition names"),
    ("classes a string", _set("classes", "ab"), "classes must be a list of condition names"),
    ("classes an object", _set("classes", {"a": 0, "b": 1}), "classes must be a list of condition names"),
    ("classes empty", _set("classes", []), "at least two classes"),
    ("one class", _set("classes", ["control"]), "at least two classes"),
    ("repeated class", _set("classes", ["a", "a"]), "class names must be unique"),
    ("class null", _set("classes", ["control", None]), "classes must be a list of condition names"),
    ("class blank", _set("classes", ["control", " "]), "classes must be a list of condition names"),
    ("class a list", _set("classes", [["a"], ["b"]]), "classes must be a list of condition names"),
    ("kind unknown", _set("kind", "gan"), "kind 'gan' is not one of"),
    ("kind null", _set("kind", None), "kind None is not one of"),
    ("image_size null", _set("image_size", None), "image_size must be an integer >= 8"),
    ("image_size text", _set("image_size", "32"), "image_size must be an integer >= 8"),
    ("image_size fractional", _set("image_size", 32.0), "image_size must be an integer >= 8"),
    ("image_size true", _set("image_size", True), "image_size must be an integer >= 8"),
    ("image_size tiny", _set("image_size", 4), "image_size must be an integer >= 8"),
    ("image_size far beyond the UNet", _set("image_size", 4096), "image_size 4096 but the UNet works on 32 px"),
    ("image_size not a multiple", _set("image_size", 33), "a multiple of 2"),
    ("channels null", _set("channels", None), "channels must be a positive integer"),
    ("channels zero", _set("channels", 0), "channels must be a positive integer"),
    ("channels text", _set("channels", "2"), "channels must be a positive integer"),
    ("channels not the UNet's", _set("channels", 3), "normalization 'fixed' needs per-channel"),
    ("normalization null", _set("normalization", None), "normalization must be a JSON object"),
    ("normalization a list", _set("normalization", [0, 1]), "normalization must be a JSON object"),
    ("normalization mode unknown", _normalization(mode="zscore"), "normalization mode 'zscore'"),
    ("normalization text values", _normalization(low=["a", "b"]), "finite numbers"),
    ("normalization NaN", _normalization(low=[math.nan, 0.0]), "finite numbers"),
    ("normalization Infinity", _normalization(high=[math.inf, 1.0]), "finite numbers"),
    ("normalization null values", _normalization(high=[None, 1.0]), "finite numbers"),
    ("normalization low above high", _normalization(low=[10.0, 0.0], high=[5.0, 1.0]), "low <= high"),
    ("normalization one value for two channels", _normalization(low=[0.0]), "per-channel 'low' and 'high'"),
    ("normalization scalars", _normalization(low=0.0, high=1.0), "per-channel 'low' and 'high'"),
    ("percentile text", _set("normalization", {"mode": "percentile", "low": "1"}), "0 <= low < high <= 100"),
    ("percentile reversed", _set("normalization", {"mode": "percentile", "low": 60, "high": 40}),
     "0 <= low < high <= 100"),
    ("percentile NaN", _set("normalization", {"mode": "percentile", "low": math.nan}), "0 <= low < high <= 100"),
    ("percentile above 100", _set("normalization", {"mode": "percentile", "high": 101}), "0 <= low < high <= 100"),
    ("defaults null", _set("defaults", None), "defaults must be a JSON object"),
    ("defaults a list", _set("defaults", ["strength"]), "defaults must be a JSON object"),
    ("defaults bad strength", _set("defaults", {"strength": 2}), "strength must be in (0, 1]"),
    ("defaults unknown key", _set("defaults", {"strenght": 0.5}), "unknown setting(s) strenght"),
    ("provenance null", _set("provenance", None), "provenance must be a JSON object"),
    ("channel_names a string", _set("channel_names", "ab"), "channel_names must be a list of names"),
    ("channel_names too few", _set("channel_names", ["dna"]), "1 channel names for 2 channels"),
    ("adapter unknown", _set("adapter", "dreambooth"), "adapter 'dreambooth' is not one of"),
    ("adapter without base", _set("adapter", "lora"), "must name the base model"),
    ("base a number", _set("base", 7), "base must be the path of the base model"),
    ("kind missing", _drop("kind"), "missing kind"),
    ("classes missing", _drop("classes"), "missing classes"),
]


def _corrupt_copy(source: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    return folder


@pytest.mark.parametrize("change, phrase", [c[1:] for c in INFOS], ids=[c[0] for c in INFOS])
def test_a_bad_phenotwin_json_is_refused_with_the_fix(model, inputs, tmp_path, capsys, change, phrase):
    folder = _corrupt_copy(model, tmp_path)
    info = json.loads((folder / INFO_FILE).read_text())
    (folder / INFO_FILE).write_text(json.dumps(change(info)))  # NaN and Infinity as JSON writes them
    out = tmp_path / "out"
    refused(translate(folder, [inputs], out), phrase, capsys, folder, inputs, out)


def _write(name: str, data: bytes):
    def change(folder: Path) -> None:
        (folder / name).write_bytes(data)

    return change


def _remove(name: str):
    def change(folder: Path) -> None:
        target = folder / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return change


def _truncate(name: str):
    def change(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return change


UNET = "unet/diffusion_pytorch_model.safetensors"
FILES = [
    ("phenotwin.json not JSON", _write(INFO_FILE, b"{kind: pixel"), "is corrupt"),
    ("phenotwin.json empty", _write(INFO_FILE, b""), "is corrupt"),
    ("phenotwin.json a list", _write(INFO_FILE, b"[1, 2]"), "expected a JSON object"),
    ("phenotwin.json binary", _write(INFO_FILE, bytes(range(256))), "is corrupt"),
    ("phenotwin.json missing", _remove(INFO_FILE), "is not a phenotwin checkpoint"),
    ("scheduler folder missing", _remove("scheduler"), "(the noise schedule). The checkpoint is incomplete"),
    ("scheduler config not JSON", _write("scheduler/scheduler_config.json", b"{"), "cannot load the noise schedule"),
    ("UNet config missing", _remove("unet/config.json"), "(UNet configuration). The checkpoint is incomplete"),
    ("UNet config not JSON", _write("unet/config.json", b"nonsense"), "cannot load the UNet"),
    ("UNet weights truncated", _truncate(UNET), "cannot load the UNet"),
    ("UNet weights garbage", _write(UNET, b"\0" * 64), "cannot load the UNet"),
    ("UNet weights missing", _remove(UNET), "has no .safetensors file"),
    ("UNet folder missing", _remove("unet"), "missing UNet folder"),
    ("pickled weights beside", _write("unet/diffusion_pytorch_model.bin", b"pickle"), "pickled weight files"),
]


@pytest.mark.parametrize("change, phrase", [c[1:] for c in FILES], ids=[c[0] for c in FILES])
def test_a_damaged_checkpoint_folder_is_refused(model, inputs, tmp_path, capsys, change, phrase):
    folder = _corrupt_copy(model, tmp_path)
    change(folder)
    out = tmp_path / "out"
    refused(translate(folder, [inputs], out), phrase, capsys, folder, inputs, out)


LORA = [
    ("adapter truncated", _truncate("unet_lora/adapter_model.safetensors"), "cannot load the LoRA adapter"),
    ("adapter garbage", _write("unet_lora/adapter_model.safetensors", b"\1" * 40), "cannot load the LoRA adapter"),
    ("adapter config missing", _remove("unet_lora/adapter_config.json"), "(LoRA adapter configuration)"),
    ("adapter config not JSON", _write("unet_lora/adapter_config.json", b"{"), "cannot load the LoRA adapter"),
    ("class embeddings truncated", _truncate("class_embeddings.safetensors"), "cannot load the class embeddings"),
    ("class embeddings missing", _remove("class_embeddings.safetensors"), "one learned embedding per condition"),
]


@pytest.mark.parametrize("change, phrase", [c[1:] for c in LORA], ids=[c[0] for c in LORA])
def test_a_damaged_lora_checkpoint_is_refused(lora_model, tmp_path, change, phrase):
    folder = tmp_path / lora_model.name
    shutil.copytree(lora_model, folder)
    shutil.copytree(lora_model.parent / f"{lora_model.name}-base", tmp_path / f"{lora_model.name}-base")
    change(folder)
    before = tree(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(folder)
    assert phrase in str(caught.value) and exit_code(caught.value) == 2
    assert tree(tmp_path) == before


def test_a_missing_base_model_is_named(lora_model, tmp_path):
    folder = tmp_path / "alone"
    shutil.copytree(lora_model, folder)  # without the base folder beside it
    with pytest.raises(CheckpointError, match="adapts the base model"):
        load_checkpoint(folder)


# -- phenotwin translate ------------------------------------------------------------------------------

FLAGS = [
    ("strength 0", ["--strength", "0"], "strength must be in (0, 1]"),
    ("strength above 1", ["--strength", "2"], "strength must be in (0, 1]"),
    ("strength NaN", ["--strength", "nan"], "strength must be in (0, 1]"),
    ("steps 0", ["--steps", "0"], "steps must be a whole number"),
    ("steps beyond the schedule", ["--steps", "100000"], "steps must be a whole number"),
    ("guidance negative", ["--guidance", "-1"], "guidance must be a number from 0"),
    ("guidance NaN", ["--guidance", "nan"], "guidance must be a number from 0"),
    ("guidance infinite", ["--guidance", "inf"], "guidance must be a number from 0"),
    ("seed negative", ["--seed", "-4"], "seed must be a whole number >= 0"),
    ("source unknown", ["--source", "Control"], "unknown condition 'Control'"),
    ("target unknown", ["--target", "drug"], "unknown condition 'drug'"),
    ("axes without Y", ["--axes", "CZX"], "it needs a Y and an X axis"),
    ("axes repeated", ["--axes", "YYX"], "a letter is repeated"),
    ("axes not letters", ["--axes", "C1X"], "letters only"),
    ("axes with C and S", ["--axes", "CSYX"], "both C and S"),
    ("channels too many", ["--channels", "0", "1", "2"], "the model takes 2 channel(s)"),
    ("channels too few", ["--channels", "1"], "the model takes 2 channel(s)"),
    ("channels negative", ["--channels", "-1", "0"], "different indices (0 or more)"),
    ("channels repeated", ["--channels", "0", "0"], "different indices (0 or more)"),
    ("channels beyond every file", ["--channels", "0", "5"], "fits none of the 2 input(s)"),
    ("axes that fit no file", ["--axes", "ZYX"], "fits none of the 2 input(s)"),
    ("device without CUDA", ["--device", "cuda:99"], "device 'cuda:99'"),
    ("unknown device", ["--device", "tpu"], "unknown device 'tpu'"),
]


@pytest.mark.parametrize("flags, phrase", [c[1:] for c in FLAGS], ids=[c[0] for c in FLAGS])
def test_bad_flags_stop_translate_up_front(model, inputs, tmp_path, capsys, flags, phrase):
    out = tmp_path / "out"
    argv = translate(model, [inputs], out)
    if flags[0] in argv:  # --source, --target, --steps or --device: replace the value
        argv[argv.index(flags[0]) + 1] = flags[1]
    else:
        argv += flags
    err = refused(argv, phrase, capsys, model, inputs, out)
    assert err.count("phenotwin: error:") == 1 and "skipped" not in err  # once, not once per file


def test_output_equal_to_the_input_folder_is_named(model, inputs, capsys):
    refused(translate(model, [inputs], inputs), "is the input", capsys, inputs)


def test_output_holding_the_input_folder_is_named(model, inputs, capsys):
    refused(translate(model, [inputs], inputs.parent), "holds the input", capsys, inputs.parent)


def test_an_input_file_inside_the_output_is_named(model, inputs, capsys):
    refused(translate(model, [inputs / "a.tif"], inputs), "holds the input", capsys, inputs)


def test_a_full_disk_stops_the_run_with_the_fix(model, inputs, tmp_path, capsys, monkeypatch):
    import errno

    import phenotwin.batch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(phenotwin.batch, "write_tiff", full)
    out, before = tmp_path / "out", tree(inputs)
    assert main(translate(model, [inputs], out)) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "run the same command again" in err and "Traceback" not in err
    assert err.count("phenotwin: error:") == 1 and "skipped" not in err  # stopped at the first, not once per file
    assert tree(inputs) == before and not list(out.glob("*.json")) and not list(out.glob("*.ome.tif"))


def test_output_that_is_a_file_is_refused(model, inputs, tmp_path, capsys):
    out = tmp_path / "results.tif"
    out.write_bytes(b"mine")
    refused(translate(model, [inputs], out), "is a file; give a folder", capsys, inputs, tmp_path)


def test_output_below_a_file_is_refused(model, inputs, tmp_path, capsys):
    (tmp_path / "notes").write_text("mine")
    refused(translate(model, [inputs], tmp_path / "notes" / "out"), "cannot write into --output", capsys,
            inputs, tmp_path)


def test_a_read_only_output_is_refused(model, inputs, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses even root
        out = Path("/sys/kernel")
        refused(translate(model, [inputs], out), "cannot write into --output", capsys, inputs)
        return
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        refused(translate(model, [inputs], out), "cannot write into --output", capsys, inputs, out)
    finally:
        out.chmod(stat.S_IRWXU)


def test_a_summary_csv_phenotwin_did_not_write_is_kept(model, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_text("well,count\nA01,12\n")
    refused(translate(model, [inputs], out), "was not written by phenotwin", capsys, inputs, out)


def test_no_images_and_a_missing_model_are_refused(model, inputs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(translate(model, [empty], tmp_path / "out"), "no images found", capsys, tmp_path)
    refused(translate(tmp_path / "nowhere", [inputs], tmp_path / "out"), "does not exist", capsys, inputs, tmp_path)
    (tmp_path / "model.json").write_text("{}")
    refused(translate(tmp_path / "model.json", [inputs], tmp_path / "out"), "is a file", capsys, inputs, tmp_path)


def test_a_file_as_checkpoint_is_refused(inputs, tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    refused(translate(tmp_path / "model.safetensors", [inputs], tmp_path / "out"), "is a file", capsys,
            inputs, tmp_path)


def test_other_settings_in_the_output_are_refused_without_overwrite(model, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(translate(model, [inputs / "a.tif"], out)) == 0
    capsys.readouterr()
    refused(translate(model, [inputs / "a.tif"], out, "--strength", "0.5"), "made with other settings", capsys,
            inputs, out)


# -- a fresh machine: GUI tests never skip ------------------------------------------------------------


def test_a_gui_test_without_a_screen_fails_and_says_how_to_get_one():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_evaluate_widget.py", "-x", "-q",
                             "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "make test" in result.stdout and ".ci/gui-packages" in result.stdout
    assert "skipped" not in result.stdout.splitlines()[-1]


def _fake_commands(folder: Path, uid: str, sudo_works: bool) -> dict[str, str]:
    """dpkg that knows no package, id, sudo and an apt-get that records what it was asked."""
    folder.mkdir()
    scripts = {"dpkg": "exit 1", "id": f"echo {uid}", "sudo": "exit 0" if sudo_works else "exit 1",
               "apt-get": f'echo "$@" >> {folder / "apt.log"}', "uname": "echo Linux"}
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:/usr/bin:/bin"}


def test_gui_packages_are_installed_when_the_machine_allows_it(tmp_path):
    env = _fake_commands(tmp_path / "bin", "0", sudo_works=False)
    result = subprocess.run([str(ROOT / ".ci" / "gui-packages")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "bin" / "apt.log").read_text()
    assert "install" in log and "xvfb" in log and "xauth" in log


def test_gui_packages_print_the_one_command_when_they_cannot_be_installed(tmp_path):
    env = _fake_commands(tmp_path / "bin", "1000", sudo_works=False)
    result = subprocess.run([str(ROOT / ".ci" / "gui-packages")], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "sudo apt-get update && sudo apt-get install -y --no-install-recommends xvfb xauth" in result.stderr
    assert not (tmp_path / "bin" / "apt.log").exists()


def test_make_test_and_ci_share_the_package_list():
    assert "gui-packages" in (ROOT / "Makefile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".ci/gui-packages" in ci and "make test" in ci and "apt-get" not in ci
