"""Training images from napari layers (Qt-free): per-channel layers of a condition become multichannel images."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from phenotwin._napari import training_layers as tl
from phenotwin.errors import PhenotwinError


@dataclass
class FakeLayer:  # what napari's Image layer offers the builder: name, data, rgb, metadata
    name: str
    data: np.ndarray
    rgb: bool = False
    metadata: dict = field(default_factory=dict)


def plane(value: int, shape=(8, 8)) -> np.ndarray:
    """Random pixels (constant images are refused by the trainer), `value` at the corner: which layer it was."""
    image = np.random.default_rng(value).integers(200, 4000, shape).astype(np.uint16)
    image[0, 0] = value
    return image


def sample_groups():
    """Two images per condition, each a nucleus and a golgi layer, listed out of order."""
    control = [FakeLayer("control golgi 1", plane(12)), FakeLayer("control nucleus 1", plane(11)),
               FakeLayer("control nucleus 2", plane(21)), FakeLayer("control golgi 2", plane(22))]
    treated = [FakeLayer(f"noc {c} {i}", plane(100 + 10 * i + k), metadata={"phenotwin": {"condition": "noc"}})
               for i in (1, 2) for k, c in ((1, "nucleus"), (2, "golgi"))]
    return {"control": control, "nocodazole": treated}


def test_channels_are_guessed_from_the_names_and_paired_into_images():
    groups = sample_groups()
    channels = tl.guess_channels(groups)
    assert channels == ["golgi", "nucleus"]  # the first condition's order
    built = tl.build(groups, ["nucleus", "golgi"])
    control = built.images["control"]
    assert [image.shape for image in control] == [(2, 8, 8)] * 2
    # paired by the name without the channel: 'control 1' is nucleus 11 with golgi 12, 'control 2' 21 with 22
    assert [(int(im[0, 0, 0]), int(im[1, 0, 0])) for im in control] == [(11, 12), (21, 22)]
    assert [(int(im[0, 0, 0]), int(im[1, 0, 0])) for im in built.images["nocodazole"]] == [(111, 112), (121, 122)]
    assert built.summary() == "2-channel images (nucleus, golgi): control 2 images, nocodazole 2 images."


def test_the_preview_says_the_same_without_copying_pixels():
    groups = sample_groups()
    preview = tl.build(groups, ["nucleus", "golgi"], copy=False)
    assert preview.summary() == tl.build(groups, ["nucleus", "golgi"]).summary()
    assert all(image.strides == (0, 0, 0) for image in preview.images["control"])  # stand-ins, no memory


def test_layers_that_name_no_shared_channel_are_one_channel_images_each_plane_one_image():
    groups = {"control": [FakeLayer("ctrl 0", plane(1)), FakeLayer("ctrl 1", np.zeros((3, 8, 8), np.uint16))],
              "treated": [FakeLayer("noc 0", plane(2))]}
    assert tl.guess_channels(groups) == []
    built = tl.build(groups, [])
    assert [len(built.images[c]) for c in groups] == [4, 1] and built.images["control"][0].shape == (8, 8)
    assert built.summary().startswith("1-channel images") and "control 4 images, treated 1 image." in built.summary()


def test_bad_pairings_are_refused_naming_the_layer_and_the_fix():
    groups = sample_groups()
    groups["control"] = groups["control"][:3]  # 'control 2' has a nucleus but no golgi
    with pytest.raises(PhenotwinError, match=r"'control nucleus 2' has no golgi layer .*'control 2'"):
        tl.build(groups, ["nucleus", "golgi"])
    groups = sample_groups()
    groups["control"].append(FakeLayer("control actin 1", plane(0)))
    with pytest.raises(PhenotwinError, match="'control actin 1' .* holds none of the channels .*change Channels"):
        tl.build(groups, ["nucleus", "golgi"])
    groups = sample_groups()
    groups["control"][0] = FakeLayer("control golgi 1", plane(12, (8, 9)))
    with pytest.raises(PhenotwinError, match="differ in size"):
        tl.build(groups, ["nucleus", "golgi"])
    with pytest.raises(PhenotwinError, match="'nocodazole' has no layers"):
        tl.build({"control": sample_groups()["control"], "nocodazole": []}, [])


def test_written_folders_are_the_trainers_input(tmp_path):
    from phenotwin.train.data import load_condition_folders

    root = tl.build(sample_groups(), ["nucleus", "golgi"]).write(tmp_path / "data")
    data = load_condition_folders(root, min_size=8, channel_axis=0)
    assert data.classes == ["control", "nocodazole"] and data.channels == 2 and data.counts() == {
        "control": 2, "nocodazole": 2}
