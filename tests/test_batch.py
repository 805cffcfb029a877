"""`phenotwin translate` as a batch: real files, folders and globs, stacks, channel selection,
OME-TIFF provenance, the summary CSV, bad files, resume after a kill, accelerate sharding."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy.ndimage import gaussian_filter

import phenotwin.batch
from phenotwin.cli import main

PHENOTWIN = [sys.executable, "-m", "phenotwin"]
PERCENTILE = {"mode": "percentile", "low": 0.5, "high": 99.5}
STEPS = "4"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from phenotwin.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("models")
    return {n: make_tiny_checkpoint(root / f"model-{n}", channels=n, normalization=PERCENTILE) for n in (1, 2, 3)}


@pytest.fixture(scope="module")
def translators(models):
    from phenotwin import Translator

    return {n: Translator(path, device="cpu") for n, path in models.items()}


def cells(channels: int, seed: int = 0, size: int = 32, low: int = 200, high: int = 3200) -> np.ndarray:
    """A smooth 16-bit fluorescence-like (C, size, size) image."""
    rng = np.random.default_rng(seed)
    planes = [gaussian_filter(rng.random((size, size)), 2) for _ in range(channels)]
    return np.stack([(p - p.min()) / (p.max() - p.min()) * (high - low) + low for p in planes]).astype(np.uint16)


def write(path: Path, array: np.ndarray, axes: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    contig = axes is not None and axes[-1] in "CS"
    tifffile.imwrite(path, array, photometric="minisblack", planarconfig="contig" if contig else None,
                     metadata={"axes": axes} if axes else {})
    return path


def translate(model, inputs, out, *extra, target="treated"):
    return main(["translate", "--checkpoint", str(model), "--input", *map(str, inputs), "--source", "control",
                 "--target", target, "--output", str(out), "--steps", STEPS, "--device", "cpu", *extra])


def ome(path: Path) -> tuple[np.ndarray, str, dict]:
    """Pixels, OME axes and the provenance JSON stored in the OME-XML description."""
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome, f"{path} is not an OME-TIFF"
        root = ElementTree.fromstring(tif.ome_metadata)
        series = tif.series[0]
        data, axes = series.asarray(), series.axes
    namespace = root.tag.split("}")[0] + "}"
    description = root.find(f"{namespace}Image/{namespace}Description")
    return data, axes, json.loads(description.text)


def summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def skipped(stderr: str) -> dict[str, str]:
    reasons = {}
    for line in stderr.splitlines():
        if line.startswith("skipped "):
            path, _, reason = line[len("skipped "):].partition(": ")
            reasons[Path(path).name] = reason
    return reasons


def alone(translator, plane: np.ndarray, channel_axis=0) -> np.ndarray:
    return translator.translate(plane, "control", "treated", steps=int(STEPS), channel_axis=channel_axis).image


# -- stacks as planes (phenotwin.stacks) ----------------------------------------------------------


def test_plane_stack_selects_channels_and_puts_planes_back_in_the_input_order():
    from phenotwin import PhenotwinError
    from phenotwin.stacks import PlaneStack

    array = np.random.default_rng(0).random((2, 20, 24, 3))  # Z, Y, X, RGB samples
    stack = PlaneStack(array, "zyxs", channels=(2, 0))
    assert (stack.axes, stack.leading_axes, stack.plane_count) == ("ZYXS", "Z", 2)
    planes = list(stack.planes())
    assert [plane.shape for plane in planes] == [(2, 20, 24)] * 2
    np.testing.assert_array_equal(planes[1], np.moveaxis(array[1][..., [2, 0]], -1, 0))
    back, axes = stack.assemble(planes)
    assert axes == "ZYXC"
    np.testing.assert_array_equal(back, array[..., [2, 0]])
    heat, heat_axes = stack.assemble([plane.sum(axis=0) for plane in planes], with_channels=False)
    assert heat_axes == "ZYX" and heat.shape == (2, 20, 24)
    np.testing.assert_array_equal(heat[1], array[1][..., [2, 0]].sum(axis=-1))

    with pytest.raises(PhenotwinError, match="3 letter.*4 axes"):
        PlaneStack(array, "ZYX")
    with pytest.raises(PhenotwinError, match=r"pick indices from 0 to 2"):
        PlaneStack(array, "ZYXC", channels=(3,))
    with pytest.raises(PhenotwinError, match="no channel axis"):
        PlaneStack(array[..., 0], "ZYX", channels=(0,))


# -- outputs, provenance, CSV -------------------------------------------------------------------


def test_outputs_are_ome_tiff_with_provenance_and_a_summary_row(models, translators, tmp_path, capsys):
    image = cells(2)
    source = write(tmp_path / "in" / "field 1.tif", image, "CYX")
    before = source.read_bytes()
    out = tmp_path / "out"

    assert translate(models[2], [source], out, "--seed", "7") == 0

    translated, axes, meta = ome(out / "field 1_tif_treated.ome.tif")
    heatmap, heatmap_axes, heatmap_meta = ome(out / "field 1_tif_treated_heatmap.ome.tif")
    assert (axes, translated.dtype, translated.shape) == ("CYX", np.uint16, image.shape)
    assert (heatmap_axes, heatmap.dtype, heatmap.shape) == ("YX", np.float32, image.shape[1:])
    np.testing.assert_array_equal(translated, alone(translators[2], image))
    assert translated.max() > 1000  # microscope units, not model range
    assert heatmap.min() >= 0 and heatmap.max() > 0
    assert source.read_bytes() == before  # the input is never touched
    for provenance in (meta, heatmap_meta):
        assert provenance["source"] == "control" and provenance["target"] == "treated"
        assert provenance["steps"] == 4 and provenance["seed"] == 7
        assert provenance["checkpoint"] == translators[2].checkpoint_id
        assert provenance["checkpoint_path"] == str(models[2].resolve())
        assert provenance["phenotwin_version"] == phenotwin.__version__
        assert provenance["input"] == str(source) and provenance["input_axes"] == "CYX"
        assert provenance["settings"]["strength"] == 1.0 and provenance["settings"]["steps"] == 4
    assert sorted(p.name for p in out.iterdir()) == [
        "field 1_tif_treated.json", "field 1_tif_treated.ome.tif", "field 1_tif_treated_heatmap.ome.tif", "summary.csv"]

    [row] = summary(out)
    assert row["input"] == str(source) and row["status"] == "done" and row["planes"] == "1"
    assert float(row["reconstruction_psnr"]) == pytest.approx(meta["reconstruction_psnr"], abs=1e-5)
    assert 15 < float(row["reconstruction_psnr"]) < 100
    assert float(row["mean_change"]) == pytest.approx(float(heatmap.mean()), rel=1e-4)
    for channel in ("c0", "c1"):
        assert 0 < float(row[f"mean_change_{channel}"]) < float(row[f"p99_change_{channel}"])
    assert (out / row["translated"]).is_file() and (out / row["heatmap"]).is_file()
    assert "reconstruction PSNR" in capsys.readouterr().out


def test_sixteen_bit_three_channels_keep_dtype_range_and_layout(models, translators, tmp_path):
    image = cells(3, seed=3, low=1000, high=60000)
    first = write(tmp_path / "first.tif", image, "CYX")
    last = write(tmp_path / "last.tif", np.moveaxis(image, 0, -1), "YXC")
    out = tmp_path / "out"
    assert translate(models[3], [first, last], out) == 0

    channels_first, axes, _ = ome(out / "first_tif_treated.ome.tif")
    assert (axes, channels_first.dtype, channels_first.shape) == ("CYX", np.uint16, (3, 32, 32))
    channels_last = tifffile.imread(out / "last_tif_treated.ome.tif")
    assert channels_last.dtype == np.uint16 and channels_last.shape == (32, 32, 3)
    np.testing.assert_array_equal(np.moveaxis(channels_last, -1, 0), channels_first)
    # the whole 16-bit range of each channel survives, not squeezed into 8 bits or model range
    for channel in range(3):
        assert channels_first[channel].max() > 40000 and channels_first[channel].min() < 20000
    np.testing.assert_array_equal(channels_first, alone(translators[3], image))


# -- stacks and channels ---------------------------------------------------------------------------


def test_a_stack_translates_plane_by_plane_and_keeps_its_axes(models, translators, tmp_path):
    stack = np.stack([np.stack([cells(2, seed=10 * t + z) for z in range(2)]) for t in range(2)])  # (T, Z, C, Y, X)
    source = write(tmp_path / "movie.ome.tif", stack, "TZCYX")
    out = tmp_path / "out"
    assert translate(models[2], [source], out) == 0

    translated, axes, meta = ome(out / "movie_ome.tif_treated.ome.tif")
    heatmap, heatmap_axes, _ = ome(out / "movie_ome.tif_treated_heatmap.ome.tif")
    assert (axes, translated.shape, translated.dtype) == ("TZCYX", stack.shape, np.uint16)
    assert (heatmap_axes, heatmap.shape) == ("TZYX", (2, 2, 32, 32))
    for t in range(2):
        for z in range(2):
            np.testing.assert_array_equal(translated[t, z], alone(translators[2], stack[t, z]))
    assert not np.array_equal(translated[0, 0], translated[1, 1])  # planes are not all the same result
    assert len(meta["plane_reconstruction_psnr"]) == 4
    assert summary(out)[0]["planes"] == "4"


def test_unrecorded_axes_need_the_axes_option(models, translators, tmp_path, capsys):
    stack = cells(3, seed=5)  # three z planes of a one-channel model, in a plain TIFF: axes unknown
    source = write(tmp_path / "z.tif", stack)
    out = tmp_path / "out"
    assert translate(models[1], [source], out) == 1
    reason = skipped(capsys.readouterr().err)["z.tif"]
    assert "--axes" in reason and "not recorded" in reason

    assert translate(models[1], [source], out, "--axes", "ZYX") == 0
    translated, axes, _ = ome(out / "z_tif_treated.ome.tif")
    assert axes == "ZYX" and translated.shape == stack.shape
    for z in range(3):
        np.testing.assert_array_equal(translated[z], alone(translators[1], stack[z], channel_axis=None))


def test_channel_selection_feeds_the_chosen_channels(models, translators, tmp_path, capsys):
    image = cells(3, seed=2)
    source = write(tmp_path / "three.tif", image, "CYX")
    out = tmp_path / "out"
    assert translate(models[2], [source], out) == 1  # three channels for a two-channel model
    reason = skipped(capsys.readouterr().err)["three.tif"]
    assert "3 channel(s)" in reason and "--channels" in reason

    assert translate(models[2], [source], out, "--channels", "0", "2") == 0
    translated, axes, meta = ome(out / "three_tif_treated.ome.tif")
    assert axes == "CYX" and translated.shape == (2, 32, 32)
    np.testing.assert_array_equal(translated, alone(translators[2], image[[0, 2]]))
    assert meta["channels"] == [0, 2]
    assert not np.array_equal(translated, alone(translators[2], image[[0, 1]]))  # the selection matters


def test_rgb_png_with_channel_selection(models, translators, tmp_path):
    from skimage.io import imsave

    rgb = (np.moveaxis(cells(3, seed=4), 0, -1) // 256).astype(np.uint8)
    source = tmp_path / "rgb.png"
    imsave(source, rgb, check_contrast=False)
    out = tmp_path / "out"
    assert translate(models[2], [source], out, "--channels", "1", "2") == 0
    translated, _, meta = ome(out / "rgb_png_treated.ome.tif")
    assert translated.dtype == np.uint8 and translated.shape == (32, 32, 2)  # channels stay last, as in the input
    assert meta["input_axes"] == "YXS"
    np.testing.assert_array_equal(translated, alone(translators[2], rgb[..., 1:], channel_axis=-1))


# -- bad files, names, folders and globs -----------------------------------------------------


def test_bad_files_are_reported_in_stderr_and_csv_and_skipped(models, tmp_path, capsys):
    folder = tmp_path / "in"
    good = write(folder / "good.tif", cells(2, seed=1), "CYX")
    (folder / "garbage.tif").write_bytes(np.random.default_rng(0).bytes(3000))
    write(folder / "gray.tif", cells(1)[0])
    nan = cells(2).astype(np.float32)
    nan[0, 3, 3] = np.nan
    write(folder / "nan.tif", nan, "CYX")
    write(folder / "tiny.tif", cells(2, size=8), "CYX")
    missing = tmp_path / "missing.tif"
    out = tmp_path / "out"

    assert translate(models[2], [folder, missing], out) == 1

    reasons = skipped(capsys.readouterr().err)
    assert set(reasons) == {"garbage.tif", "gray.tif", "nan.tif", "tiny.tif", "missing.tif"}
    assert "cannot read" in reasons["garbage.tif"]
    assert "1 channel(s)" in reasons["gray.tif"] and "trained on 2" in reasons["gray.tif"]
    assert "NaN" in reasons["nan.tif"]
    assert "8x8" in reasons["tiny.tif"]
    assert "does not exist" in reasons["missing.tif"]
    rows = {Path(row["input"]).name: row for row in summary(out)}
    assert set(rows) == set(reasons) | {"good.tif"}
    assert rows["good.tif"]["status"] == "done"
    for name in reasons:
        assert rows[name]["status"] == "failed" and rows[name]["message"] == reasons[name]
        assert rows[name]["translated"] == ""
    # outputs mirror the inputs' folders below their common parent (tmp_path)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tif")) == [
        "in/good_tif_treated.ome.tif", "in/good_tif_treated_heatmap.ome.tif"]
    assert tifffile.imread(out / "in" / "good_tif_treated.ome.tif").shape == (2, 32, 32)
    assert good.is_file()


def test_folders_globs_and_same_names_in_different_folders(models, tmp_path):
    root = tmp_path / "plates"
    a = write(root / "plate1" / "A01.tif", cells(2, seed=1), "CYX")
    b = write(root / "plate2" / "A01.tif", cells(2, seed=2), "CYX")
    c = write(root / "plate2" / "site" / "B01.tif", cells(2, seed=3), "CYX")
    (root / "plate2" / "notes.txt").write_text("not an image")

    out = tmp_path / "folders"
    assert translate(models[2], [root / "plate1", root / "plate2"], out) == 0
    assert [row["input"] for row in summary(out)] == [str(a), str(b)]  # no recursion without --recursive
    first, second = (tifffile.imread(out / p / "A01_tif_treated.ome.tif") for p in ("plate1", "plate2"))
    assert not np.array_equal(first, second)  # two outputs, one per input, none overwritten

    out = tmp_path / "recursive"
    assert translate(models[2], [root], out, "--recursive") == 0
    assert [row["input"] for row in summary(out)] == [str(a), str(b), str(c)]
    assert (out / "plate2" / "site" / "B01_tif_treated.ome.tif").is_file()

    out = tmp_path / "glob"
    assert translate(models[2], [f"{root}/**/*01.tif"], out) == 0
    assert sorted(row["input"] for row in summary(out)) == sorted(map(str, (a, b, c)))

    from skimage.io import imsave

    rgb = (np.moveaxis(cells(3, seed=4), 0, -1) // 256).astype(np.uint8)
    imsave(root / "plate1" / "A01.png", rgb, check_contrast=False)  # same stem, same folder: the suffix is kept
    out = tmp_path / "suffixes"
    assert translate(models[2], [root / "plate1"], out, "--channels", "0", "1") == 0
    assert tifffile.imread(out / "A01_tif_treated.ome.tif").shape == (2, 32, 32)
    assert tifffile.imread(out / "A01_png_treated.ome.tif").shape == (32, 32, 2)
    (root / "plate1" / "A01.png").unlink()

    inside = root / "plate1" / "results"  # an output folder inside the input folder is not read back
    assert translate(models[2], [root / "plate1"], inside, "--recursive") == 0
    assert translate(models[2], [root / "plate1"], inside, "--recursive") == 0
    assert [row["input"] for row in summary(inside)] == [str(a)]


def test_every_input_has_its_own_output_stable_across_reruns(models, translators, tmp_path, capsys):
    from skimage.io import imsave

    folder = tmp_path / "in"
    images = {name: cells(1, seed=k)[0] for k, name in enumerate(("a.tif", "a_tif.tif", "a.png"))}
    for name, image in images.items():
        if name.endswith(".png"):
            images[name] = (image // 256).astype(np.uint8)
            imsave(folder / name, images[name], check_contrast=False)
        else:
            write(folder / name, image)
    out = tmp_path / "out"
    assert translate(models[1], [folder], out) == 0
    rows = {Path(row["input"]).name: row for row in summary(out)}
    assert len({row["translated"] for row in rows.values()}) == 3  # no two share a file
    for name, image in images.items():  # each file holds its own input's translation, and its row its metrics
        _, _, meta = ome(out / rows[name]["translated"])
        assert meta["input"] == str(folder / name)
        np.testing.assert_array_equal(tifffile.imread(out / rows[name]["translated"]),
                                      alone(translators[1], image, channel_axis=None))
        assert float(rows[name]["reconstruction_psnr"]) == pytest.approx(meta["reconstruction_psnr"], abs=1e-5)
    names = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert translate(models[1], [folder / "a_tif.tif"], out) == 0  # a subset: the same names, nothing redone
    assert "translated 0, already done 1" in capsys.readouterr().out
    assert translate(models[1], [folder], out) == 0
    assert "translated 0, already done 3" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == names


def test_a_rerun_on_a_subset_keeps_the_other_rows_of_the_summary(models, tmp_path, capsys):
    inputs = [write(tmp_path / "in" / f"{i}.tif", cells(2, seed=i), "CYX") for i in range(3)]
    out = tmp_path / "out"
    assert translate(models[2], inputs[:2], out) == 0
    first = summary(out)
    assert translate(models[2], inputs[1:2], out) == 0  # the rows of 0.tif stay
    assert summary(out) == first
    assert translate(models[2], inputs[2:], out) == 0  # a new input is added, the others kept
    assert summary(out)[:2] == first and [row["input"] for row in summary(out)] == list(map(str, inputs))
    assert translate(models[2], inputs[:1], out, target="control") == 0  # another target: rows of its own
    assert [(Path(row["input"]).name, row["target"]) for row in summary(out)] == [
        ("0.tif", "treated"), ("1.tif", "treated"), ("2.tif", "treated"), ("0.tif", "control")]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic writes leave no temporary file


def test_condition_names_never_leave_the_output_folder(tmp_path, capsys):
    from phenotwin.testing import make_tiny_checkpoint

    escape = "../../../escaped"
    model = make_tiny_checkpoint(tmp_path / "model", channels=1, classes=("control", escape),
                                 normalization=PERCENTILE)
    source = write(tmp_path / "in" / "a.tif", cells(1)[0])
    out = tmp_path / "deep" / "er" / "out"
    assert translate(model, [source], out, target=escape) == 0
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(model)
                     and p != source)
    assert written and all(p.is_relative_to(out) for p in written)
    [row] = summary(out)
    assert "/" not in row["translated"] and ".." not in row["translated"].split("_")[0]
    _, _, meta = ome(out / row["translated"])
    assert meta["target"] == escape and row["target"] == escape  # provenance keeps the real name


def test_no_images_is_an_error(models, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert translate(models[2], [tmp_path / "empty"], tmp_path / "out") == 2
    assert "no images found" in capsys.readouterr().err


# -- resume ------------------------------------------------------------------------------------------


def test_a_second_run_computes_only_what_is_missing(models, tmp_path, monkeypatch, capsys):
    inputs = [write(tmp_path / "in" / f"{i}.tif", cells(2, seed=i), "CYX") for i in range(3)]
    out = tmp_path / "out"
    assert translate(models[2], inputs[:2], out) == 0
    first = summary(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.csv"}

    computed = []
    real = phenotwin.batch.translate_file

    def counting(translator, job, *args, **kwargs):
        computed.append(job.input.name)
        return real(translator, job, *args, **kwargs)

    monkeypatch.setattr(phenotwin.batch, "translate_file", counting)
    assert translate(models[2], inputs, out) == 0
    assert computed == ["2.tif"]
    assert "translated 1, already done 2, failed 0" in capsys.readouterr().out
    assert summary(out)[:2] == first and summary(out)[2]["status"] == "done"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in stamps} == stamps

    (out / "1_tif_treated_heatmap.ome.tif").unlink()  # an incomplete result is redone
    computed.clear()
    assert translate(models[2], inputs, out) == 0
    assert computed == ["1.tif"]

    computed.clear()  # other settings into the same folder: refused, then redone on request
    assert translate(models[2], inputs, out, "--strength", "0.5") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "strength: 1.0 then, 0.5 now" in err and "--overwrite" in err
    assert computed == []
    assert translate(models[2], inputs, out, "--strength", "0.5", "--overwrite") == 0
    assert computed == ["0.tif", "1.tif", "2.tif"]
    assert all(ome(out / f"{i}_tif_treated.ome.tif")[2]["strength"] == 0.5 for i in range(3))


def test_confine_is_a_setting_of_the_run(models, tmp_path, capsys):
    source = write(tmp_path / "in" / "f.tif", cells(2), "CYX")
    out = tmp_path / "out"
    assert translate(models[2], [source], out) == 0
    free, _, meta = ome(out / "f_tif_treated.ome.tif")
    assert meta["confine"] is False  # the model's default
    assert translate(models[2], [source], out, "--confine") == 2
    assert "confine: False then, True now" in capsys.readouterr().err
    assert translate(models[2], [source], out, "--confine", "--overwrite") == 0
    confined, _, meta = ome(out / "f_tif_treated.ome.tif")
    assert meta["confine"] is True
    original = tifffile.imread(source).astype(float)
    assert np.abs(confined - original).sum() < np.abs(free.astype(float) - original).sum()


def _run_until(args, reached, sig):
    """Start `phenotwin translate` in a child, send `sig` once `reached()` holds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the child gets PYTHONPATH and everything else too
    process = subprocess.Popen([*PHENOTWIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not reached():
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


@pytest.mark.slow
def test_resume_after_kill_and_clean_interrupt(models, tmp_path):
    inputs = [write(tmp_path / "in" / f"{i}.tif", cells(2, seed=i), "CYX") for i in range(4)]
    out = tmp_path / "out"
    # 40 steps make an image take a second or more, so the kill lands between images 1 and 4
    args = ["translate", "--checkpoint", str(models[2]), "--input", str(tmp_path / "in"), "--source", "control",
            "--target", "treated", "--output", str(out), "--steps", "40", "--device", "cpu"]
    code, _, stderr = _run_until(args, lambda: len(list(out.glob("*.json"))) >= 1, signal.SIGKILL)
    assert code == -signal.SIGKILL, stderr[-2000:]
    killed = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert 1 <= len(killed) < 4

    code, _, stderr = _run_until(args, lambda: len(list(out.glob("*.json"))) > len(killed), signal.SIGINT)
    assert code == 130, stderr[-2000:]
    assert "interrupted" in stderr and "run the same command again" in stderr
    interrupted = {p.name for p in out.glob("*.json")}
    assert {row["input"] for row in summary(out)} == {str(tmp_path / "in" / name.replace("_tif_treated.json", ".tif"))
                                                      for name in interrupted}

    result = subprocess.run([*PHENOTWIN, *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"translated {4 - len(interrupted)}, already done {len(interrupted)}, failed 0" in result.stdout
    assert {name: (out / name).stat().st_mtime_ns for name in killed} == killed  # finished images not redone
    rows = summary(out)
    assert [row["input"] for row in rows] == list(map(str, inputs)) and {row["status"] for row in rows} == {"done"}
    for i in range(4):
        assert tifffile.imread(out / f"{i}_tif_treated.ome.tif").shape == (2, 32, 32)


# -- sharding with accelerate ------------------------------------------------------------------------


@pytest.mark.slow
def test_accelerate_two_processes_write_what_one_process_writes(models, tmp_path):
    folder = tmp_path / "in"
    for i in range(3):
        write(folder / f"{i}.tif", cells(2, seed=i), "CYX")
    write(folder / "stack.tif", np.stack([cells(2, seed=7), cells(2, seed=8)]), "ZCYX")
    (folder / "broken.tif").write_bytes(b"not a tiff")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["translate", "--checkpoint", str(models[2]), "--input", str(folder), "--source", "control",
              "--target", "treated", "--steps", STEPS, "--device", "cpu"]

    single = subprocess.run([*PHENOTWIN, *common, "--output", str(tmp_path / "one")], capture_output=True,
                            text=True, timeout=300, env=env)
    with socket.socket() as probe:  # a free port: other test runs may be using accelerate's default one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # --multi_gpu is accelerate's torchrun launcher; on a machine without CUDA the two
    # processes form a CPU (gloo) group. `--cpu --num_processes 2` would start one process.
    sharded = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "phenotwin", *common,
         "--output", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert single.returncode == 1, single.stderr[-3000:]  # the broken file
    assert sharded.returncode != 0, sharded.stderr[-3000:]  # accelerate passes the failure on
    # each image is translated once, by one of two processes
    assert single.stdout.count("reconstruction PSNR") == sharded.stdout.count("reconstruction PSNR") == 4
    assert sharded.stderr.count("skipped ") == 1
    assert "images: 100%|██████████| 3/3" in sharded.stderr and "images: 100%|██████████| 2/2" in sharded.stderr

    one, two = tmp_path / "one", tmp_path / "two"
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert len(files) == 5 * 1 + 4 * 2 + 1  # a record per input, two images per good input, the CSV
    for name in files:
        if name.suffix == ".tif":
            np.testing.assert_array_equal(tifffile.imread(one / name), tifffile.imread(two / name))
    assert (one / "summary.csv").read_text() == (two / "summary.csv").read_text()
    assert len(summary(two)) == 5


def test_the_summary_says_whether_each_image_fits_and_strict_fit_refuses_those_that_do_not(tmp_path, capsys):
    """A [0, 1] float export of camera images, given to the demo model (trained on 16-bit units):
    translated but flagged in summary.csv; refused with --strict-fit; fitting with --match-intensities."""
    from phenotwin.assets import demo_model_path
    from phenotwin.synthetic import as_camera_units, make_pairs

    pairs = make_pairs(1, size=64, channels=2, seed=0, start=100_000)
    inputs = tmp_path / "in"
    inputs.mkdir()
    tifffile.imwrite(inputs / "scaled.tif", pairs.control[0], metadata={"axes": "CYX"})
    tifffile.imwrite(inputs / "camera.tif", as_camera_units(pairs.control[0]), metadata={"axes": "CYX"})
    base = ["translate", "--checkpoint", str(demo_model_path()), "--input", str(inputs), "--source", "control",
            "--target", "nocodazole", "--steps", "4", "--device", "cpu"]
    assert main([*base, "--output", str(tmp_path / "out")]) == 0
    rows = {Path(row["input"]).name: row for row in summary(tmp_path / "out")}
    assert rows["scaled.tif"]["input_fit"] == "does-not-fit" and rows["scaled.tif"]["trust"] == "does-not-fit"
    assert rows["camera.tif"]["input_fit"] == "ok"
    assert main([*base, "--output", str(tmp_path / "strict"), "--strict-fit"]) == 1
    rows = {Path(row["input"]).name: row for row in summary(tmp_path / "strict")}
    assert rows["scaled.tif"]["status"] == "failed" and "--strict-fit" in rows["scaled.tif"]["message"]
    assert rows["camera.tif"]["status"] == "done"
    assert not list((tmp_path / "strict").glob("scaled*.ome.tif"))  # nothing written for the refused file
    assert main([*base, "--output", str(tmp_path / "matched"), "--match-intensities"]) == 0
    rows = {Path(row["input"]).name: row for row in summary(tmp_path / "matched")}
    assert rows["scaled.tif"]["input_fit"] == "ok"
