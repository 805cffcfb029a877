"""Does a model generalise or recall its training images? (Phen-LDiff Fig. 4)

Two models trained on disjoint halves of the same data are given the same noise. A model
that has learnt the data distribution maps the same noise to nearly the same cell whatever
half it saw (A-vs-B similarity near 1), and that cell is not a copy of a training image
(nearest-training similarity clearly below 1). A model that memorises returns its own
training images: A and B disagree, and each generation has a near-copy in its training half.

Similarity is the cosine of two images after removing each channel's mean (a correlation of
structure; without centring, the dark background makes any two fluorescence images look
alike). The nearest training image is searched over all 8 flips/90-degree rotations, the
augmentations training applies, and over model-size tiles of larger training images.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.evaluate.metrics import nearest_similarity, paired_cosine
from phenotwin.progress import Progress, Steps, relabel

HIGH = 0.95  # a similarity above this is treated as "the same image" in the summary
MARGIN = 0.05  # differences of medians smaller than this are not read as a verdict
UNDERTRAINED = 0.2  # generations this much further from the training set than real cells are do not look like cells
BINS = np.linspace(-1.0, 1.0, 81)
RULE = (
    "Medians: S_ab = model A vs model B (same noise), S_nn = generation vs nearest training image, "
    "S_real = held-out real image vs nearest training image (how close a new real cell comes to the training set). "
    f"memorises if S_nn >= S_real + {MARGIN} (generations are closer to training images than new cells are), or "
    f"S_ab < S_nn - {MARGIN} (A and B agree less than each agrees with its own training half); "
    f"unclear if S_nn < S_real - {UNDERTRAINED} (generations do not look like the data: undertrained); "
    f"generalises if S_ab >= 0.8 and S_ab >= S_nn + {MARGIN}; otherwise unclear. "
    f"Without held-out images, S_real is replaced by {HIGH} for the first test and by 0.5 for the second."
)


def split_halves(data: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, Path]:
    """Split DIR/<condition>/* into disjoint halves out/half-a and out/half-b (alternate files in name order).

    Files are hard-linked when possible (no copy of the data), else copied.
    """
    from phenotwin.io import IMAGE_SUFFIXES

    data, out = Path(data), Path(out)
    halves = (out / "half-a", out / "half-b")
    folders = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")) if data.is_dir() else []
    if len(folders) < 2:
        raise PhenotwinError(f"{data} needs one subfolder of images per condition (at least two) to split into halves.")
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if len(files) < 2:
            raise PhenotwinError(f"{folder} has {len(files)} image(s); each half needs at least one: add images.")
        for i, file in enumerate(files):
            target = halves[i % 2] / folder.name / file.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                continue
            try:
                os.link(file, target)
            except OSError:
                shutil.copy2(file, target)
    return halves


def train_halves_steps(data, out, steps: int = 300, width: int = 16, batch_size: int = 16, size: int | None = None,
                       seed: int = 0, overwrite: bool = False) -> Steps[tuple[Path, Path, Path, Path]]:
    """Split `data` into halves and train one scratch model on each with the real training code.

    The two models also start from different random weights (seeds `seed`, `seed + 1`), so that
    agreement between them comes from the data, not from a shared initialisation.
    Yields Progress("train A"/"train B", step, steps); returns (model A, model B, half A, half B).
    """
    from phenotwin.train.trainer import TrainConfig, Trainer

    half_a, half_b = split_halves(data, out)
    if size is None:
        from phenotwin.io import read_image

        first = next(p for p in sorted((half_a).rglob("*")) if p.is_file())
        size = sorted(read_image(first).shape)[-2] // 8 * 8  # the largest multiple of 8 that fits the smaller side
    models = []
    for name, half, offset in (("A", half_a, 0), ("B", half_b, 1)):
        model = Path(out) / f"model-{name.lower()}"
        if (model / "phenotwin.json").exists() and not overwrite:
            models.append(model)  # reuse a finished model: memorisation runs can be repeated cheaply
            continue
        config = TrainConfig(data=str(half), out=str(model), steps=steps, width=width, batch_size=batch_size, size=size,
                             seed=seed + offset, checkpoint_every=steps, overwrite=True, warmup_steps=min(100, steps // 10),
                             command=f"phenotwin evaluate memorization (model {name})",
                             validation_fraction=0.0, calibrate=False)  # each half is the training data, whole
        training = Trainer(config).steps()
        try:
            for event in training:
                yield Progress(f"train {name}", event.step, event.total)
        finally:
            training.close()  # when stopped early the trainer saves what it has
        models.append(model)
    return models[0], models[1], half_a, half_b


def model_range_images(data, translator) -> np.ndarray:
    """All images of a condition folder in the model's range, as model-size tiles (stride half a tile)."""
    from phenotwin.train.data import load_condition_folders

    size = translator.image_size
    loaded = load_condition_folders(data, min_size=size)
    if loaded.channels != translator.channels:
        raise PhenotwinError(f"{data} has {loaded.channels}-channel images but the model takes {translator.channels}.")
    tiles = []
    for chw in loaded.images:
        image = translator.processor.to_model_range(chw[None])[0]
        stride = max(size // 2, 1)
        for y in range(0, image.shape[1] - size + 1, stride):
            for x in range(0, image.shape[2] - size + 1, stride):
                tiles.append(image[:, y : y + size, x : x + size])
    return np.stack(tiles)


def summarise(values: np.ndarray) -> dict:
    counts, _ = np.histogram(np.clip(values, -1.0, 1.0), bins=BINS)  # rounding can give 1 + 1e-7
    return {"median": float(np.median(values)), "mean": float(np.mean(values)),
            f"fraction_above_{HIGH}": float(np.mean(values > HIGH)), "values": [float(v) for v in values],
            "histogram": {"edges": BINS.tolist(), "counts": counts.tolist()}}


def verdict(a_vs_b: float, nearest_train: float, real_to_train: float | None) -> tuple[str, str]:
    """(generalises | memorises | unclear, the reason in words) from the medians; see RULE."""
    copy_level = HIGH if real_to_train is None else real_to_train + MARGIN
    cell_level = 0.5 if real_to_train is None else real_to_train - UNDERTRAINED
    if nearest_train >= copy_level:
        return "memorises", (f"generations are as close to training images ({nearest_train:.2f}) as copies"
                             + ("" if real_to_train is None else f", closer than new real cells come ({real_to_train:.2f})"))
    if a_vs_b < nearest_train - MARGIN:
        return "memorises", (f"models A and B agree less ({a_vs_b:.2f}) than each agrees with its training images "
                             f"({nearest_train:.2f})")
    if nearest_train < cell_level:
        return "unclear", (f"generations resemble no training image ({nearest_train:.2f}"
                           + ("" if real_to_train is None else f"; new real cells reach {real_to_train:.2f}")
                           + "): the models look undertrained; train longer")
    if a_vs_b >= 0.8 and a_vs_b >= nearest_train + MARGIN:
        return "generalises", (f"models trained on different images draw the same cells from the same noise ({a_vs_b:.2f}), "
                               f"and these are no closer to training images ({nearest_train:.2f}) than new real cells are"
                               + ("" if real_to_train is None else f" ({real_to_train:.2f})"))
    return "unclear", (f"A-vs-B similarity {a_vs_b:.2f} and nearest-training similarity {nearest_train:.2f} do not separate; "
                       "train longer or on more images, or generate more")


def memorization_steps(model_a, model_b, train_data_a, held_out_data=None, count: int = 32, seed: int = 0,
                       steps: int = 50, device: str = "auto") -> Steps[dict]:
    """Generate `count` images per condition from both models with the same seeds and compare them.

    `train_data_a` is model A's training folder; `held_out_data` (optional: e.g. model B's half)
    gives the baseline: how close real cells A never saw come to A's training set. Returns the
    JSON-ready result.
    """
    from phenotwin import Translator

    if count < 1:
        raise PhenotwinError(f"count must be at least 1, got {count}.")
    a, b = Translator(model_a, device=device), Translator(model_b, device=device)
    if a.classes != b.classes or a.image_size != b.image_size or a.channels != b.channels:
        raise PhenotwinError("models A and B must share conditions, image size and channels: "
                             "train them on halves of one data set.")
    reference = model_range_images(train_data_a, a)
    held_out = None if held_out_data is None else model_range_images(held_out_data, a)
    generated_a, generated_b = [], []
    total, done = 2 * len(a.classes) * steps, 0
    for c, condition in enumerate(a.classes):
        for translator, out in ((a, generated_a), (b, generated_b)):
            sampler = translator.sample_steps(condition, count, seed=seed + c, steps=steps)
            out.append((yield from relabel(sampler, "sample", done, total)))
            done += steps
    generated_a, generated_b = np.concatenate(generated_a), np.concatenate(generated_b)
    a_vs_b = paired_cosine(generated_a, generated_b)
    nearest, nearest_index = nearest_similarity(generated_a, reference)
    result = {
        "kind": "memorization", "model_a": a.checkpoint_id, "model_b": b.checkpoint_id,
        "train_data_a": str(train_data_a), "held_out_data": None if held_out_data is None else str(held_out_data),
        "classes": a.classes, "images_per_class": count, "seed": seed, "steps": steps,
        "training_images": len(reference),
        "similarity": "cosine after removing each channel's mean; nearest over 8 flips/rotations of every training tile",
        "a_vs_b": summarise(a_vs_b), "nearest_train": summarise(nearest), "held_out_to_train": None,
    }
    held = None
    if held_out is not None:
        real_values, _ = nearest_similarity(held_out, reference)
        result["held_out_to_train"] = summarise(real_values)
        held = result["held_out_to_train"]["median"]
    result["verdict"], result["reason"] = verdict(result["a_vs_b"]["median"], result["nearest_train"]["median"], held)
    result["rule"] = RULE
    # Kept for the figure, not the JSON: a few generations beside their nearest training image.
    shown = np.argsort(-nearest)[:4]
    result["_examples"] = [(generated_a[i], generated_b[i], reference[nearest_index[i]]) for i in shown]
    return result


def check_steps(out, model_a=None, model_b=None, train_data_a=None, held_out=None, data=None, train_steps: int = 300,
                width: int = 16, batch_size: int = 16, size: int | None = None, overwrite: bool = False,
                count: int = 32, seed: int = 0, sample_steps: int = 50, device: str = "auto") -> Steps[dict]:
    """The whole check, for the CLI and napari: two given models, or two trained here on halves of `data`
    (saved in `out`, model B's half then serving as held-out images)."""
    if data is not None:
        if model_a or model_b:
            raise PhenotwinError("give either a data folder (models are trained on its halves) or models A and B, not both.")
        model_a, model_b, train_data_a, half_b = yield from train_halves_steps(
            data, out, steps=train_steps, width=width, batch_size=batch_size, size=size, seed=seed, overwrite=overwrite)
        held_out = held_out or half_b
    elif not (model_a and model_b and train_data_a):
        raise PhenotwinError("give --model-a, --model-b and --train-data-a (model A's training images), "
                             "or a data folder to train both models here.")
    return (yield from memorization_steps(model_a, model_b, train_data_a, held_out, count=count, seed=seed,
                                          steps=sample_steps, device=device))
