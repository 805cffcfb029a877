"""The whole explanation of one data set: images and labels in, features, effects and models out.

Inputs are real images in one folder per condition (DIR/<condition>/*.tif), and optionally
the translations `phenotwin translate` wrote of some of them (its JSON records say which input
each translation came from). Cells come from labels files that mirror the images' paths, or
from `features.segment_cells`, whose labels are kept so the user can check them. A translation
is measured with its source's labels and nuclei: the same cells, so the comparison is paired.

The model of the condition is fitted on the real cells: on their features (`models.fit_models`),
and on their crops (`crops`): the CNN black box and the β-VAE (`vae`), whose latent factors get
the same sparse model. All of them use one split of the cells (`models.split`).

`explain_steps` is a step generator (a `Progress` per image, then per stretch of the β-VAE's
training) for the CLI and the napari widget.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.explain import effects as effects_module
from phenotwin.explain.features import (
    Feature,
    cell_features,
    check_labels,
    feature_list,
    intensity_ranges,
    nucleus_mask,
    segment_cells,
)
from phenotwin.io import IMAGE_SUFFIXES, read_image
from phenotwin.progress import Progress, Steps


@dataclass
class Sample:
    """One image of a comparison and its cells."""

    path: Path
    condition: str
    image: np.ndarray  # (C, H, W)
    labels: np.ndarray | None = None
    segmented: bool = False  # labels made here (to be checked), not given
    source: Sample | None = None  # for a translation: the image it was translated from
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Explanation:
    conditions: tuple[str, str]  # (source, target)
    features: list[Feature]
    samples: list[Sample]
    translated: list[Sample]
    between: list[effects_module.Effect] | None  # real target vs real source cells
    paired: list[effects_module.Effect] | None  # translations vs their source cells
    agreement: dict[str, Any] | None
    models: list[Any]  # models.ConditionModel, on the real cells
    notes: list[str] = field(default_factory=list)  # what was left out, and why
    vae: Any = None  # vae.VAESummary of the β-VAE on the real cells' crops, if trained


def as_channels_first(image: np.ndarray, path: Path) -> np.ndarray:
    """(C, H, W) of a grayscale, channels-first or channels-last (<= 4 channels) 2-D image."""
    array = np.asarray(image)
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3 and array.shape[0] <= 4 < min(array.shape[1:]):
        return array
    if array.ndim == 3 and array.shape[-1] <= 4 < min(array.shape[:2]):
        return np.moveaxis(array, -1, 0)
    raise PhenotwinError(f"{path} is {array.shape}; explain takes 2-D images, grayscale or with up to 4 channels "
                         "(first or last). Export one plane of a stack per file.")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def read_conditions(data: Path) -> dict[str, list[Path]]:
    """DIR/<condition>/* -> the image files of each condition."""
    data = Path(data)
    if not data.is_dir():
        raise PhenotwinError(f"data folder {data} does not exist. Give a folder with one subfolder of images per "
                             f"condition, e.g. {data}/control/*.tif and {data}/treated/*.tif.")
    found = {p.name: _images(p) for p in sorted(data.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    found = {name: files for name, files in found.items() if files}
    if not found:
        raise PhenotwinError(f"{data} has no subfolder holding images; put each condition's images in its own "
                             f"subfolder, e.g. {data}/control/*.tif.")
    return found


def read_translations(folder: Path) -> list[tuple[Path, Path, str]]:
    """(translation, its input, target) for every finished image in a `phenotwin translate` output folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PhenotwinError(f"--translated {folder} does not exist; give the --output folder of phenotwin translate.")
    found = []
    for record_file in sorted(folder.rglob("*.json")):
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("status") == "done" and "translated" in record:
            found.append((folder / record["translated"], Path(record["input"]), str(record["target"])))
    if not found:
        raise PhenotwinError(f"{folder} holds no finished translation records (the JSON files phenotwin translate "
                             "writes beside each result); translate the source images into it first.")
    return found


def labels_for(path: Path, data: Path, labels_dir: Path | None, shape: tuple[int, int]) -> np.ndarray | None:
    """The labels file mirroring `path` below `data` in `labels_dir` (any image suffix), checked."""
    if labels_dir is None:
        return None
    try:
        relative = path.resolve().relative_to(Path(data).resolve())
    except ValueError:
        relative = Path(path.name)
    stem = relative.with_suffix("")
    candidates = [Path(labels_dir) / stem.with_suffix(s) for s in IMAGE_SUFFIXES] + \
                 [Path(labels_dir) / stem.parent / f"{stem.name}_labels{s}" for s in IMAGE_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            labels = np.squeeze(read_image(candidate))
            return check_labels(labels, shape, f"labels {candidate}")
    raise PhenotwinError(f"no labels for {path} in {labels_dir} (looked for {candidates[0]}). Give one labels file per "
                         "image with the same relative path, or leave out --labels to segment the cells here.")


def feature_key(name: str) -> str:
    return re.sub(r"\W+", "_", name.strip()).strip("_").lower() or "channel"


def explain_steps(data: Path, translated: Path | None = None, labels_dir: Path | None = None,
                  source: str | None = None, target: str | None = None, channel_names: list[str] | None = None,
                  nucleus_channel: int | None = 0, k: int = 5, formula: bool = True, seed: int = 0,
                  max_images: int | None = None, cnn: bool = True, vae: bool = True,
                  vae_steps: int | None = None) -> Steps[Explanation]:
    """Read, segment, measure, compare and model; yields a `Progress` per image measured.
    `cnn` and `vae` train the image models on the cells' crops (`vae_steps`: the β-VAE's budget)."""
    from phenotwin.explain.models import fit_models

    if vae_steps is not None and vae_steps < 1:
        raise PhenotwinError(f"--vae-steps must be 1 or more (got {vae_steps}); use --no-vae to skip the β-VAE.")
    conditions = read_conditions(data)
    pairs = read_translations(translated) if translated is not None else []
    if pairs:
        targets = {t for _, _, t in pairs}
        if target is None and len(targets) > 1:
            raise PhenotwinError(f"{translated} holds translations to {', '.join(sorted(targets))}; pick one with --target.")
        target = target or targets.pop()
        pairs = [p for p in pairs if p[2] == target]
        sources = {p[1].resolve().parent.name for p in pairs}
        source = source or (sources.pop() if len(sources) == 1 else None)
    names = list(conditions)
    source = source or (names[0] if names[0] != target else names[-1])
    target = target or next((n for n in names if n != source), None)
    if source not in conditions:
        raise PhenotwinError(f"no condition folder {source!r} in {data} (it has {', '.join(names)}).")
    if target not in conditions and not pairs:
        raise PhenotwinError(f"{data} has one condition only ({', '.join(names)}); explaining a change needs the images "
                             "of two conditions (DIR/<a>/, DIR/<b>/) or translations of them (--translated).")
    samples = [Sample(p, c, np.empty(0)) for c in (source, target) if c in conditions
               for p in conditions[c][:max_images]]
    by_path = {s.path.resolve(): s for s in samples}
    translations = []
    for result, origin, _ in pairs[:max_images]:
        if origin.resolve() not in by_path:
            by_path[origin.resolve()] = Sample(origin, source, np.empty(0))
            samples.append(by_path[origin.resolve()])
        translations.append(Sample(result, f"{target} (translated)", np.empty(0), source=by_path[origin.resolve()]))
    for sample in [*samples, *translations]:
        sample.image = as_channels_first(read_image(sample.path), sample.path).astype(np.float64)
    channels = samples[0].image.shape[0]
    for sample in [*samples, *translations]:
        if sample.image.shape[0] != channels:
            raise PhenotwinError(f"{sample.path} has {sample.image.shape[0]} channel(s) but {samples[0].path} has "
                                 f"{channels}; compare images of the same stains.")
    for t in translations:
        if t.image.shape != t.source.image.shape:
            raise PhenotwinError(f"the translation {t.path} is {t.image.shape} but its source {t.source.path} is "
                                 f"{t.source.image.shape}; give the translation of this very image.")
    channel_names = list(channel_names or [f"channel {c + 1}" for c in range(channels)])
    if len(channel_names) != channels:
        raise PhenotwinError(f"{len(channel_names)} channel name(s) given for {channels}-channel images; give one per channel.")
    if nucleus_channel is not None and not 0 <= nucleus_channel < channels:
        raise PhenotwinError(f"nucleus channel {nucleus_channel} does not exist (channels 0..{channels - 1}); "
                             "give the index of the nuclear stain, or -1 for none.")
    keys = [feature_key(n) for n in channel_names]
    features = [Feature(f.key, f.words.replace(f.channel, channel_names[keys.index(f.channel)], 1), f.unit, f.channel)
                if f.channel else f for f in feature_list(keys)]
    ranges = intensity_ranges([s.image for s in [*samples, *translations]])
    work = [*samples, *translations]
    nuclei: dict[int, np.ndarray | None] = {}
    for i, sample in enumerate(work):
        yield Progress("measure cells", i, len(work))
        if sample.source is None:
            sample.labels = labels_for(sample.path, data, labels_dir, sample.image.shape[1:])
            if sample.labels is None:
                sample.labels, sample.segmented = segment_cells(sample.image, nucleus_channel), True
            nuclei[id(sample)] = nucleus_mask(sample.image, nucleus_channel)
            labels, nucleus = sample.labels, nuclei[id(sample)]
        else:
            labels, nucleus = sample.source.labels, nuclei[id(sample.source)]
        for row in cell_features(sample.image, labels, keys, ranges, nucleus_channel, nucleus):
            sample.rows.append({"condition": sample.condition, "image": str(sample.path), **row})
    yield Progress("measure cells", len(work), len(work))
    cells = {c: [r for s in samples if s.condition == c for r in s.rows] for c in (source, target)}
    if not any(cells.values()):
        raise PhenotwinError("no cells were found in any image; check the labels (or the segmentation in labels/).")
    between = paired = agreement = summary = None
    models: list[Any] = []
    notes = []
    if cells[target]:
        between = effects_module.compare(cells[source], cells[target], features, paired=False, seed=seed)
        try:
            models = fit_models(cells[source], cells[target], features, (source, target), k=k, seed=seed,
                                formula=formula)
        except PhenotwinError as err:  # the effects stand without a model; the report says why there is none
            notes.append(f"no model of the condition: {err}")
        if models and (cnn or vae):
            summary = yield from _image_models(models, [s for s in samples if s.condition in (source, target)],
                                               ranges, (source, target), channel_names, k, seed, cnn, vae, vae_steps)
    if translations:
        before = [r for t in translations for r in t.source.rows]
        after = [r for t in translations for r in t.rows]
        paired = effects_module.compare(before, after, features, paired=True, seed=seed)
        if between is not None:
            agreement = effects_module.agreement(paired, between)
    return Explanation((source, target), features, samples, translations, between, paired, agreement, models, notes,
                       summary)


def _image_models(models: list[Any], samples: list[Sample], ranges: np.ndarray, conditions: tuple[str, str],
                  channel_names: list[str], k: int, seed: int, cnn: bool, vae: bool, vae_steps: int | None):
    """Add the CNN black box and the sparse model on the β-VAE's factors to `models` (on the real cells'
    crops, in the cells' order of `fit_models`, so `split` draws the same cells); return the β-VAE's summary."""
    from phenotwin.explain.crops import cell_crops, crop_window
    from phenotwin.explain.models import cnn_black_box, latent_model, relate, split
    from phenotwin.explain.vae import VAE_STEPS, train_vae_steps

    window = crop_window([s.labels for s in samples])
    crops = np.concatenate([cell_crops(s.image, s.labels, [r["label"] for r in s.rows], ranges, window)
                            for c in conditions for s in samples if s.condition == c])
    y = np.r_[[0] * sum(len(s.rows) for s in samples if s.condition == conditions[0]),
              [1] * sum(len(s.rows) for s in samples if s.condition == conditions[1])]
    train, test = split(y, seed)
    summary = None
    if cnn:
        yield Progress("train CNN black box", 0, 1)
        models.insert(1, cnn_black_box(crops, y, train, test, conditions, seed))
        yield Progress("train CNN black box", 1, 1)
    if vae:
        shown = np.r_[test[y[test] == 0][:3], test[y[test] == 1][:3]]  # held-out cells of both conditions
        summary = yield from train_vae_steps(crops, train, channel_names, steps=vae_steps or VAE_STEPS, seed=seed,
                                             examples=shown)
        models.append(latent_model(summary.latents, y, train, test, conditions, k, seed, summary.active()))
    relate(models)
    return summary
