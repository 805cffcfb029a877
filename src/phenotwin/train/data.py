"""Training images: one subfolder per condition, checked up front, served as augmented crops.

Every image is read and validated before training starts, so a bad file costs seconds, not
an hour of training. Intensities are normalised with one per-channel range computed over
the whole data set (all conditions together), not per image: a phenotype that changes
brightness must stay visible to the model, and the same range is stored in the checkpoint
so translation uses exactly the training normalisation.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.io import IMAGE_SUFFIXES, read_image
from phenotwin.preprocessing import channels_first

NORMALIZATION_PERCENTILES = (0.1, 99.9)
VALIDATION_MIN_IMAGES = 5  # a condition with fewer keeps all its images for training


@dataclass
class ConditionImages:
    """All training images in memory, channel-first, with their condition labels."""

    classes: list[str]
    images: list[np.ndarray]  # each (C, H, W), raw units, float32
    labels: np.ndarray  # (N,) int
    files: list[Path]
    low: np.ndarray  # (C,) raw value mapped to model range -1
    high: np.ndarray  # (C,) raw value mapped to +1
    fingerprint: str
    batches: list[str] | None = None  # from the folder's batches.csv (`with_batches`), else None
    batch_labels: np.ndarray | None = None  # (N,) index into `batches`

    @property
    def label_count(self) -> int:
        """Class labels the model embeds: conditions + null, for each batch and an unknown one
        (`CheckpointInfo.label_count`)."""
        return (len(self.classes) + 1) * (len(self.batches or []) + 1)

    @property
    def channels(self) -> int:
        return self.images[0].shape[0]

    def normalization(self) -> dict:
        return {"mode": "fixed", "low": self.low.tolist(), "high": self.high.tolist(),
                "from_percentiles": list(NORMALIZATION_PERCENTILES)}

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(self.classes)}


def _channel_first(array: np.ndarray, file: Path, channel_axis: int | None) -> np.ndarray:
    """(C, H, W) of a training image. Unlike translation, training guesses the channel axis of a
    3-D image when not told; preprocessing moves it."""
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        if channel_axis is None:
            # Guess the smaller axis: microscopy images have far fewer channels than pixels.
            if array.shape[-1] <= 5 and array.shape[0] > 5:
                channel_axis = -1
            elif array.shape[0] <= 5:
                channel_axis = 0
        if channel_axis is not None:
            return channels_first(array, channel_axis)[0]
    raise PhenotwinError(
        f"{file} has shape {array.shape}; training takes 2-D images, grayscale or with up to 5 channels. "
        "Split stacks into one file per plane."
    )


def load_condition_folders(
    root: str | os.PathLike, min_size: int, channel_axis: int | None = None, max_per_class: int | None = None,
    allow_mixed_bit_depth: bool = False, min_conditions: int = 2,
) -> ConditionImages:
    """Read DIR/<condition>/*.tif|png, check everything, and compute the normalisation.
    `min_conditions`: 1 only where one condition makes sense (cells placed on a saved map).

    Data the model would learn the wrong thing from are refused: conditions stored at different
    bit depths (unless `allow_mixed_bit_depth`), or a condition whose images are all constant."""
    root = Path(root)
    if not root.is_dir():
        raise PhenotwinError(f"data folder {root} does not exist. Give a folder with one subfolder per condition.")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise PhenotwinError(
            f"data folder {root} has no subfolders. Put the images of each condition in its own subfolder, "
            f"e.g. {root}/control/*.tif and {root}/treated/*.tif."
        )
    classes, images, labels, files, problems = [], [], [], [], []
    dtypes: dict[str, dict[str, Path]] = {}  # condition -> image type -> an example file
    for folder in folders:
        candidates = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        image_files = [p for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES]
        others = [p for p in candidates if p.suffix.lower() not in IMAGE_SUFFIXES]
        if others:
            problems.append(f"{len(others)} non-image file(s) in {folder}, e.g. {others[0].name}")
        if not image_files:
            problems.append(f"condition folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
            continue
        if max_per_class:
            image_files = image_files[:max_per_class]
        label = len(classes)
        classes.append(folder.name)
        for file in image_files:
            try:
                array = read_image(file)
            except PhenotwinError as err:
                problems.append(str(err))
                continue
            if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
                problems.append(f"{file} has dtype {array.dtype}, not intensities")
                continue
            dtypes.setdefault(folder.name, {}).setdefault(str(array.dtype), file)
            chw = _channel_first(array, file, channel_axis).astype(np.float32)
            if min(chw.shape[1:]) < min_size:
                problems.append(f"{file} is {chw.shape[1]}x{chw.shape[2]}, smaller than the {min_size}x{min_size} crop")
                continue
            if not np.isfinite(chw).all():
                problems.append(f"{file} contains NaN or infinite values")
                continue
            images.append(chw)
            labels.append(label)
            files.append(file)
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise PhenotwinError(
            f"cannot train on {root}:\n  {shown}\nFix or remove these files (or lower --size for small images), then run again."
        )
    if len(classes) < min_conditions:
        raise PhenotwinError(
            f"{root} has one condition ({classes[0]!r}); a translation model needs at least two. "
            "Add a subfolder with the images of another condition."
        )
    channel_counts = {}
    for file, image in zip(files, images):
        channel_counts.setdefault(image.shape[0], file)
    if len(channel_counts) > 1:
        described = ", ".join(f"{c} channel(s) (e.g. {f})" for c, f in sorted(channel_counts.items()))
        raise PhenotwinError(
            f"images have different channel counts: {described}. Every image must have the same channels in the "
            "same order; convert them first."
        )
    _refuse_confounded(classes, dtypes, images, labels, files, allow_mixed_bit_depth)
    low, high = _dataset_range(images)
    return ConditionImages(
        classes=classes, images=images, labels=np.asarray(labels), files=files, low=low, high=high,
        fingerprint=fingerprint(files, root),
    )


def _refuse_confounded(classes, dtypes, images, labels, files, allow_mixed_bit_depth: bool) -> None:
    """A condition the model can tell apart by file type alone, or with nothing to learn, is refused."""
    kinds = {name: tuple(sorted(dtypes[name])) for name in classes}
    if len(set(kinds.values())) > 1 and not allow_mixed_bit_depth:
        described = "; ".join(f"{name}: {', '.join(f'{t} (e.g. {dtypes[name][t].name})' for t in kinds[name])}"
                              for name in classes)
        raise PhenotwinError(
            f"the conditions' images differ in type or bit depth ({described}): the model would learn the bit depth "
            "as the phenotype. Export every condition the same way (e.g. all 16-bit), or, if the difference is real, "
            "allow it explicitly (phenotwin train --allow-mixed-bit-depth)."
        )
    for index, name in enumerate(classes):
        own = [i for i, label in enumerate(labels) if label == index]
        if all(images[i].min() == images[i].max() for i in own):
            raise PhenotwinError(
                f"every image of condition {name!r} is constant (e.g. {files[own[0]].name} holds only the value "
                f"{images[own[0]].flat[0]:g}): there is nothing to learn from it. Check the export of those images."
            )


def _dataset_range(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    channels = images[0].shape[0]
    # A bounded random sample of pixels per image keeps this fast on large data sets.
    samples = []
    for image in images:
        flat = image.reshape(channels, -1)
        take = rng.choice(flat.shape[1], size=min(4096, flat.shape[1]), replace=False)
        samples.append(flat[:, take])
    pooled = np.concatenate(samples, axis=1)
    low = np.percentile(pooled, NORMALIZATION_PERCENTILES[0], axis=1)
    high = np.percentile(pooled, NORMALIZATION_PERCENTILES[1], axis=1)
    high = np.where(high > low, high, low + 1.0)
    return low.astype(np.float64), high.astype(np.float64)


def with_batches(data: ConditionImages, root: str | os.PathLike) -> ConditionImages:
    """`data` with each image's batch from `root`/batches.csv (checked by `synthetic.batches.read_batches`:
    every image listed, no unknown file, at least two batches), when the folder has one."""
    from dataclasses import replace

    from phenotwin.synthetic.batches import BATCHES_FILE, read_batches

    root = Path(root)
    if not (root / BATCHES_FILE).is_file():
        return data
    by_file = read_batches(root, min_batches=1)
    names = sorted(set(by_file.values()))
    if len(names) < 2:
        raise PhenotwinError(f"{root / BATCHES_FILE} names one batch ({names[0]!r}): a batch label needs images from "
                             "at least two batches (plates, days). Add the other batches' images, or train without "
                             "batch labels (phenotwin train --no-batches).")
    labels = np.asarray([names.index(by_file[f.relative_to(root).as_posix()]) for f in data.files])
    return replace(data, batches=names, batch_labels=labels)


def hold_out(data: ConditionImages, root: str | os.PathLike, fraction: float,
             seed: int) -> tuple[ConditionImages, ConditionImages | None, dict]:
    """(training images, held-out images or None, the split's record) for a validation split.

    Per condition, `fraction` of its images (at least one when it has VALIDATION_MIN_IMAGES or
    more) are drawn from a stream fixed by (seed, condition index): the same files every time, so
    a resumed run holds out the same ones. The normalisation and everything the model learns come
    from the training images alone; `fingerprint` stays the whole folder's (what resume checks)."""
    root = Path(root)
    held = []
    for c in range(len(data.classes)):
        members = np.flatnonzero(data.labels == c)
        count = 0 if fraction <= 0 or len(members) < VALIDATION_MIN_IMAGES else max(1, int(fraction * len(members)))
        held += sorted(members[np.random.default_rng([seed, c]).permutation(len(members))[:count]].tolist())
    record = {"fraction": fraction, "files": [data.files[i].relative_to(root).as_posix() for i in held],
              "fingerprint": fingerprint([data.files[i] for i in held], root) if held else None}
    if not held:
        return data, None, record
    kept = [i for i in range(len(data.images)) if i not in set(held)]

    def subset(indices: list[int], low: np.ndarray, high: np.ndarray, print_: str) -> ConditionImages:
        return ConditionImages(classes=data.classes, images=[data.images[i] for i in indices],
                               labels=data.labels[indices], files=[data.files[i] for i in indices], low=low,
                               high=high, fingerprint=print_, batches=data.batches,
                               batch_labels=None if data.batch_labels is None else data.batch_labels[indices])

    low, high = _dataset_range([data.images[i] for i in kept])
    return subset(kept, low, high, data.fingerprint), subset(held, low, high, record["fingerprint"]), record


def fingerprint(files: list[Path], root: Path) -> str:
    """sha256 over relative names and contents: the same data gives the same fingerprint anywhere."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(str(file.relative_to(root)).replace(os.sep, "/").encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return "sha256:" + digest.hexdigest()


class AugmentedCrops:
    """Random crops at the model size with flips and 90-degree rotations, classes balanced.

    A plain sampler rather than a torch DataLoader: the images are already in memory, and a
    seeded numpy generator makes a resumed run continue with a reproducible stream.
    """

    def __init__(self, data: ConditionImages, size: int):
        self.data = data
        self.size = size
        self.rng = np.random.default_rng(0)
        self.by_class = [np.flatnonzero(data.labels == c) for c in range(len(data.classes))]
        self.low = data.low[:, None, None].astype(np.float32)
        self.span = (data.high - data.low)[:, None, None].astype(np.float32)

    def reseed(self, *key: int) -> None:
        self.rng = np.random.default_rng(list(key))

    def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(crops in model range, class labels): the condition, or with batches the label of the
        condition in the image's batch row, batch * (conditions + 1) + condition."""
        labels = self.rng.integers(0, len(self.by_class), size=batch_size)
        crops = np.empty((batch_size, self.data.channels, self.size, self.size), dtype=np.float32)
        rows = np.zeros(batch_size, dtype=labels.dtype)
        for i, label in enumerate(labels):
            index = self.rng.choice(self.by_class[label])
            image = self.data.images[index]
            if self.data.batch_labels is not None:
                rows[i] = self.data.batch_labels[index]
            y = self.rng.integers(0, image.shape[1] - self.size + 1)
            x = self.rng.integers(0, image.shape[2] - self.size + 1)
            crop = image[:, y : y + self.size, x : x + self.size]
            crop = np.rot90(crop, k=self.rng.integers(0, 4), axes=(1, 2))
            if self.rng.random() < 0.5:
                crop = crop[:, :, ::-1]
            crops[i] = crop
        # preprocessing.normalise's map, in float32 over the batch: half the values would differ in
        # the last bit in its float64, and with them every trained weight.
        crops = np.clip((crops - self.low) / self.span, 0.0, 1.0) * 2.0 - 1.0
        return crops, rows * (len(self.data.classes) + 1) + labels


def dropped_labels(labels, null: int, batch_count: int, drop, hide=None):
    """Training labels with the condition dropped where `drop` and the batch where `hide` (boolean tensors).

    Class dropout teaches the null condition, which classifier-free guidance needs, in the label's
    own batch row (`CheckpointInfo.batch_row`: row * (null + 1) + condition); batch dropout teaches
    the "batch unknown" row (row `batch_count`), which translates an image of no known batch."""
    import torch

    labels = torch.where(drop, labels - labels % (null + 1) + null, labels)
    if hide is not None:
        labels = torch.where(hide, labels % (null + 1) + batch_count * (null + 1), labels)
    return labels
