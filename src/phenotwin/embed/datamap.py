"""`phenotwin embed map`: a user's data folder on the phenotype map, with its numbers and a report.

The images of DIR/<condition>/* (batches from DIR/batches.csv when there is one) go through either
a trained batch-robust encoder (`phenotwin embed train`) or an Affinity-VAE trained here on the
same images (its content latents, the pose left out). The features are projected to 2-D by the
dock's own projection (`phenomap.Projection`) and measured by `metrics.feature_report` (kNN and
silhouettes by condition and by batch). Written into --out, atomically, with a manifest, so that a
rerun with --overwrite replaces only what phenotwin wrote:

    map.png      the map, coloured by condition, one marker per batch
    map.csv      one row per image: file, condition, batch, x, y, then the feature vector
    map.json     the numbers, the projection's explained variance, how the features were made
    report.md    the numbers in words
    vae.safetensors, vae.json   with --vae (or --vae-from): the VAE and the map's axes, so that other data
                 can be placed on the same map (`saved_map`)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phenotwin.checkpoint import MANIFEST_FILE
from phenotwin.embed.saved_map import MAP_JSON, VAE_INFO, VAE_WEIGHTS, describe_vae, landmarks_of
from phenotwin.errors import PhenotwinError
from phenotwin.progress import Progress, Steps

MAP_PNG, MAP_CSV, REPORT = "map.png", "map.csv", "report.md"
ENTRIES = (MAP_PNG, MAP_CSV, MAP_JSON, REPORT, VAE_WEIGHTS, VAE_INFO, MANIFEST_FILE)
MARKERS = "os^DvP*Xph<>"


@dataclass
class DataMap:
    files: list[str]                 # relative to the data folder
    conditions: list[str]
    batches: list[str] | None        # None: the data have no batches.csv
    features: np.ndarray             # (N, D)
    coords: np.ndarray               # (N, 2) in [0, 1] along the longer axis
    explained: list[float]
    metrics: dict
    source: dict                     # how the features were made
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # more per-image columns (the VAE's pose)
    projection: Any = None           # the `phenomap.Projection` that made `coords`
    vae: tuple | None = None         # a VAE map's (model, description) to save for reuse (`saved_map`)
    landmarks: tuple | None = None   # on a saved map: (its conditions, (K, 2) where their means lie)


def check_conditions(root: Path) -> None:
    """A map compares conditions: refuse one condition folder by name before reading anything."""
    from phenotwin.io import IMAGE_SUFFIXES

    if not root.is_dir():
        raise PhenotwinError(f"data folder {root} does not exist. Give a folder with one subfolder per condition.")
    found = [p.name for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
             and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir())]
    if len(found) == 1:
        raise PhenotwinError(f"{root} has one condition ({found[0]!r}); a map shows how conditions differ, and its "
                             "silhouettes and kNN accuracies need at least two. Add a subfolder with the images of "
                             f"another condition (e.g. {root}/control/*.tif beside {root}/{found[0]}/), or place these "
                             "cells on a VAE map made before with --vae-from MAP_DIR.")


def _load(root: Path, normalization: dict | None, min_conditions: int = 2):
    """The data (and whether they have batches.csv); one condition only where `min_conditions` is 1 (cells
    placed on a saved map are compared with the map's own conditions)."""
    from phenotwin.embed.data import load_batched
    from phenotwin.synthetic.batches import BATCHES_FILE

    if min_conditions > 1:
        check_conditions(root)
    data = load_batched(root, 8, normalization=normalization, require_batches=False, min_batches=1,
                        min_conditions=min_conditions)
    return data, (root / BATCHES_FILE).is_file()


def encoder_map_steps(data_dir, encoder_dir) -> Steps[DataMap]:
    """The map of `data_dir` in the features of a trained encoder."""
    from phenotwin.embed.model import load_encoder

    root = Path(data_dir)
    encoder = load_encoder(encoder_dir)
    data, known = _load(root, encoder.info["normalization"])
    encoder.check_fits(data.images.images, data.images.files)
    images = data.stacked()
    features = []
    for start in range(0, len(images), 64):
        features.append(encoder.features(images[start: start + 64], raw=False))
        yield Progress("encode", min(start + 64, len(images)), len(images))
    source = {"kind": "encoder", "encoder": str(encoder_dir), "method": encoder.info.get("method"),
              "encoder_steps": encoder.info.get("steps")}
    return _finish(root, data, known, np.concatenate(features), source)


def vae_map_steps(data_dir, steps: int = 400, size: int = 32, affinity: str | None = None,
                  affinity_from: str | None = None, gamma: float = 1.0, seed: int = 0) -> Steps[DataMap]:
    """The map of `data_dir` in the content latents of an Affinity-VAE trained on it (pose left out).

    The affinity matrix comes from a CSV (`affinity`) or an encoder's class-mean similarities
    (`affinity_from`); without either, gamma is 0 (a pose VAE with cyclical beta, no affinity loss)."""
    from phenotwin.embed.affinity_vae import (
        VAEConfig,
        affinity_from_features,
        collapse_warning,
        latents,
        read_affinity,
        reconstruction_error,
        train_vae_steps,
        vae_inputs,
    )
    from phenotwin.progress import relabel

    if affinity and affinity_from:
        raise PhenotwinError("give either --affinity CSV or --affinity-from ENCODER_DIR, not both.")
    root = Path(data_dir)
    data, known = _load(root, None)
    stacked = data.stacked()
    images = vae_inputs(stacked, size)
    matrix = None
    if affinity:
        matrix = read_affinity(affinity, data.classes)
    elif affinity_from:
        from phenotwin.embed.model import load_encoder

        encoder = load_encoder(affinity_from)
        encoder.check_fits(data.images.images, data.images.files)
        matrix = affinity_from_features(encoder.features(np.stack(data.images.images)),
                                        data.labels, len(data.classes))
    config = VAEConfig(steps=steps, gamma=gamma if matrix is not None else 0.0, seed=seed)
    model, history = yield from relabel(train_vae_steps(images, data.labels, config, matrix), "train map", 0, steps)
    content, angles = latents(model, images)
    description = describe_vae(config, stacked, size, data.classes, data.images.low, data.images.high)
    description["landmarks"] = landmarks_of(content, data.labels, data.classes)
    source = {"kind": "affinity-vae", "steps": steps, "size": size, "gamma": config.gamma, "latent": config.latent,
              "beta": config.beta, "cycle": config.cycle, "seed": seed,
              "affinity": None if matrix is None else matrix.tolist(),
              "affinity_from": affinity or affinity_from or None,
              "reconstruction_mse": reconstruction_error(model, images), "warning": collapse_warning(content),
              "final_losses": {k: float(np.mean(v[-20:])) for k, v in history.items()}}
    result = _finish(root, data, known, content, source, {"pose_degrees": np.rad2deg(angles)})
    result.vae = (model, description)
    return result


def placed_vae_map_steps(data_dir, map_dir) -> Steps[DataMap]:
    """The map of `data_dir` on a saved VAE map (`--vae-from`): the cells encoded by its VAE, normalised
    with its first data's range, and projected on its axes; nothing is trained. One condition is enough:
    each is compared with the map's own conditions (`nearest_conditions`)."""
    from phenotwin.embed.affinity_vae import latents, reconstruction_error, vae_inputs
    from phenotwin.embed.phenomap import Projection
    from phenotwin.embed.saved_map import load_vae_map, nearest_conditions, placement_warnings

    saved = load_vae_map(map_dir)
    info = saved.info
    root = Path(data_dir)
    data, known = _load(root, info["normalization"], min_conditions=1)
    if data.images.channels != info["channels"]:
        raise PhenotwinError(f"{root} has {data.images.channels}-channel images but the map in {map_dir} was made "
                             f"from {info['channels']}-channel ones: place images of the same channels on it.")
    yield Progress("encode", 0, 1)
    stacked = data.stacked()
    images = vae_inputs(stacked, int(info["size"]))
    content, angles = latents(saved.model, images)
    yield Progress("encode", 1, 1)
    source = {"kind": "affinity-vae", "vae_from": str(map_dir), "trained_on": info["classes"],
              **{k: info[k] for k in ("steps", "size", "gamma", "latent", "seed")},
              "reconstruction_mse": reconstruction_error(saved.model, images),
              "warning": placement_warnings(info, data.images.images, min(stacked.shape[-2:]), content)}
    result = _finish(root, data, known, content, source, {"pose_degrees": np.rad2deg(angles)},
                     Projection.from_record(info["projection"]))
    result.vae = (saved.model, {k: v for k, v in info.items() if k not in ("format", "format_version", "projection")})
    if "landmarks" in info:
        marks = info["landmarks"]
        result.metrics["nearest_map_condition"] = nearest_conditions(content, result.conditions, marks)
        result.landmarks = (marks["classes"], result.projection(np.asarray(marks["means"], np.float64)))
    return result


def _finish(root: Path, data, known: bool, features: np.ndarray, source: dict, extra=None,
            projection=None) -> DataMap:
    """The DataMap of `features`, on `projection` (a saved map's) or on one fitted to them."""
    from phenotwin.embed.metrics import feature_report
    from phenotwin.embed.phenomap import Projection

    explained = None if projection is None else projection.share_of(features)  # of these features, not the map's
    projection = projection or Projection.fit(features, span=1.0)
    batches = [data.batch_names[b] for b in data.batches] if known else None
    metrics = feature_report(features, data.labels, data.batches if known else None)
    return DataMap([f.relative_to(root).as_posix() for f in data.images.files],
                   [data.classes[label] for label in data.labels], batches, features, projection(features),
                   explained or projection.explained, metrics, source, extra or {}, projection)


def draw(result: DataMap, figure) -> None:
    """Points coloured by condition, one marker per batch, into a matplotlib figure."""
    ax = figure.add_subplot(1, 1, 1)
    conditions = sorted(set(result.conditions))
    batches = sorted(set(result.batches)) if result.batches else [None]
    for c, condition in enumerate(conditions):
        for b, batch in enumerate(batches):
            pick = [i for i, cond in enumerate(result.conditions) if cond == condition
                    and (batch is None or result.batches[i] == batch)]
            if pick:
                ax.scatter(result.coords[pick, 0], result.coords[pick, 1], s=18, color=f"C{c % 10}",
                           marker=MARKERS[b % len(MARKERS)], alpha=0.8,
                           label=condition if batch is None else f"{condition}, {batch}")
    if result.landmarks is not None:  # the saved map's own conditions, where these cells are compared with them
        names, where = result.landmarks
        ax.scatter(where[:, 0], where[:, 1], s=90, color="black", marker="X", label="the map's conditions (means)")
        for name, (x, y) in zip(names, where):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel(f"PC 1 ({100 * result.explained[0]:.0f}% of the variance)")
    ax.set_ylabel(f"PC 2 ({100 * result.explained[1]:.0f}% of the variance)")
    kind = (f"{result.source['method']} encoder" if result.source["kind"] == "encoder"
            else "Affinity-VAE content latents")
    ax.set_title(f"Phenotype map ({kind}): colour = condition" + (", marker = batch" if result.batches else ""))
    ax.legend(fontsize=7, loc="best", markerscale=1.2)


def check_out(out: Path, data_dir: Path, overwrite: bool) -> None:
    """Before any work: the map must not land among the conditions, nor replace what is not phenotwin's."""
    from phenotwin.output_folder import check_output

    out, data_dir = Path(out), Path(data_dir)
    if out.resolve().is_relative_to(data_dir.resolve()):
        raise PhenotwinError(f"--out {out} is inside --data {data_dir}: it would be read as a condition next time. "
                             "Choose a folder outside the data.")
    check_output(out, ENTRIES, overwrite)


def write_map(result: DataMap, out: Path, overwrite: bool = False, command: str = "") -> Path:
    """Write map.png, map.csv, map.json and report.md into `out` (see the module docstring); returns the report."""
    from matplotlib.figure import Figure

    from phenotwin.io import prepare_folder, write_csv, write_json, write_png_figure, write_text, writing_into
    from phenotwin.output_folder import check_output, record_written

    out = Path(out)
    check_output(out, ENTRIES, overwrite)
    prepare_folder(out, "--out")
    width = len(str(result.features.shape[1] - 1))
    names = [f"feature_{d:0{width}d}" for d in range(result.features.shape[1])]
    rows = [{"file": f, "condition": c, "batch": result.batches[i] if result.batches else "",
             "x": f"{result.coords[i, 0]:.6f}", "y": f"{result.coords[i, 1]:.6f}",
             **{k: f"{v[i]:.6g}" for k, v in result.extra.items()},
             **{n: f"{value:.6g}" for n, value in zip(names, result.features[i])}}
            for i, (f, c) in enumerate(zip(result.files, result.conditions))]
    record = {"command": command, "source": result.source, "images": len(result.files),
              "conditions": {c: result.conditions.count(c) for c in sorted(set(result.conditions))},
              "batches": None if result.batches is None else
              {b: result.batches.count(b) for b in sorted(set(result.batches))},
              "projection": {"method": "PCA", "explained_variance": result.explained}, "metrics": result.metrics}
    with writing_into(out):
        written = [write_csv(out / MAP_CSV, ["file", "condition", "batch", "x", "y", *result.extra, *names],
                             rows).name]
        figure = Figure(figsize=(6.4, 5.2))
        draw(result, figure)
        written.append(write_png_figure(out / MAP_PNG, figure).name)
        written.append(write_json(out / MAP_JSON, record).name)
        written.append(write_text(out / REPORT, report_markdown(record)).name)
        if result.vae is not None:
            from phenotwin.embed.saved_map import save_vae_map

            written += save_vae_map(out, *result.vae, result.projection.record())
        else:  # an encoder's map replacing a VAE map: its VAE no longer matches map.png (only ours: check_output)
            for name in (VAE_WEIGHTS, VAE_INFO):
                (out / name).unlink(missing_ok=True)
        record_written(out, written)
    return out / REPORT


def report_markdown(record: dict) -> str:
    """The numbers in words: what a batch-robust map looks like, and what these show."""
    m, source = record["metrics"], record["source"]
    if source["kind"] == "encoder":
        made = f"the features of the encoder `{source['encoder']}` ({source['method']}, {source['encoder_steps']} steps)"
    else:
        made = (f"the content latents (pose left out) of an Affinity-VAE trained here for {source['steps']} steps on "
                f"{source['size']} px crops, gamma {source['gamma']:g}, reconstruction MSE "
                f"{source['reconstruction_mse']:.4f}")
        if source.get("vae_from"):
            made = (f"the content latents (pose left out) of the Affinity-VAE of the map `{source['vae_from']}` "
                    f"(trained on {', '.join(source['trained_on'])} for {source['steps']} steps), on that map's "
                    f"axes; reconstruction MSE of these images {source['reconstruction_mse']:.4f}")
    lines = ["# Phenotype map", "", f"{record['images']} images: "
             + ", ".join(f"{n} {c}" for c, n in record["conditions"].items())
             + ("" if record["batches"] is None else "; batches " + ", ".join(f"{b} ({n})" for b, n
                                                                           in record["batches"].items()))
             + f". The map is a PCA of {made}; its two axes show "
             f"{100 * sum(record['projection']['explained_variance']):.0f}% of their variance."]
    rows = []
    if "knn_condition_accuracy" in m:  # one condition placed on a saved map has nothing to tell apart
        rows += [f"| kNN condition accuracy | {m['knn_condition_accuracy']:.3f} | {m['condition_chance']:.3f} |",
                 f"| silhouette by condition | {m['silhouette_condition']:.3f} | 0 |"]
    if "knn_batch_accuracy" in m:
        rows += [f"| kNN batch accuracy | {m['knn_batch_accuracy']:.3f} | {m['batch_chance']:.3f} |",
                 f"| silhouette by batch | {m['silhouette_batch']:.3f} | 0 |"]
    if rows:
        lines += ["", "| measure | value | chance |", "| --- | --- | --- |", *rows]
    lines += ["", "kNN: 5 nearest neighbours, 5-fold cross-validated; silhouettes: cosine, from -1 to 1. Conditions "
              "the features tell apart have a kNN condition accuracy well above chance and a silhouette above 0."]
    if "knn_batch_accuracy" in m:
        lines += ["Features that ignore batch effects have a kNN batch accuracy near chance and a silhouette by "
                  "batch near 0; a batch accuracy well above chance means the plates, not only the conditions, "
                  "set the images apart."]
    else:
        lines += ["The data have no batches.csv (or one batch), so batch effects are not measured."]
    if "nearest_map_condition" in m:
        nearest = m["nearest_map_condition"]
        names = list(next(iter(nearest.values()))["distances"])
        lines += ["", "Where these conditions land among the map's own (black crosses on map.png): the distance of "
                  "each one's mean latent to the mean of each of the map's conditions, in units of the map cells' mean "
                  "distance to their own condition's mean (1 or less: as close as the map's own cells are).", "",
                  "| these cells | " + " | ".join(names) + " | nearest |", "| --- |" + " --- |" * (len(names) + 1)]
        lines += [f"| {c} | " + " | ".join(f"{row['distances'][n]:.2f}" for n in names) + f" | {row['nearest']} |"
                  for c, row in nearest.items()]
    if source.get("warning"):
        lines += ["", f"**Warning: {source['warning']}**"]
    if source["kind"] != "encoder" and source["gamma"] and not source.get("vae_from"):
        lines += ["", "The affinity loss was trained with these conditions' labels, so the separation by condition "
                  "is partly taught: judge it on images the map did not train on."]
    lines += ["", "Files: map.png (colour = condition, marker = batch), map.csv (one row per image: its map position "
              "x, y and its feature vector), map.json (these numbers)"
              + ("" if source["kind"] == "encoder" else ", vae.safetensors and vae.json (the VAE and the map's axes: "
                 "`phenotwin embed map --vae-from` this folder places other data on the same map)") + ".",
              "", f"Command: `{record['command']}`", ""]
    return "\n".join(lines)
