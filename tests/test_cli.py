"""The `phenotwin` command: help, translate setting errors and exit codes, demo (batch runs: test_batch.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy.ndimage import gaussian_filter

from phenotwin.cli import build_parser, main

BIN = Path(sys.executable).parent
PERCENTILE = {"mode": "percentile", "low": 0.5, "high": 99.5}


def _subcommands() -> list[str]:
    import argparse

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from phenotwin.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("models")
    return {
        2: make_tiny_checkpoint(root / "two-channel", channels=2, normalization=PERCENTILE),
        1: make_tiny_checkpoint(root / "one-channel", channels=1, normalization=PERCENTILE),
    }


def _cells(channels: int, seed: int = 0) -> np.ndarray:
    """A smooth 16-bit fluorescence-like image, (C, 32, 32), or (32, 32) for one channel."""
    rng = np.random.default_rng(seed)
    planes = [gaussian_filter(rng.random((32, 32)), 2) for _ in range(channels)]
    image = np.stack([(p - p.min()) / (p.max() - p.min()) * 3000 + 200 for p in planes]).astype(np.uint16)
    return image[0] if channels == 1 else image


def _description(path: Path) -> dict:
    """The provenance JSON stored in the OME-XML image description."""
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        root = ElementTree.fromstring(tif.ome_metadata)
    namespace = root.tag.split("}")[0] + "}"
    description = root.find(f"{namespace}Image/{namespace}Description")
    assert description is not None and description.text
    return json.loads(description.text)


def _translate(checkpoint, inputs, out, *extra, source="control", target="treated"):
    return main([
        "translate", "--checkpoint", str(checkpoint), "--input", *map(str, inputs), "--source", source,
        "--target", target, "--output", str(out), "--steps", "4", "--device", "cpu", *extra,
    ])


# -- help ---------------------------------------------------------------------------------


def test_console_script_help():
    script = BIN / "phenotwin"
    assert script.exists(), f"the phenotwin console script is not installed in {BIN}"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: phenotwin")
    for command in _subcommands():
        assert command in result.stdout


def test_the_documented_subcommands_exist():
    assert {"demo", "translate"} <= set(_subcommands())


@pytest.mark.parametrize("command", _subcommands())
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: phenotwin {command}")
    assert "--help" in out


def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: phenotwin" in capsys.readouterr().err


# -- translate ----------------------------------------------------------------------------


def test_unknown_class_is_an_error_naming_the_known_ones(models, tmp_path, capsys):
    source = tmp_path / "a.tif"
    tifffile.imwrite(source, _cells(2), photometric="minisblack", metadata={"axes": "CYX"})
    out = tmp_path / "out"
    assert _translate(models[2], [source], out, target="mutant") == 2
    err = capsys.readouterr().err
    assert "phenotwin: error:" in err and "'mutant'" in err
    assert "'control', 'treated'" in err
    assert not out.exists() or not any(out.iterdir())


def test_bad_setting_is_an_error_not_a_skip(models, tmp_path, capsys):
    source = tmp_path / "a.tif"
    tifffile.imwrite(source, _cells(2), photometric="minisblack", metadata={"axes": "CYX"})
    assert _translate(models[2], [source], tmp_path / "out", "--strength", "1.5") == 2
    assert "strength must be in (0, 1]" in capsys.readouterr().err


def test_missing_checkpoint_is_an_error(tmp_path, capsys):
    source = tmp_path / "a.tif"
    tifffile.imwrite(source, _cells(2), photometric="minisblack")
    assert _translate(tmp_path / "no-model", [source], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


# -- demo ----------------------------------------------------------------------------------


def test_demo_without_a_shipped_model(tmp_path, monkeypatch, capsys):
    import phenotwin.assets

    monkeypatch.setattr(phenotwin.assets, "demo_model_path", lambda: None)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "-n", "1", "--steps", "3", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "untrained" in captured.err.lower()
    assert "wrote 1 translations" in captured.out

    png = out / "overview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from skimage.io import imread

    overview = imread(png)
    assert overview.ndim == 3 and overview.shape[0] > 64 and overview.shape[1] > 5 * 64
    assert overview[..., :3].std() > 1  # not a blank canvas

    summary = json.loads((out / "summary.json").read_text())
    assert "untrained" in summary["model"].lower()
    assert [image["name"] for image in summary["images"]] == ["cell_00"]
    assert np.isfinite(summary["images"][0]["reconstruction_psnr"])
    assert summary["checkpoint"].startswith("untrained-model@")

    tiffs = sorted(p.name for p in out.glob("*.tif"))
    assert len(tiffs) >= 4, tiffs
    translated = next(out.glob("cell_00_*_translated.tif"))
    assert tifffile.imread(translated).shape == (2, 64, 64)
    assert tifffile.imread(out / "cell_00_heatmap.tif").shape == (64, 64)
    assert _description(translated)["steps"] == 3


def test_demo_can_run_twice_into_the_same_folder(tmp_path, monkeypatch, capsys):
    import phenotwin.assets

    monkeypatch.setattr(phenotwin.assets, "demo_model_path", lambda: None)
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "-n", "1", "--steps", "2", "--device", "cpu"]
    assert main(args) == 0
    first = json.loads((out / "summary.json").read_text())
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text()) == first  # deterministic
