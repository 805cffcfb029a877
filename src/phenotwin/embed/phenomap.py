"""What the Phenotype map widget shows, computed without Qt: points per cell, arrows per translation.

The cells of a data folder (DIR/<condition>/*) go through the batch-robust encoder; a PCA fitted
on them (scikit-learn) gives the 2-D map. Translated cells, read from a second folder whose file
names start with their source's file stem, are projected with the same PCA and drawn as arrows
from their source cell. A generator: one Progress per image encoded, so a worker can show it and
stop it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.progress import Progress, Steps

MAP_SPAN = 400.0  # the map's extent in data units (pixels), about a screen next to 64 px cells


@dataclass
class PhenotypeMap:
    coords: np.ndarray        # (N, 2) map position of each cell, (row, column) for napari
    conditions: list[str]     # each cell's condition
    files: list[Path]
    images: np.ndarray        # (N, C, H, W) the cells in the encoder's model range
    arrows: np.ndarray        # (M, 2, 2) napari vectors: start (a source cell), then the step to its translation
    arrow_sources: list[int]  # the source cell of each arrow


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


def load_cells(folder) -> tuple[np.ndarray, list[str], list[Path]]:
    """(raw (N, C, H, W) images cropped to the smallest size, their conditions, their files)."""
    from phenotwin.train.data import load_condition_folders

    data = load_condition_folders(folder, 8)
    h = min(im.shape[1] for im in data.images)
    w = min(im.shape[2] for im in data.images)
    crops = [im[:, (im.shape[1] - h) // 2: (im.shape[1] - h) // 2 + h, (im.shape[2] - w) // 2:
                (im.shape[2] - w) // 2 + w] for im in data.images]
    return np.stack(crops), [data.classes[label] for label in data.labels], data.files


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


def map_steps(encoder_dir, data_folder, translations_folder=None) -> Steps[PhenotypeMap]:
    """Encode the cells (and translations), project them to 2-D; yields a Progress per image."""
    from phenotwin.embed.model import load_encoder
    from phenotwin.io import read_image

    encoder = load_encoder(encoder_dir)
    raw, conditions, files = load_cells(data_folder)
    encoder.check_fits(list(raw), files)
    sources, translated_files = ([], []) if translations_folder is None else _translations(translations_folder, files)
    total = len(raw) + len(translated_files)
    features = []
    for i in range(len(raw)):
        features.append(encoder.features(raw[i: i + 1])[0])
        yield Progress("map", i + 1, total)
    translated = []
    for k, path in enumerate(translated_files):
        image = np.asarray(read_image(path), np.float32)
        image = image[None] if image.ndim == 2 else image
        translated.append(encoder.features(image[None])[0])
        yield Progress("map", len(raw) + k + 1, total)
    features = np.stack(features)
    projection = Projection.fit(features)
    coords = projection(features)
    arrows = np.zeros((0, 2, 2))
    if translated:
        ends = projection(np.stack(translated))
        arrows = np.stack([coords[sources], ends - coords[sources]], axis=1)
    return PhenotypeMap(coords, conditions, files, encoder.normalise(raw), arrows, sources)
