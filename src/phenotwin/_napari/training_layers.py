"""Training images from napari layers: per-channel layers of a condition become multichannel images.

A condition's layers are either one image each (grayscale; a layer with planes gives one image
per plane), or, when a channel list is given, per-channel layers that are put together: the
layer whose name holds the channel's name feeds that channel, and layers whose names are the same
without it ("control nucleus 2", "control golgi 2" -> "control 2") make one image. The channel
list is guessed from the names (`guess_channels`) and said before training (`BuiltData.summary`).
Duck-typed on the layers (name, data, rgb, metadata), so this module imports neither Qt nor torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phenotwin.errors import PhenotwinError

ROLE_KEY = "phenotwin"  # the layers' metadata key, as in layers.py (not imported: it imports napari)


def _words(text: str) -> list[str]:
    return [word for word in re.split(r"[\s_\-]+", text.lower()) if word]


def layer_condition(layer) -> str | None:
    """The condition a layer says it shows (its metadata), if any."""
    return (getattr(layer, "metadata", None) or {}).get(ROLE_KEY, {}).get("condition")


def _channel_part(layer, condition: str) -> list[str]:
    """The words of a layer's name that are neither the condition's nor a number: its channel, if any."""
    drop = set(_words(condition)) | set(_words(layer_condition(layer) or ""))
    return [word for word in _words(layer.name) if word not in drop and not word.isdigit()]


def guess_channels(groups: dict[str, list[Any]]) -> list[str]:
    """The channel names shared by every condition's layers ('control nucleus', 'nocodazole golgi', ...
    -> ['nucleus', 'golgi']), in the order of the first condition's layers; [] when the names do not
    say (then each layer is one grayscale image)."""
    per_condition = []
    for condition, chosen in groups.items():
        if not chosen:
            return []
        parts = [" ".join(_channel_part(layer, condition)) for layer in chosen]
        if not all(parts):
            return []
        per_condition.append(list(dict.fromkeys(parts)))
    if not per_condition or len(per_condition[0]) < 2:
        return []
    first = per_condition[0]
    return first if all(set(parts) == set(first) for parts in per_condition) else []


def parse_channels(text: str) -> list[str]:
    """'nucleus, golgi' -> ['nucleus', 'golgi'] (the Channels box)."""
    return [name.strip() for name in re.split(r"[,;]", text) if name.strip()]


@dataclass
class BuiltData:
    """The training images built from layers: per condition, (C, H, W) arrays (or (H, W) for one channel)."""

    channels: list[str]  # [] for one grayscale channel
    images: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @property
    def channel_count(self) -> int:
        first = next((images[0] for images in self.images.values() if images), None)
        return 1 if first is None or first.ndim == 2 else first.shape[0]

    def summary(self) -> str:
        """'2-channel images (nucleus, golgi): control 1 image, nocodazole 1 image.'"""
        counts = ", ".join(f"{condition} {len(images)} image{'s' * (len(images) != 1)}"
                           for condition, images in self.images.items())
        if self.channels:
            kind = f"{len(self.channels)}-channel images ({', '.join(self.channels)})"
        else:
            kind = "1-channel images (each layer, or each plane of one, is an image)" if self.channel_count == 1 \
                else f"{self.channel_count}-channel images"
        return f"{kind}: {counts}."

    def write(self, root: Path) -> Path:
        """One TIFF per image, one subfolder per condition: the trainer's input (channels first)."""
        import tifffile

        root.mkdir(parents=True, exist_ok=True)
        for condition, images in self.images.items():
            folder = root / condition
            folder.mkdir()
            for i, image in enumerate(images):
                tifffile.imwrite(folder / f"{i:04d}.tif", image)
        return root


