"""Do translations change the condition and keep the cell? Measured on held-out images.

For every ordered pair of conditions (or the one asked for), the first `n` images of the
source condition are inverted once and regenerated under the target at each strength:
- flip rate: fraction of translations a condition classifier calls the target (the
  classifier is trained here on real images; its own held-out accuracy is reported);
- reconstruction PSNR and SSIM: the input regenerated under its own condition;
- FID/KID of translations vs real target images (torch-fidelity), when Inception weights exist;
  and in a trained encoder's features (phenotwin.embed.fid), offline, when an encoder is given;
- with synthetic paired data (the same cell in every condition folder): counterfactual ratio
  and heatmap AUROC against the true change mask.
Images are evaluated as their central model-size crop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phenotwin.cost import confine_calls, generation_calls
from phenotwin.errors import PhenotwinError
from phenotwin.evaluate.classifier import CLASSIFIER_EPOCHS, CLASSIFIER_IMAGES
from phenotwin.evaluate.metrics import (
    auroc,
    counterfactual_ratio,
    fid_kid,
    find_inception_weights,
    roc_curve,
    smooth,
    ssim,
)
from phenotwin.progress import Progress, Steps, relabel

SYNTHETIC_NAME = re.compile(r"^(obvious|subtle|texture)_(\d+)_(\d+)$")
SIGMAS = (0, 1, 2)


@dataclass
class EvalSet:
    """Raw (N, C, S, S) images per condition. With `aligned`, image i is the same cell in every
    condition (synthetic pairs) and `masks[i]` is its true change mask. `batches[condition][i]`:
    image i's batch (plate, day): from the folder's batches.csv, or the training split's batch labels
    (`train.selection.eval_set`); None without either."""

    classes: list[str]
    images: dict[str, np.ndarray]
    aligned: bool = False
    masks: np.ndarray | None = None
    fingerprint: str | None = None
    batches: dict[str, list[str]] | None = None
    batches_error: str | None = None  # why the folder's batches.csv could not be read: said to batch models only

    def batch_for(self, translator, condition: str, index: int) -> str | None:
        """The batch to translate image `index` of `condition` in: its own when the model was trained with
        it, else None (the model's "batch unknown" row, also for a plate the model never saw)."""
        if self.batches_error and translator.info.batches:
            raise PhenotwinError(self.batches_error)
        if not self.batches or not translator.info.batches:
            return None
        batch = self.batches[condition][index]
        return batch if batch in translator.info.batches else None


def _centre_crop(chw: np.ndarray, size: int) -> np.ndarray:
    y, x = (chw.shape[1] - size) // 2, (chw.shape[2] - size) // 2
    return chw[:, y : y + size, x : x + size]


def _synthetic_masks(stems: list[str], shape: tuple[int, ...], images: np.ndarray) -> np.ndarray | None:
    """True change masks of synthetic cells named `<phenotype>_<seed>_<index>` (as `phenotwin synthetic`
    writes them), re-rendered with `make_pairs`; None unless every re-rendered cell matches its file."""
    from phenotwin.synthetic import as_camera_units, make_pairs

    masks = []
    for stem, image in zip(stems, images):
        phenotype, seed, index = SYNTHETIC_NAME.match(stem).groups()
        if shape[0] not in (1, 2, 3):
            return None
        pairs = make_pairs(1, size=shape[1], channels=shape[0], phenotype=phenotype, seed=int(seed), start=int(index))
        cells = (pairs.control[0], pairs.treated[0])
        if not any(np.array_equal(as_camera_units(cell).astype(np.float32), image) for cell in cells):
            return None
        masks.append(pairs.change_mask[0])
    return np.stack(masks)


def from_pairs(pairs) -> EvalSet:
    """An `EvalSet` of synthetic `make_pairs` cells in camera units, as `phenotwin synthetic` writes them."""
    from phenotwin.synthetic import as_camera_units

    control, treated = pairs.condition_names
    images = {control: as_camera_units(pairs.control).astype(np.float32),
              treated: as_camera_units(pairs.treated).astype(np.float32)}
    return EvalSet([control, treated], images, True, pairs.change_mask)


def load_eval_folder(data, size: int, channels: int, n: int | None = None) -> EvalSet:
    """DIR/<condition>/* as an `EvalSet` (central crops; the first `n` per condition for the synthetic masks)."""
    from phenotwin.synthetic.batches import BATCHES_FILE, read_batches
    from phenotwin.train.data import load_condition_folders

    loaded = load_condition_folders(data, min_size=size)
    if loaded.channels != channels:
        raise PhenotwinError(f"{data} has {loaded.channels}-channel images but the model takes {channels}: "
                             "evaluate on images like the ones it was trained on.")
    images, names = {}, {}
    for c, condition in enumerate(loaded.classes):
        members = np.flatnonzero(loaded.labels == c)
        names[condition] = [loaded.files[i].stem for i in members]
        images[condition] = np.stack([_centre_crop(loaded.images[i], size) for i in members])
    stems = names[loaded.classes[0]]
    aligned = all(names[c] == stems for c in loaded.classes) and all(SYNTHETIC_NAME.match(s) for s in stems)
    masks = None
    if aligned and n != 0:
        count = len(stems) if n is None else min(n, len(stems))
        full = [loaded.images[i] for i in np.flatnonzero(loaded.labels == 0)[:count]]
        masks = _synthetic_masks(stems[:count], full[0].shape, full)
        if masks is not None:
            y, x = (full[0].shape[1] - size) // 2, (full[0].shape[2] - size) // 2
            masks = masks[:, y : y + size, x : x + size]
    aligned = masks is not None
    batches, error = None, None
    if (Path(data) / BATCHES_FILE).is_file():  # a model without batches needs none: an error waits for one that does
        try:
            by_file = read_batches(data, min_batches=1)
            batches = {condition: [by_file[loaded.files[i].relative_to(Path(data)).as_posix()]
                                   for i in np.flatnonzero(loaded.labels == c)]
                       for c, condition in enumerate(loaded.classes)}
        except PhenotwinError as err:
            error = str(err)
    return EvalSet(list(loaded.classes), images, aligned, masks, loaded.fingerprint, batches, error)


def evaluate_folder_steps(checkpoint, data, classifier_data=None, n: int = 16, steps: int | None = None,
                          strengths=None, source=None, target=None, inception_weights=None, seed: int = 0,
                          device: str = "auto", features=None) -> Steps[dict]:
    """Load the model and the folders, then `translation_steps`: the whole check, for the CLI and napari."""
    from phenotwin import Translator

    translator = Translator(checkpoint, device=device)
    images = load_eval_folder(data, translator.image_size, translator.channels, n)
    reference = None
    if classifier_data is not None:
        reference = load_eval_folder(classifier_data, translator.image_size, translator.channels, 0)
    return (yield from translation_steps(translator, images, reference, n=n, steps=steps, strengths=strengths,
                                         source=source, target=target, inception_weights=inception_weights, seed=seed,
                                         features=features))


def _directions(classes, source, target):
    pairs = [(s, t) for s in classes for t in classes if s != t]
    chosen = [(s, t) for s, t in pairs if source in (None, s) and target in (None, t)]
    if not chosen:
        raise PhenotwinError(f"no translation from {source or 'any'} to {target or 'any'} among conditions {', '.join(classes)}.")
    return chosen


def require_conditions(translator, data: EvalSet) -> None:
    """Refuse data that lack a folder for one of the model's conditions."""
    missing = [c for c in translator.classes if c not in data.classes]
    if missing:
        raise PhenotwinError(f"the data have no folder for the model's condition(s) {', '.join(missing)}; give "
                             f"images of every condition it knows ({', '.join(translator.classes)}).")


def condition_classifier(translator, data: EvalSet, seed: int, epochs: int = CLASSIFIER_EPOCHS):
    """The condition classifier trained on up to CLASSIFIER_IMAGES of each condition of `data` (model
    range), and those images by condition."""
    from phenotwin.evaluate.classifier import train_classifier

    real = {c: translator.processor.to_model_range(data.images[c][:CLASSIFIER_IMAGES]) for c in translator.classes}
    labels = np.concatenate([np.full(len(real[c]), i) for i, c in enumerate(translator.classes)])
    return train_classifier(np.concatenate(list(real.values())), labels, translator.classes, epochs=epochs,
                            seed=seed), real


def translation_steps(translator, data: EvalSet, classifier_data: EvalSet | None = None, n: int = 16,
                      steps: int | None = None, strengths=None, source: str | None = None, target: str | None = None,
                      inception_weights=None, seed: int = 0, guidance: float | None = None,
                      classifier_epochs: int = CLASSIFIER_EPOCHS, confine: bool | None = None, features=None,
                      mask_draws: int | None = None) -> Steps[dict]:
    """Evaluate `translator` on `data` (see the module docstring); returns the JSON-ready result.

    `features` (an encoder folder of `phenotwin embed train`) adds FID/KID in its feature space, offline.
    `classifier_data` (default: `data`) trains the condition classifier. Yields one `Progress`
    per diffusion step over the whole run ("translate"), after a "classifier" stage.
    """

    require_conditions(translator, data)
    if n < 1:
        raise PhenotwinError(f"n must be at least 1, got {n}.")
    settings = translator.resolve(steps=steps, guidance=guidance, seed=seed, confine=confine, mask_draws=mask_draws)
    steps, guidance, confine = settings.steps, settings.guidance, settings.confine
    rungs = [translator.resolve(settings, strength=s) for s in (strengths or [settings.strength])]
    strengths = [rung.strength for rung in rungs]
    directions = _directions(translator.classes, source, target)
    weights, fid_message = find_inception_weights(inception_weights)
    if features is not None:  # a wrong encoder is said before the translations, not after
        from phenotwin.embed.fid import check_encoder, encoder_fid_kid

        encoder = check_encoder(features, translator)

    yield Progress("classifier", 0, 1)
    reference = classifier_data or data
    classifier, real = condition_classifier(translator, reference, seed, classifier_epochs)
    yield Progress("classifier", 1, 1)

    per_image = steps + sum(generation_calls(rung) for rung in rungs) + confine_calls(settings)
    total = per_image * sum(min(n, len(data.images[s])) for s, _ in directions)
    done, rows, examples, collected = 0, [], [], {}
    for src, tgt in directions:
        sources = data.images[src][:n]
        count = len(sources)
        results = {s: [] for s in strengths}
        for i in range(count):
            inversion = yield from relabel(translator.invert_steps(sources[i], src, steps, channel_axis=0,
                                                                   batch=data.batch_for(translator, src, i)),
                                           "translate", done, total)
            done += steps
            if confine:  # once per image, before the strengths that share it
                yield from relabel(translator.edit_mask_steps(inversion, tgt, settings.mask_draws), "translate", done,
                                   total)
                done += confine_calls(settings)
            for rung in rungs:
                translation = yield from relabel(translator.generate_steps(inversion, tgt, settings=rung),
                                                 "translate", done, total)
                done += generation_calls(rung)  # DPM-Solver++: one step more below strength 1
                results[rung.strength].append((translation, ssim(inversion.normalised, translation.reconstruction)))
        source_norm = translator.processor.to_model_range(sources)
        target_index = translator.classes.index(tgt)
        truth = None
        if data.aligned:
            truth = translator.processor.to_model_range(data.images[tgt][:count])
            masks = data.masks[:count]
        for s in strengths:
            translations = np.stack([t.normalised for t, _ in results[s]])
            heatmaps = np.stack([t.heatmap for t, _ in results[s]])
            row = {
                "source": src, "target": tgt, "strength": s, "images": count,
                "flip_rate": float(np.mean(classifier.predict(translations) == target_index)),
                "untranslated_called_target": float(np.mean(classifier.predict(source_norm) == target_index)),
                "reconstruction_psnr": float(np.mean([t.reconstruction_psnr for t, _ in results[s]])),
                "reconstruction_ssim": float(np.mean([v for _, v in results[s]])),
                "per_image": {"reconstruction_psnr": [t.reconstruction_psnr for t, _ in results[s]],
                              "reconstruction_ssim": [v for _, v in results[s]]},
            }
            if truth is not None:
                row["counterfactual_ratio"] = counterfactual_ratio(translations, source_norm, truth)
                row["per_image"]["counterfactual_ratio"] = [counterfactual_ratio(t, x, y) for t, x, y
                                                            in zip(translations, source_norm, truth)]
                row["heatmap_auroc"] = auroc(heatmaps, masks)
                row["heatmap_auroc_by_sigma"] = {str(g): auroc(smooth(heatmaps, g), masks) for g in SIGMAS}
                fpr, tpr = roc_curve(heatmaps, masks)
                row["heatmap_roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
            rows.append(row)
            collected.setdefault(s, {}).setdefault(tgt, []).append(translations)
            if not examples and s == strengths[0]:
                examples = [(sources[k], results[s][k][0], None if truth is None else data.images[tgt][k],
                             None if truth is None else masks[k]) for k in range(min(4, count))]

    fid = {"available": weights is not None, "message": fid_message, "by_strength": {}}
    if weights is not None:
        yield Progress("FID/KID", 0, len(strengths))
        real = {c: translator.processor.to_model_range(data.images[c]) for c in translator.classes}
        for k, s in enumerate(strengths):
            by_target = {t: fid_kid(np.concatenate(v), real[t], weights) for t, v in collected[s].items()}
            overall = fid_kid(np.concatenate([np.concatenate(v) for v in collected[s].values()]),
                              np.concatenate([real[t] for t in collected[s]]), weights)
            fid["by_strength"][str(s)] = {"by_target": by_target, "overall": overall}
            yield Progress("FID/KID", k + 1, len(strengths))
    if features is not None:
        fid["encoder"] = encoder_fid_kid(encoder, translator, collected, data, directions, n)

    trained_on = (translator.info.provenance or {}).get("data_fingerprint")
    return {
        "kind": "translation", "checkpoint": translator.checkpoint_id, "classes": translator.classes,
        "steps": steps, "strengths": strengths, "guidance": guidance, "images_per_direction": n, "seed": seed,
        "inversion_refinements": translator.inversion_refinements, "reference": translator.reference,
        "confine": confine,
        "synthetic_ground_truth": data.aligned,
        "data_is_training_data": bool(trained_on and data.fingerprint == trained_on),
        "classifier": {"held_out_accuracy": classifier.held_out_accuracy, "images": int(sum(len(v) for v in real.values())),
                       "trained_on": "classifier data" if classifier_data is not None else "the evaluation data"},
        "results": rows, "fid_kid": fid, "_examples": examples,
    }
