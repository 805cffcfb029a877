"""What the Phenotype map widget shows, computed without Qt: points per cell, arrows per translation.

The cells of a data folder (DIR/<condition>/*) go through the batch-robust encoder (`map_steps`),
or through an Affinity-VAE trained on them here (`vae_map_steps`: its content latents, the pose
left out, with latent traversals of any cell); a PCA fitted on them (scikit-learn) gives the 2-D
map. Translated cells, read from a second folder whose file names start with their source's file
stem, are projected with the same PCA and drawn as arrows from their source cell. Generators: one
Progress per image encoded (or training step), so a worker can show it and stop it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.progress import Progress, Steps

MAP_SPAN = 400.0  # the map's extent in data units (pixels), about a screen next to 64 px cells
TRAVERSAL_SPREAD = 2.0  # a traversal walks this many standard deviations of the cells either way


@dataclass
class PhenotypeMap:
    coords: np.ndarray        # (N, 2) map position of each cell, (row, column) for napari
    conditions: list[str]     # each cell's condition
    files: list[Path]
    images: np.ndarray        # (N, C, H, W) the cells in the encoder's model range
    arrows: np.ndarray        # (M, 2, 2) napari vectors: start (a source cell), then the step to its translation
    arrow_sources: list[int]  # the source cell of each arrow
    traversal: LatentTraversal | None = None  # a VAE map's walks through its latents; None for an encoder's
    warning: str | None = None  # why the map cannot be trusted (a VAE that did not learn), else None
    vae_description: dict | None = None  # a VAE trained here: its vae.json description, for `save_vae`
    landmarks: tuple | None = None  # on a saved map: (its conditions, (K, 2) where their means lie)
    nearest: dict | None = None  # on a saved map: `saved_map.nearest_conditions` of these cells


@dataclass
class Projection:
    """The map's 2-D projection: a PCA (scikit-learn) of the cells' features, shifted and scaled so the
    cells span [0, span] along the longer axis. The one projection of the dock and of `phenotwin embed map`;
    translations are placed with the cells' own PCA, so an arrow shows a move in the same space."""

    pca: object
    origin: np.ndarray
    scale: float

    @classmethod
    def fit(cls, features: np.ndarray, span: float = MAP_SPAN) -> Projection:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=0).fit(features)
        coords = pca.transform(features)
        return cls(pca, coords.min(0), span / max(float(np.ptp(coords, axis=0).max()), 1e-12))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """(N, 2) map positions of (N, D) features."""
        return (self.pca.transform(features) - self.origin) * self.scale

    @property
    def explained(self) -> list[float]:
        """The share of the features' variance each of the two axes shows."""
        return [float(v) for v in self.pca.explained_variance_ratio_]

    def share_of(self, features: np.ndarray) -> list[float]:
        """The share of `features`' variance each of the two axes shows: `explained` for the cells the PCA
        was fitted on, and for other cells placed on a saved map, how much of *their* variation it shows."""
        total = float(np.var(features, axis=0).sum())
        return [float(v) / max(total, 1e-30) for v in np.var(self.pca.transform(features), axis=0)]

    def record(self) -> dict:
        """JSON-ready, for a saved map (`saved_map`); `from_record` reads it back."""
        pca = self.pca
        return {"mean": pca.mean_.tolist(), "components": pca.components_.tolist(),
                "explained_variance": pca.explained_variance_.tolist(),
                "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
                "origin": np.asarray(self.origin).tolist(), "scale": float(self.scale)}

    @classmethod
    def from_record(cls, record: dict, span_scale: float = 1.0) -> Projection:
        """A saved projection, its scale multiplied by `span_scale`: a scikit-learn PCA given its fitted
        values (its transform needs only the mean and components), so new data use the first data's axes."""
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2)
        pca.mean_ = np.asarray(record["mean"], np.float64)
        pca.components_ = np.asarray(record["components"], np.float64)
        pca.explained_variance_ = np.asarray(record["explained_variance"], np.float64)
        pca.explained_variance_ratio_ = np.asarray(record["explained_variance_ratio"], np.float64)
        pca.n_components_, pca.n_features_in_ = 2, pca.components_.shape[1]
        return cls(pca, np.asarray(record["origin"], np.float64), float(record["scale"]) * span_scale)


@dataclass
class LatentTraversal:
    """What an Affinity-VAE map's axes mean in pictures: a cell decoded while its content latent walks
    along the map's first and second axis (the PCA directions, in units of the cells' spread along
    them). Decoded upright (no pose), so only what the latents hold changes along a row."""

    model: object
    latents: np.ndarray  # (N, latent) each cell's content mean
    projection: Projection

    def __call__(self, index: int, count: int = 7) -> np.ndarray:
        """(2, count, C, S, S) in model range: cell `index` along map axis 1 (row 0) and axis 2 (row 1),
        from -TRAVERSAL_SPREAD to +TRAVERSAL_SPREAD standard deviations; the middle image is the cell itself."""
        import torch

        pca = self.projection.pca
        offsets = np.linspace(-TRAVERSAL_SPREAD, TRAVERSAL_SPREAD, count)
        rows = []
        for axis in range(2):
            direction = pca.components_[axis] * np.sqrt(pca.explained_variance_[axis])
            z = self.latents[index][None] + offsets[:, None] * direction[None]
            with torch.no_grad():
                rows.append(self.model.decode(torch.as_tensor(z, dtype=torch.float32)).clamp(-1, 1).numpy())
        return np.stack(rows)


