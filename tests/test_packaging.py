"""Packaging: the npe2 manifest, the wheel, lazy imports, sample data, and the documented commands."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DIST = "napari-phenotwin"
BIN = Path(sys.executable).parent  # the environment the tests run in (.venv/bin under `make test`)
HEAVY = ("torch", "diffusers", "peft", "accelerate", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6")


def _import_synthetic():
    """phenotwin.synthetic may still be being written by a colleague: wait a few minutes for it."""
    deadline = time.monotonic() + 240
    while True:
        try:
            return importlib.import_module("phenotwin.synthetic")
        except ImportError:
            if time.monotonic() > deadline:
                raise
            importlib.invalidate_caches()
            time.sleep(10)


# -- the manifest ------------------------------------------------------------------------


def test_manifest_inside_the_package_is_a_symlink_to_the_top_level_one():
    inside = ROOT / "src" / "phenotwin" / "napari.yaml"
    assert inside.is_symlink()
    assert os.readlink(inside) == "../../napari.yaml"
    assert inside.resolve() == (ROOT / "napari.yaml").resolve()
    assert inside.read_bytes() == (ROOT / "napari.yaml").read_bytes()


def test_npe2_validates_the_installed_plugin_with_imports():
    npe2 = BIN / "npe2"
    assert npe2.exists(), f"npe2 CLI not installed in {BIN}"
    result = subprocess.run(
        [str(npe2), "validate", DIST, "--imports"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout.lower() and "invalid" not in result.stdout.lower()


def test_installed_distribution_exposes_the_manifest_entry_point():
    from importlib.metadata import distribution

    points = [ep for ep in distribution(DIST).entry_points if ep.group == "napari.manifest"]
    assert [(ep.name, ep.value) for ep in points] == [(DIST, "phenotwin:napari.yaml")]


def test_manifest_loads_from_the_distribution_with_sample_data():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution(DIST)
    assert manifest.name == DIST
    samples = {sample.key: sample for sample in manifest.contributions.sample_data}
    assert set(samples) == {"demo-scene", "golgi-pairs", "subtle-pairs"}
    commands = {command.id: command for command in manifest.contributions.commands}
    for sample in samples.values():
        assert sample.command in commands, f"sample {sample.key} points at an undeclared command"
        module, _, function = commands[sample.command].python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_manifest_declares_a_reader_that_claims_only_saved_results(tmp_path):
    import tifffile
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution(DIST)
    reader, = manifest.contributions.readers
    commands = {command.id: command for command in manifest.contributions.commands}
    assert reader.filename_patterns == ["*.ome.tif", "*.ome.tiff"] and not reader.accepts_directories
    module, _, function = commands[reader.command].python_name.partition(":")
    get_reader = getattr(importlib.import_module(module), function)
    plain = tmp_path / "plain.ome.tif"
    tifffile.imwrite(plain, np.zeros((8, 8), np.uint16), ome=True)
    assert get_reader(str(plain)) is None and get_reader(str(tmp_path / "missing.ome.tif")) is None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(out.glob("napari_phenotwin-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return wheels[0]


def test_wheel_ships_the_manifest_as_a_real_file(wheel, tmp_path):
    import stat

    with zipfile.ZipFile(wheel) as archive:
        entry = archive.getinfo("phenotwin/napari.yaml")
        mode = entry.external_attr >> 16
        assert not stat.S_ISLNK(mode), "napari.yaml is a symlink inside the wheel"
        data = archive.read(entry)
    assert data == (ROOT / "napari.yaml").read_bytes()

    from npe2 import PluginManifest

    extracted = tmp_path / "napari.yaml"
    extracted.write_bytes(data)
    assert PluginManifest.from_file(extracted).name == DIST


def test_wheel_declares_the_manifest_entry_point(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        text = archive.read(entry_points).decode()
    section = text.split("[napari.manifest]", 1)
    assert len(section) == 2, text
    first_lines = [line.replace(" ", "") for line in section[1].strip().splitlines()]
    assert f"{DIST}=phenotwin:napari.yaml" in first_lines
    assert "phenotwin/__init__.py" in names and "phenotwin/_napari/samples.py" in names
    assert not [n for n in names if n.startswith(("tests/", ".venv/"))]


# -- lazy imports --------------------------------------------------------------------------


def test_importing_the_package_and_samples_stays_light():
    code = (
        "import sys\n"
        "import phenotwin\n"
        "import phenotwin._napari.samples\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported at startup: {result.stdout.strip()}"


def test_making_sample_data_stays_light():
    _import_synthetic()
    code = (
        "import sys\n"
        "from phenotwin._napari.samples import subtle_pairs\n"
        "assert len(subtle_pairs()) == 3\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported by the sample data: {result.stdout.strip()}"


def test_the_import_check_would_see_torch():
    """Guard for the two tests above: the same probe does report a heavy import."""
    code = f"import sys, torch\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "torch" in result.stdout.strip().split(",")


# -- sample data ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_layers():
    """Each sample, reached the way napari reaches it: manifest -> command -> function."""
    from npe2 import PluginManifest

    _import_synthetic()
    manifest = PluginManifest.from_distribution(DIST)
    commands = {command.id: command.python_name for command in manifest.contributions.commands}
    layers = {}
    for sample in manifest.contributions.sample_data:
        module, _, function = commands[sample.command].partition(":")
        layers[sample.key] = getattr(importlib.import_module(module), function)()
    return layers


@pytest.mark.parametrize("key", ["demo-scene", "golgi-pairs", "subtle-pairs"])
def test_sample_layers_have_the_expected_form(sample_layers, key):
    layers = sample_layers[key]
    assert [layer_type for _, _, layer_type in layers] == ["image", "image", "labels"]
    (control, control_meta, _), (treated, treated_meta, _), (mask, mask_meta, _) = layers
    assert control.shape == treated.shape and control.ndim == 3 and control.shape[0] == 2
    assert control.dtype == treated.dtype == np.uint16  # camera units, like the demo model's training data
    assert mask.shape == control.shape[1:]
    assert np.issubdtype(mask.dtype, np.integer) and set(np.unique(mask)) == {0, 1}
    for meta in (control_meta, treated_meta):
        assert meta["channel_axis"] == 0
        assert len(meta["name"]) == len(meta["colormap"]) == control.shape[0]
    conditions = {meta["metadata"]["phenotwin"]["condition"] for meta in (control_meta, treated_meta)}
    assert len(conditions) == 2
    assert all(np.isfinite(image).all() for image in (control, treated))


@pytest.mark.parametrize("key", ["demo-scene", "golgi-pairs", "subtle-pairs"])
def test_sample_conditions_differ_only_inside_the_change_mask(sample_layers, key):
    from scipy import ndimage as ndi

    synthetic = _import_synthetic()
    (control, _, _), (treated, _, _), (mask, _, _) = sample_layers[key]
    diff = np.abs(control.astype(np.float64) - treated.astype(np.float64)).max(axis=0) / 65535
    changed = mask.astype(bool)
    assert 0.001 < changed.mean() < 0.5  # a real, local change
    # inside the mask the treatment shows
    assert np.mean(diff[changed] > synthetic.MASK_THRESHOLD / 2) > 0.9
    # outside it, at most sub-threshold traces (PSF blur, intensity-dependent shot noise)
    assert diff[~changed].max() < 2 * synthetic.MASK_THRESHOLD
    # and away from it (farther than the PSF reaches) the same cells, bit for bit
    far = ~ndi.binary_dilation(changed, structure=np.ones((3, 3), bool), iterations=10)
    assert far.mean() > 0.3
    assert np.array_equal(control[:, far], treated[:, far])


def test_napari_accepts_the_sample_layers(sample_layers):
    from napari.components import ViewerModel

    viewer = ViewerModel()
    for data, meta, layer_type in sample_layers["golgi-pairs"]:
        getattr(viewer, f"add_{layer_type}")(data, **meta)
    kinds = [type(layer).__name__ for layer in viewer.layers]
    assert kinds == ["Image"] * 4 + ["Labels"]
    assert [layer.data.shape for layer in viewer.layers] == [(256, 256)] * 5
    assert viewer.layers[-1].name == "true change"
    assert len({layer.name for layer in viewer.layers}) == 5


# -- documented commands -----------------------------------------------------------------


def test_readme_documents_make_test_and_make_demo():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make test" in readme and "make demo" in readme
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = {line.split(":", 1)[0] for line in makefile.splitlines() if line and not line[0].isspace() and ":" in line}
    assert {"test", "demo"} <= targets


def test_ci_script_is_executable_and_runs_make_test():
    script = ROOT / ".ci" / "run"
    assert script.is_file() and os.access(script, os.X_OK)
    lines = script.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#!")
    commands = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    assert any(command.split()[:2] == ["make", "test"] for command in commands)
