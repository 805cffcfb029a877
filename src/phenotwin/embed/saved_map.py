"""A VAE map kept for reuse: the Affinity-VAE and the projection of `phenotwin embed map --vae`, written
beside the map (vae.safetensors + vae.json), so that other data (a new plate, a new drug) can be placed
on the same map with `--vae-from`: the same latents and the same axes, without training again.

vae.json holds what placing needs: the VAE's shape, the intensity range the cells were normalised with
(the first data's own; new data go through the same one), the conditions it was trained on, the
PCA (mean, components) with the map's origin and scale, and the landmarks: where each of those
conditions lies, so that placed cells are compared with them (a new drug's cells nearest "nocodazole").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.io import write_atomically

VAE_WEIGHTS, VAE_INFO = "vae.safetensors", "vae.json"
MAP_JSON = "map.json"  # `phenotwin embed map`'s record of the map its VAE belongs to
VAE_FORMAT, FORMAT_VERSION = "phenotwin-vae-map", 1
# Share of a channel's pixels outside the first data's range above which new data do not look like them.
OUTSIDE_RANGE_WARNING = 0.05


@dataclass
class SavedMap:
    model: Any  # the Affinity-VAE (`affinity_vae.build_vae`), in eval mode
    info: dict[str, Any]  # vae.json; its "projection" is `phenomap.Projection.record()`
    folder: Path


def describe_vae(config, images: np.ndarray, size: int, classes: list[str], low, high) -> dict[str, Any]:
    """vae.json's description of a VAE trained with `config` (`affinity_vae.VAEConfig`) on (N, C, H, W)
    `images` of `classes` resized to `size` px, normalised with the per-channel range (`low`, `high`): what
    placing other data needs. `source_side`: the images' square side before resizing (`vae_inputs`)."""
    return {"channels": int(images.shape[1]), "size": int(size), "source_side": int(min(images.shape[-2:])),
            "latent": config.latent, "width": config.width,
            "pose": config.pose, "classes": list(classes), "steps": config.steps, "gamma": config.gamma,
            "seed": config.seed, "normalization": {"low": np.asarray(low, np.float64).tolist(),
                                                   "high": np.asarray(high, np.float64).tolist()}}