def load_cells(folder, min_conditions: int = 2) -> tuple[np.ndarray, list[str], list[Path], np.ndarray]:
    """(raw (N, C, H, W) images cropped to the smallest size, their conditions, their files, and the
    data's own per-channel range (low, high) as training computes it)."""
    from phenotwin.train.data import load_condition_folders

    data = load_condition_folders(folder, 8, min_conditions=min_conditions)
    h = min(im.shape[1] for im in data.images)
    w = min(im.shape[2] for im in data.images)
    crops = [im[:, (im.shape[1] - h) // 2: (im.shape[1] - h) // 2 + h, (im.shape[2] - w) // 2:
                (im.shape[2] - w) // 2 + w] for im in data.images]
    return np.stack(crops), [data.classes[label] for label in data.labels], data.files, np.stack([data.low, data.high])


def _translations(folder, files: list[Path]) -> tuple[list[int], list[Path]]:
    """(source index, translated file) for every image in `folder` whose name starts with a source's stem;
    a source in the folder of the translation's own folder name wins (`phenotwin translate` mirrors the
    condition folders, and conditions share file names)."""
    from phenotwin.io import IMAGE_SUFFIXES

    pairs = []
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or "heatmap" in path.name:
            continue
        matches = [i for i, f in enumerate(files) if path.name.startswith(f.stem)]
        if matches:
            best = max(matches, key=lambda i: (files[i].parent.name == path.parent.name, len(files[i].stem)))
            pairs.append((best, path))
    if not pairs:
        raise PhenotwinError(f"no image in {folder} is named after a cell of the data (its file name must start "
                             "with the source image's name, as `phenotwin translate` writes them).")
    return [i for i, _ in pairs], [p for _, p in pairs]


def _read_translations(folder, files: list[Path]) -> tuple[list[int], list[np.ndarray]]:
    """(source index, raw (C, H, W) translated image) of every translation in `folder` (`_translations`)."""
    from phenotwin.io import read_image

    if folder is None:
        return [], []
    sources, paths = _translations(folder, files)
    images = [np.asarray(read_image(path), np.float32) for path in paths]
    return sources, [image[None] if image.ndim == 2 else image for image in images]


def _placed(features: np.ndarray, translated: list[np.ndarray], sources: list[int], projection=None):
    """(projection, (N, 2) map positions, (M, 2, 2) arrows from each source cell to its translation), on
    `projection` (a saved map's) or on one fitted to the cells."""
    projection = projection or Projection.fit(features)
    coords = projection(features)
    arrows = np.zeros((0, 2, 2))
    if translated:
        ends = projection(np.stack(translated))
        arrows = np.stack([coords[sources], ends - coords[sources]], axis=1)
    return projection, coords, arrows


def map_steps(encoder_dir, data_folder, translations_folder=None) -> Steps[PhenotypeMap]:
    """Encode the cells (and translations), project them to 2-D; yields a Progress per image."""
    from phenotwin.embed.model import load_encoder

    encoder = load_encoder(encoder_dir)
    raw, conditions, files, _ = load_cells(data_folder)
    encoder.check_fits(list(raw), files)
    sources, translated_images = _read_translations(translations_folder, files)
    total = len(raw) + len(translated_images)
    features = []
    for i in range(len(raw)):
        features.append(encoder.features(raw[i: i + 1])[0])
        yield Progress("map", i + 1, total)
    translated = []
    for k, image in enumerate(translated_images):
        translated.append(encoder.features(image[None])[0])
        yield Progress("map", len(raw) + k + 1, total)
    _, coords, arrows = _placed(np.stack(features), translated, sources)
    return PhenotypeMap(coords, conditions, files, encoder.normalise(raw), arrows, sources)


def vae_map_steps(data_folder, translations_folder=None, steps: int = 400, size: int = 32,
                  seed: int = 0) -> Steps[PhenotypeMap]:
    """The cells in the content latents of an Affinity-VAE trained on them here (pose VAE, cyclical beta,
    no affinity loss: the map is not taught the conditions), with its latent traversals; the images
    normalised with the data's own range and resized to `size` as `phenotwin embed map --vae` does.
    Yields a Progress per training step."""
    from phenotwin.embed.affinity_vae import VAEConfig, collapse_warning, latents, train_vae_steps, vae_inputs
    from phenotwin.embed.saved_map import describe_vae, landmarks_of
    from phenotwin.preprocessing import normalise

    raw, conditions, files, (low, high) = load_cells(data_folder)
    sources, translated_images = _read_translations(translations_folder, files)
    if any(image.shape[0] != raw.shape[1] for image in translated_images):
        raise PhenotwinError(f"the translations have another channel count than the cells ({raw.shape[1]}): give "
                             "translations of these cells.")
    cells = normalise(raw, low, high)  # (N, C, H, W): the same map as a translation's input
    inputs = vae_inputs(cells, size)
    labels = np.asarray([sorted(set(conditions)).index(c) for c in conditions])
    config = VAEConfig(steps=steps, seed=seed)
    model, _ = yield from train_vae_steps(inputs, labels, config)
    content, _ = latents(model, inputs)
    translated = [latents(model, vae_inputs(normalise(image[None], low, high), size))[0][0]
                  for image in translated_images]
    projection, coords, arrows = _placed(content, translated, sources)
    description = describe_vae(config, raw, size, sorted(set(conditions)), low, high)
    description["landmarks"] = landmarks_of(content, labels, sorted(set(conditions)))
    return PhenotypeMap(coords, conditions, files, cells, arrows, sources, LatentTraversal(model, content, projection),
                        collapse_warning(content), description)


def save_vae(result: PhenotypeMap, out, overwrite: bool = False) -> Path:
    """Keep a VAE map trained in the dock as `phenotwin embed map --vae` keeps its own (vae.safetensors +
    vae.json, `saved_map`), so the dock's "Saved VAE map" and `embed map --vae-from` place other cells on
    it; refused, before writing, where it would replace a file phenotwin did not write there."""
    from phenotwin.checkpoint import MANIFEST_FILE
    from phenotwin.embed.saved_map import MAP_JSON, VAE_INFO, VAE_WEIGHTS, save_vae_map
    from phenotwin.io import prepare_folder, writing_into
    from phenotwin.output_folder import check_output, record_written

    if result.vae_description is None:
        raise PhenotwinError("only a map of an Affinity-VAE trained here can be saved: an encoder or a saved map is "
                             "kept in its own folder already.")
    out = Path(out)
    if (out / MAP_JSON).exists():  # its VAE belongs to that map's map.png and map.csv
        raise PhenotwinError(f"{out} holds a map made by `phenotwin embed map` ({MAP_JSON}); this map would replace "
                             "its VAE but not its pictures and tables. Choose another folder.")
    check_output(out, (VAE_WEIGHTS, VAE_INFO, MANIFEST_FILE), overwrite, option="map")
    prepare_folder(out, "map")
    projection = result.traversal.projection
    record = {**projection.record(), "scale": projection.scale / MAP_SPAN}  # saved maps span 1 (`saved_vae_map_steps`)
    with writing_into(out):
        record_written(out, save_vae_map(out, result.traversal.model, result.vae_description, record))
    return out


def saved_vae_map_steps(map_folder, data_folder, translations_folder=None) -> Steps[PhenotypeMap]:
    """The cells on a VAE map saved by `phenotwin embed map --vae` (`saved_map`): normalised with that map's
    range, encoded by its VAE and placed on its axes (scaled to the dock's span), nothing trained, so
    the cells of a new plate land on the same map as the first data."""
    from phenotwin.embed.affinity_vae import latents, vae_inputs
    from phenotwin.embed.saved_map import load_vae_map, nearest_conditions, placement_warnings
    from phenotwin.preprocessing import normalise

    saved = load_vae_map(map_folder)
    raw, conditions, files, _ = load_cells(data_folder, min_conditions=1)  # compared with the map's own
    if raw.shape[1] != saved.info["channels"]:
        raise PhenotwinError(f"the cells have {raw.shape[1]} channel(s) but the map in {map_folder} was made from "
                             f"{saved.info['channels']}: place cells of the same channels on it.")
    sources, translated_images = _read_translations(translations_folder, files)
    if any(image.shape[0] != raw.shape[1] for image in translated_images):
        raise PhenotwinError(f"the translations have another channel count than the cells ({raw.shape[1]}): give "
                             "translations of these cells.")
    low, high = (np.asarray(saved.info["normalization"][k], np.float64) for k in ("low", "high"))
    size = int(saved.info["size"])
    yield Progress("map", 0, 1)
    cells = normalise(raw, low, high)
    content, _ = latents(saved.model, vae_inputs(cells, size))
    translated = [latents(saved.model, vae_inputs(normalise(image[None], low, high), size))[0][0]
                  for image in translated_images]
    yield Progress("map", 1, 1)
    on_map = Projection.from_record(saved.info["projection"], span_scale=MAP_SPAN)  # saved at span 1
    projection, coords, arrows = _placed(content, translated, sources, on_map)
    result = PhenotypeMap(coords, conditions, files, cells, arrows, sources,
                          LatentTraversal(saved.model, content, projection),
                          placement_warnings(saved.info, list(raw), min(raw.shape[-2:]), content))
    marks = saved.info.get("landmarks")  # maps saved before landmarks have none
    if marks is not None:
        result.landmarks = (marks["classes"], projection(np.asarray(marks["means"], np.float64)))
        result.nearest = nearest_conditions(content, conditions, marks)
    return result