def _planes(layer, copy: bool = True) -> list[np.ndarray]:
    """A grayscale layer's 2-D planes (copies); an RGB layer as one (3, H, W) image. Without `copy`,
    stand-ins of the same shapes that hold no memory (what the dock says before training)."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    shape, dtype = tuple(data.shape), np.dtype(getattr(data, "dtype", np.float32))
    if getattr(layer, "rgb", False):
        if len(shape) != 3:
            raise PhenotwinError(f"the RGB layer {layer.name!r} has planes; pick a 2-D RGB layer or split it.")
        return [np.moveaxis(np.asarray(data)[..., :3], -1, 0).copy() if copy else _stand_in((3, *shape[:2]), dtype)]
    if len(shape) < 2:
        raise PhenotwinError(f"layer {layer.name!r} is not an image (shape {shape}).")
    count = int(np.prod(shape[:-2], dtype=int))
    if not copy:
        return [_stand_in(shape[-2:], dtype)] * count
    return [plane.copy() for plane in np.asarray(data).reshape(-1, *shape[-2:])]


def _stand_in(shape: tuple[int, ...], dtype) -> np.ndarray:
    return np.broadcast_to(np.zeros((), dtype), shape)


def _channel_of(layer, channels: list[str]) -> str | None:
    """The channel whose name is in the layer's name (the longest when several are)."""
    words = " " + " ".join(_words(layer.name)) + " "
    named = [c for c in channels if f" {' '.join(_words(c))} " in words]
    return max(named, key=len) if named else None


def build(groups: dict[str, list[Any]], channels: list[str], copy: bool = True) -> BuiltData:
    """The training images of each condition's layers, with `channels` ([] = each layer is grayscale);
    without `copy` only their shapes (stand-ins that hold no pixels), to say what training would get."""
    if len(groups) < 2:
        raise PhenotwinError("training needs at least two conditions: press Add condition and pick its layers.")
    built = BuiltData(list(channels))
    for condition, chosen in groups.items():
        if not chosen:
            raise PhenotwinError(f"condition {condition!r} has no layers: pick its image layers in its list.")
        built.images[condition] = _condition_images(condition, chosen, channels, copy) if channels else \
            [plane for layer in chosen for plane in _planes(layer, copy)]
    return built


def _condition_images(condition: str, chosen: list[Any], channels: list[str], copy: bool) -> list[np.ndarray]:
    """Per-channel layers of one condition put together, paired by their names without the channel."""
    pairs: dict[str, dict[str, Any]] = {}
    for layer in chosen:
        if getattr(layer, "rgb", False):
            raise PhenotwinError(f"{layer.name!r} is an RGB layer; with Channels set, every layer is one channel. "
                                 "Split it (napari: right-click the layer, Split RGB), or empty Channels.")
        channel = _channel_of(layer, channels)
        if channel is None:
            raise PhenotwinError(f"the name of layer {layer.name!r} ({condition}) holds none of the channels "
                                 f"({', '.join(channels)}): rename the layer, or change Channels.")
        key = " ".join(w for w in _words(layer.name) if w not in _words(channel))
        if channel in pairs.setdefault(key, {}):
            raise PhenotwinError(f"{condition}: {pairs[key][channel].name!r} and {layer.name!r} are both its "
                                 f"{channel} layer; layers are paired by their names without the channel name, so "
                                 "give the images different names (e.g. a number) or pick only one.")
        pairs[key][channel] = layer
    images = []
    for key, by_channel in pairs.items():
        missing = [c for c in channels if c not in by_channel]
        if missing:
            have = ", ".join(repr(layer.name) for layer in by_channel.values())
            raise PhenotwinError(f"{condition}: {have} has no {' or '.join(missing)} layer to go with it (layers "
                                 f"are paired by their names without the channel name: {key!r}). Pick it, or "
                                 "change Channels.")
        planes = [_planes(by_channel[c], copy) for c in channels]
        if len({p[0].shape for p in planes}) > 1 or len({len(p) for p in planes}) > 1:
            sizes = ", ".join(f"{by_channel[c].name!r} {tuple(by_channel[c].data.shape)}" for c in channels)
            raise PhenotwinError(f"{condition}: the channel layers of one image differ in size ({sizes}); "
                                 "pick layers of the same image.")
        images += [np.stack(group) if copy else _stand_in((len(group), *group[0].shape), group[0].dtype)
                   for group in zip(*planes)]
    return images
