"""Shared fixtures: tiny random checkpoints of each kind, built once per test session."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

KINDS = ["pixel", "latent", "stable-diffusion", "stable-diffusion-lora"]
NO_SCREEN = (
    "this GUI test needs a screen and there is none (no DISPLAY): run `make test`, which runs the tests under Xvfb "
    "and installs it when missing (or run `.ci/gui-packages`, which prints the one command that installs it), or "
    "`xvfb-run -a python -m pytest ...`. To leave the GUI tests out on purpose: -m 'not gui'."
)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A GUI test without a screen fails, saying how to get one, before the test modules' own
    skip can hide it: a fresh machine without Xvfb must not pass with the GUI tests skipped."""
    screen = os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM") == "offscreen"
    if item.get_closest_marker("gui") and not screen and sys.platform.startswith("linux"):
        pytest.fail(NO_SCREEN, pytrace=False)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine they only wait on each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    from phenotwin.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "pixel": make_tiny_checkpoint(root / "pixel", kind="pixel"),
        "latent": make_tiny_checkpoint(root / "latent", kind="latent"),
        "stable-diffusion": make_tiny_checkpoint(root / "sd", kind="stable-diffusion"),
        "stable-diffusion-lora": make_tiny_checkpoint(root / "sd-lora", kind="stable-diffusion", lora=True),
    }


@pytest.fixture(scope="session")
def translators(checkpoints):
    from phenotwin import Translator

    return {kind: Translator(path, device="cpu") for kind, path in checkpoints.items()}


@pytest.fixture
def cells():
    """A smooth two-channel 32x32 image in [0, 1], like a blurred fluorescence crop."""
    rng = np.random.default_rng(0)
    image = np.stack([gaussian_filter(rng.random((32, 32)), 2) for _ in range(2)])
    image -= image.min(axis=(1, 2), keepdims=True)
    image /= image.max(axis=(1, 2), keepdims=True)
    return image.astype(np.float32)