def landmarks_of(content: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Where the map's own conditions lie, kept in vae.json so that cells placed later can be compared with
    them (`nearest_conditions`): each condition's mean content latent, and the map cells' mean distance to
    their own condition's mean (the unit a distance is read in)."""
    means = np.stack([content[labels == c].mean(0) for c in range(len(classes))])
    within = float(np.linalg.norm(content - means[labels], axis=1).mean())
    return {"classes": list(classes), "means": means.tolist(), "within": within}


def nearest_conditions(content: np.ndarray, conditions: list[str], landmarks: dict[str, Any]) -> dict[str, Any]:
    """For each condition of cells placed on a saved map: the distance of its mean latent to each of the map's
    conditions' means, in units of the map cells' spread about their own means (`landmarks_of`; 1: as far
    as a map cell from its condition's mean), and the nearest. What a new treatment resembles."""
    means = np.asarray(landmarks["means"], np.float64)
    unit = max(float(landmarks["within"]), 1e-12)
    found = {}
    for condition in sorted(set(conditions)):
        mean = content[[i for i, c in enumerate(conditions) if c == condition]].mean(0)
        distances = np.linalg.norm(means - mean, axis=1) / unit
        found[condition] = {"nearest": landmarks["classes"][int(np.argmin(distances))],
                            "distances": {name: float(d) for name, d in zip(landmarks["classes"], distances)}}
    return found


def save_vae_map(out: Path, model, info: dict[str, Any], projection: dict[str, Any]) -> list[str]:
    """Weights then description (with `projection`, a `phenomap.Projection.record()`), each atomically;
    returns the names written (for the folder's manifest)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomically(out / VAE_WEIGHTS, lambda temp: save_file(tensors, temp))
    record = {"format": VAE_FORMAT, "format_version": FORMAT_VERSION, **info, "projection": projection}
    write_atomically(out / VAE_INFO, lambda temp: Path(temp).write_text(json.dumps(record, indent=2) + "\n"))
    return [VAE_WEIGHTS, VAE_INFO]


def load_vae_map(path: str | os.PathLike) -> SavedMap:
    """Read a map folder written by `phenotwin embed map --vae`; say what is wrong with anything else."""
    from safetensors.torch import load_file

    from phenotwin.embed.affinity_vae import build_vae

    folder = Path(path)
    info_path, weights = folder / VAE_INFO, folder / VAE_WEIGHTS
    if not info_path.is_file() or not weights.is_file():
        raise PhenotwinError(f"{folder} holds no saved VAE map ({VAE_INFO} and {VAE_WEIGHTS}). Give the --out folder "
                             "of `phenotwin embed map --vae` (maps made before the VAE was saved must be made again).")
    try:
        info = json.loads(info_path.read_text())
        channels = int(info["channels"])
        ok = (info.get("format") == VAE_FORMAT and int(info["format_version"]) > 0
              and min(channels, *(int(info[k]) for k in ("size", "latent", "width"))) > 0
              and {"classes", "pose", "steps", "gamma", "seed"} <= set(info)
              and all(len(info["normalization"][k]) == channels for k in ("low", "high"))
              and np.asarray(info["projection"]["components"]).shape == (2, int(info["latent"]))
              and ("landmarks" not in info  # maps saved before landmarks have none
                   or np.asarray(info["landmarks"]["means"]).shape == (len(info["landmarks"]["classes"]),
                                                                       int(info["latent"]))))
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise PhenotwinError(f"{info_path} is not a phenotwin VAE map description; make the map again with "
                             "`phenotwin embed map --vae`.")
    if int(info["format_version"]) > FORMAT_VERSION:
        raise PhenotwinError(f"{folder} was written by a newer phenotwin (VAE map format {info['format_version']}); "
                             "update phenotwin to read it.")
    model = build_vae(int(info["channels"]), int(info["size"]), int(info["latent"]), int(info["width"]),
                      bool(info["pose"]))
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as err:  # a truncated file and mismatched shapes mean the same to the user
        raise PhenotwinError(f"cannot load {weights} ({err}); the file is damaged or does not match {VAE_INFO}. "
                             "Make the map again.") from err
    return SavedMap(model.eval(), info, folder)


# Relative change of the cells' side in pixels above which placed cells are drawn at another magnification.
SIDE_CHANGE_WARNING = 0.1


def placement_warnings(info: dict[str, Any], raw: list[np.ndarray], side: int, content: np.ndarray) -> str | None:
    """What to say about cells placed on a saved map: raw (C, H, W) images outside its intensity range, a
    square `side` (before resizing to the map's size) unlike its own cells', a VAE that does not tell them
    apart; None when nothing. One place for `phenotwin embed map --vae-from` and the dock."""
    from phenotwin.embed.affinity_vae import collapse_warning

    low, high = (np.asarray(info["normalization"][k], np.float64) for k in ("low", "high"))
    said = [range_warning(raw, low, high), side_warning(side, info.get("source_side")), collapse_warning(content)]
    return " ".join(w for w in said if w) or None


def side_warning(side: int, map_side: int | None) -> str | None:
    """Both are resized to the map's crop size: cells imaged at another pixel size land by their size."""
    if map_side is None or abs(side / map_side - 1) <= SIDE_CHANGE_WARNING:  # maps saved before sides: unknown
        return None
    change, smaller_or_larger = abs(map_side / side - 1), "smaller" if side > map_side else "larger"
    return (f"these images are {side} px across and the map's were {map_side} px: both are resized to the map's "
            f"crop, so these cells are drawn {change:.0%} {smaller_or_larger} than the map's and land partly by "
            "their size. Crop or rescale them to the map's pixel size.")


def range_warning(images: list[np.ndarray], low: np.ndarray, high: np.ndarray) -> str | None:
    """What to say when new raw (C, H, W) images lie outside the range the map's first data were normalised
    with (another microscope setting or bit depth): their cells would be clipped, and land on the map by it."""
    values = np.concatenate([im.reshape(im.shape[0], -1) for im in images], axis=1)
    outside = ((values < low[:, None]) | (values > high[:, None])).mean(1)
    worst = int(np.argmax(outside))
    if outside[worst] <= OUTSIDE_RANGE_WARNING:
        return None
    return (f"{outside[worst]:.0%} of channel {worst}'s pixels lie outside the range the map was made with "
            f"({low[worst]:g}-{high[worst]:g}; these data: {values[worst].min():g}-{values[worst].max():g}): they "
            "are clipped, so where these cells land says as much about the intensities as about the cells. Image "
            "them as the map's data were, or make a map of both data sets together.")
