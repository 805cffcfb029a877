"""Images of a condition-folder data set with their batch, as crops for contrastive training.

The images are read by training's own loader (the same checks and the same data-set-wide
normalisation: a per-image normalisation would hide gain and background from the encoder
instead of teaching it to ignore them). Torch-free: batches are numpy arrays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.synthetic.batches import BATCHES_FILE, read_batches
from phenotwin.train.data import ConditionImages, load_condition_folders


@dataclass
class BatchedImages:
    """Training's `ConditionImages` plus each image's batch index."""

    images: ConditionImages
    batch_names: list[str]
    batches: np.ndarray  # (N,) int index into batch_names

    @property
    def labels(self) -> np.ndarray:
        return self.images.labels

    @property
    def classes(self) -> list[str]:
        return self.images.classes

    def stacked(self) -> np.ndarray:
        """Every image in model range, centre-cropped to the smallest height and width: (N, C, H, W)."""
        h = min(image.shape[1] for image in self.images.images)
        w = min(image.shape[2] for image in self.images.images)
        crops = []
        for i, image in enumerate(self.images.images):
            y, x = (image.shape[1] - h) // 2, (image.shape[2] - w) // 2
            crops.append(self.normalised(i)[:, y: y + h, x: x + w])
        return np.stack(crops)

    def normalised(self, index: int) -> np.ndarray:
        """Image `index` in model range [-1, 1], (C, H, W) float32."""
        data = self.images
        low = data.low[:, None, None].astype(np.float32)
        span = (data.high - data.low)[:, None, None].astype(np.float32)
        return np.clip((data.images[index] - low) / span, 0.0, 1.0) * 2.0 - 1.0


def load_batched(root: str | os.PathLike, min_size: int, normalization: dict | None = None,
                 require_batches: bool = True, min_batches: int = 2, min_conditions: int = 2) -> BatchedImages:
    """DIR/<condition>/* with DIR/batches.csv; `normalization` (an encoder's) replaces the data's own range.

    Without `require_batches` a folder without batches.csv is one batch, "all" (plain SimCLR and a map need
    none); `min_batches` is how many batches.csv must name (a map can show one)."""
    root = Path(root)
    images = load_condition_folders(root, min_size, min_conditions=min_conditions)
    if not require_batches and not (root / BATCHES_FILE).is_file():
        names = ["all"] * len(images.files)
    else:
        batch_of = read_batches(root, min_batches)
        names = [batch_of[f.relative_to(root).as_posix()] for f in images.files]
    batch_names = sorted(set(names))
    if normalization is not None:
        images.low = np.asarray(normalization["low"], np.float64)
        images.high = np.asarray(normalization["high"], np.float64)
    data = BatchedImages(images, batch_names, np.asarray([batch_names.index(n) for n in names]))
    return data


def consistency_partners(labels: np.ndarray, batches: np.ndarray, anchors: np.ndarray,
                         rng: np.random.Generator) -> np.ndarray:
    """For each anchor, an image of the same condition from another batch (CDCL's positive pair)."""
    partners = np.empty(len(anchors), dtype=np.int64)
    for k, a in enumerate(anchors):
        pool = np.flatnonzero((labels == labels[a]) & (batches != batches[a]))
        if not len(pool):
            raise PhenotwinError(f"condition {int(labels[a])} has images from one batch only; metadata-guided pairs "
                                 "need every condition in at least two batches. Add images of it from another "
                                 "batch, or train with --method simclr.")
        partners[k] = rng.choice(pool)
    return partners


def check_pairable(data: BatchedImages) -> None:
    """Every condition in at least two batches, said by name before any training."""
    for c, name in enumerate(data.classes):
        found = sorted({data.batch_names[b] for b in data.batches[data.labels == c]})
        if len(found) < 2:
            raise PhenotwinError(f"condition {name!r} has images from one batch only ({', '.join(found)}); "
                                 "metadata-guided pairs need every condition in at least two batches. Add images "
                                 "of it from another batch, or train with --method simclr.")


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random `size` crop with a random flip and 90-degree rotation (rotation-free biology)."""
    y = rng.integers(0, image.shape[1] - size + 1)
    x = rng.integers(0, image.shape[2] - size + 1)
    crop = np.rot90(image[:, y: y + size, x: x + size], k=rng.integers(0, 4), axes=(1, 2))
    return np.ascontiguousarray(crop[:, :, ::-1] if rng.random() < 0.5 else crop)


def intensity_jitter(crops: np.ndarray, rng: np.random.Generator, strength: float = 0.2) -> np.ndarray:
    """SimCLR's colour jitter for fluorescence: a random gain and offset per view and channel."""
    n, c = crops.shape[:2]
    gain = rng.uniform(1 - strength, 1 + strength, (n, c, 1, 1)).astype(np.float32)
    offset = rng.uniform(-strength, strength, (n, c, 1, 1)).astype(np.float32)
    return np.clip(crops * gain + offset, -1.0, 1.0)


def training_views(data: BatchedImages, method: str, batch_size: int, size: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(2B views, the source image of each): the same forward budget for both methods.

    simclr: B images, two augmented views each. cdcl: B/2 images and, for each, a partner of its
    condition from another batch, two augmented views of each of the B images."""
    count = len(data.labels)
    if method == "simclr":
        sources = rng.integers(0, count, batch_size)
    else:
        anchors = rng.integers(0, count, batch_size // 2)
        sources = np.concatenate([anchors, consistency_partners(data.labels, data.batches, anchors, rng)])
    sources = np.concatenate([sources, sources])
    crops = np.stack([random_crop(data.normalised(i), size, rng) for i in sources])
    return intensity_jitter(crops, rng), sources
