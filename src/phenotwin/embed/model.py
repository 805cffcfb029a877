"""The encoder: a small CNN, its files (encoder.safetensors + encoder.json), and features of images.

```
my-encoder/
  encoder.json           format, method, classes, batches, channels, crop size, width, normalisation,
                         provenance (command, data fingerprint, steps) and the measured metrics
  encoder.safetensors    the weights (backbone and projection head); never a pickle
  training/              the resumable state (accelerate's, like `phenotwin train`), log.csv
```

The features are the backbone's globally pooled output (the projection head is used only by the
loss, as in SimCLR). The network is fully convolutional, so whole images give features too.
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

ENCODER_INFO = "encoder.json"
ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_FORMAT = "phenotwin-encoder"
FORMAT_VERSION = 1


def build_encoder(channels: int, width: int = 32, projection: int = 64):
    """Conv stack (width, 2 width, 4 width; stride 2 twice) -> global mean -> features; head -> projection."""
    import torch
    from torch import nn

    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(*block(channels, width, 1), *block(width, 2 * width, 2),
                                          *block(2 * width, 2 * width, 1), *block(2 * width, 4 * width, 2),
                                          *block(4 * width, 4 * width, 1))
            self.head = nn.Sequential(nn.Linear(4 * width, 4 * width), nn.SiLU(), nn.Linear(4 * width, projection))

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone(x).mean(dim=(2, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    return Encoder()


@dataclass
class Encoder:
    """A loaded encoder: its description and its torch module (eval mode, CPU until moved)."""

    info: dict[str, Any]
    module: Any
    path: Path | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        """(N, C, H, W) images in raw units to the encoder's model range."""
        norm = self.info["normalization"]
        low = np.asarray(norm["low"], np.float32)[None, :, None, None]
        span = (np.asarray(norm["high"], np.float32) - np.asarray(norm["low"], np.float32))[None, :, None, None]
        return np.clip((np.asarray(raw, np.float32) - low) / span, 0, 1) * 2 - 1

    def check_fits(self, images: list[np.ndarray], files: list[Path]) -> None:
        """Refuse (C, H, W) images of another channel count or size than the training images, naming one:
        features of another size (another scale, another field of view) are not comparable."""
        where = f"the encoder {self.path}" if self.path else "the encoder"
        channels = int(self.info["channels"])
        other = next((k for k, image in enumerate(images) if image.shape[0] != channels), None)
        if other is not None:
            raise PhenotwinError(f"{where} was trained on {channels}-channel images; {files[other]} has "
                                 f"{images[other].shape[0]}. Choose the encoder trained on this kind of image, or "
                                 "train an encoder on these images (`phenotwin embed train --data DIR --out NEW`).")
        size = self.info.get("image_size")  # absent in encoders written before it was recorded
        crop = int(self.info.get("size", 1))
        other = next((k for k, image in enumerate(images) if (size and list(image.shape[1:]) != list(size))
                      or min(image.shape[1:]) < crop), None)
        if other is not None:
            trained = f"{size[0]}x{size[1]} images" if size else f"{crop}x{crop} crops"
            raise PhenotwinError(f"{where} was trained on {trained}; {files[other]} is {images[other].shape[1]}x"
                                 f"{images[other].shape[2]}. Its features are only comparable at the size it learnt: "
                                 "crop or resize the images to that size, or train an encoder on these images "
                                 "(`phenotwin embed train --data DIR --out NEW`).")

    def features(self, images: np.ndarray, raw: bool = True, batch_size: int = 64) -> np.ndarray:
        """(N, D) float64 features of (N, C, H, W) images (raw units, or model range with raw=False)."""
        import torch

        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1] != self.info["channels"]:
            raise PhenotwinError(f"the encoder takes (N, {self.info['channels']}, H, W) images; got shape "
                                 f"{images.shape}. Give images with the channels it was trained on.")
        x = self.normalise(images) if raw else images
        device = next(self.module.parameters()).device
        out = []
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(x[start: start + batch_size])).to(device)
                out.append(self.module.features(chunk).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 4 * self.info["width"]))


def save_encoder(module, info: dict[str, Any], out: Path) -> None:
    """Weights then description, each written atomically (a reader sees the old pair or the new one)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / ENCODER_WEIGHTS, lambda temp: save_file(tensors, temp))
    record = {"format": ENCODER_FORMAT, "format_version": FORMAT_VERSION, **info}
    write_atomically(out / ENCODER_INFO, lambda temp: Path(temp).write_text(json.dumps(record, indent=2) + "\n"))


def load_encoder(path: str | os.PathLike, device: str = "cpu") -> Encoder:
    """Read an encoder folder written by `phenotwin embed train`; say what is wrong with anything else."""
    folder = Path(path)
    info_path = folder / ENCODER_INFO
    if not info_path.is_file():
        raise PhenotwinError(f"{folder} is not an encoder folder (no {ENCODER_INFO}). Give the --out folder of "
                             "`phenotwin embed train`.")
    try:
        info = json.loads(info_path.read_text())
        ok = info.get("format") == ENCODER_FORMAT and int(info["channels"]) > 0 and int(info["width"]) > 0
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise PhenotwinError(f"{info_path} is not a phenotwin encoder description; retrain with `phenotwin embed "
                             "train` or give another folder.")
    if int(info["format_version"]) > FORMAT_VERSION:
        raise PhenotwinError(f"{folder} was written by a newer phenotwin (encoder format {info['format_version']}); "
                             "update phenotwin to read it.")
    weights = folder / ENCODER_WEIGHTS
    if not weights.is_file():
        raise PhenotwinError(f"{folder} has no {ENCODER_WEIGHTS}; the training may not have saved yet. Train or "
                             "resume it (`phenotwin embed train ... --resume`).")
    from safetensors.torch import load_file

    module = build_encoder(int(info["channels"]), int(info["width"]), int(info["projection"]))
    try:
        module.load_state_dict(load_file(str(weights)))
    except Exception as err:  # a truncated file and mismatched shapes mean the same to the user
        raise PhenotwinError(f"cannot load {weights} ({err}); the file is damaged or does not match "
                             f"{ENCODER_INFO}. Retrain the encoder.") from err
    return Encoder(info, module.to(device).eval(), folder)
