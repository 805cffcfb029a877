"""Translation metrics that need no model: heatmap AUROC and distance to the true counterfactual."""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve of `scores` against boolean `truth` (Mann-Whitney U, ties averaged).

    Written out because it is four lines with scipy's rankdata, and scikit-learn is not a dependency.
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(truth, dtype=bool).ravel()
    positives, negatives = truth.sum(), (~truth).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def counterfactual_ratio(translated: np.ndarray, source: np.ndarray, counterfactual: np.ndarray) -> float:
    """MSE(translation, true counterfactual) / MSE(source, true counterfactual): < 1 means closer than doing nothing."""
    translated, source, counterfactual = (np.asarray(a, dtype=np.float64) for a in (translated, source, counterfactual))
    baseline = np.mean((source - counterfactual) ** 2)
    return float(np.mean((translated - counterfactual) ** 2) / baseline) if baseline > 0 else float("nan")


def roc_curve(scores: np.ndarray, truth: np.ndarray, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) at `points` score quantiles, for plotting the heatmap ROC."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(truth, dtype=bool).ravel()
    thresholds = np.unique(np.quantile(scores, np.linspace(0, 1, points)))[::-1]
    above = scores[None, :] >= thresholds[:, None]
    tpr = (above & truth).sum(1) / max(truth.sum(), 1)
    fpr = (above & ~truth).sum(1) / max((~truth).sum(), 1)
    return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], tpr, [1.0]])


def smooth(heatmaps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of (N, H, W) heatmaps, as `Translator.generate(sigma=...)` applies, so one run reports several."""
    if sigma <= 0:
        return heatmaps
    from skimage.filters import gaussian

    return gaussian(heatmaps, sigma=sigma, channel_axis=0, preserve_range=True)


def ssim(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Structural similarity (scikit-image) of two (C, H, W) model-range images, channels averaged."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(reference, estimate, data_range=2.0, channel_axis=0))


def centred(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, C*H*W) with each channel's mean removed and unit norm.

    Mean-centring per channel makes the cosine a correlation of structure: without it the
    dark background of fluorescence images makes any two images look ~0.9 alike.
    """
    images = np.asarray(images, dtype=np.float64)
    flat = (images - images.mean(axis=(2, 3), keepdims=True)).reshape(len(images), -1)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.where(norms > 0, norms, 1.0)


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity (after `centred`) of a[i] with b[i]."""
    return np.sum(centred(a) * centred(b), axis=1)


def dihedral(images: np.ndarray) -> np.ndarray:
    """The 8 flips/90-degree rotations of (N, C, H, W) square images, stacked (8N, C, H, W):
    the augmentations training uses, so a memorised image is found in any orientation."""
    turns = [np.rot90(images, k, axes=(2, 3)) for k in range(4)]
    return np.concatenate(turns + [t[..., ::-1] for t in turns])


def nearest_similarity(generated: np.ndarray, references: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """For each generated image the highest cosine (after `centred`) with any reference image in any of its
    8 orientations, and that reference's index."""
    gen = centred(generated)
    best = np.full(len(gen), -np.inf)
    index = np.zeros(len(gen), dtype=int)
    for start in range(0, len(references), batch):
        chunk = references[start : start + batch]
        sims = (centred(dihedral(chunk)) @ gen.T).reshape(8, len(chunk), len(gen)).max(0)
        better = sims.max(0) > best
        best = np.where(better, sims.max(0), best)
        index = np.where(better, start + sims.argmax(0), index)
    return best, index


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def find_inception_weights(path=None) -> tuple[str | None, str]:
    """(weights file or None, what to tell the user) for torch-fidelity's InceptionV3; never downloads.

    The file is torch-fidelity's own (pickled) .pth: it is opened with torch's weights-only
    loader first, which refuses anything but tensors, before torch-fidelity loads it.
    """
    from pathlib import Path

    from phenotwin.errors import PhenotwinError

    try:
        import torch_fidelity  # noqa: F401  (needs a torchvision built for the installed torch)
    except Exception as err:
        return None, ("FID/KID skipped: torch-fidelity is not installed or cannot be imported "
                      f"({type(err).__name__}: {err}). Install it with `pip install \"napari-phenotwin[evaluate]\"` "
                      "(torchvision must match your torch build), then provide its Inception weights (see docs/evaluation.md). "
                      "The other metrics do not need it.")
    import torch

    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if path is None and not cached.is_file():
        return None, (f"FID/KID skipped: no Inception weights on this machine, and phenotwin never downloads them. "
                      f"Get {INCEPTION_FILE} (torch-fidelity's release v0.2.0 on GitHub) and pass --inception-weights PATH, "
                      f"or copy it to {cached}. The other metrics do not need it.")
    file = Path(path) if path is not None else cached
    if not file.is_file():
        raise PhenotwinError(f"Inception weights {file} do not exist. Give the path of {INCEPTION_FILE}.")
    try:
        torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PhenotwinError(f"{file} is not a plain weights file torch can open safely ({err}). "
                             f"Use torch-fidelity's {INCEPTION_FILE}.") from err
    return str(file), f"FID/KID with Inception weights {file}"


def _rgb_uint8(images: np.ndarray):
    """(N, C, H, W) model-range images to (N, 3, H, W) uint8 RGB (fixed channel colours, not per-image scaling)."""
    import torch

    from phenotwin.montage import CHANNEL_COLOURS

    unit = np.clip((np.asarray(images, dtype=np.float64) + 1) / 2, 0, 1)
    rgb = np.repeat(unit, 3, axis=1) if unit.shape[1] == 1 else np.einsum("nchw,ck->nkhw", unit, CHANNEL_COLOURS[: unit.shape[1]])
    return torch.from_numpy(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def fid_kid(generated: np.ndarray, real: np.ndarray, weights: str) -> dict:
    """FID and KID (torch-fidelity, InceptionV3 features) of generated vs real model-range images."""
    import torch_fidelity
    from torch.utils.data import Dataset

    class Images(Dataset):
        def __init__(self, images):
            self.images = _rgb_uint8(images)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.images[i]

    if min(len(generated), len(real)) < 2:
        return {"fid": None, "kid": None, "note": "needs at least 2 images on each side"}
    metrics = torch_fidelity.calculate_metrics(
        input1=Images(generated), input2=Images(real), fid=True, kid=True, cuda=False, verbose=False,
        kid_subset_size=min(1000, len(generated), len(real)), feature_extractor_weights_path=weights,
    )
    return {"fid": float(metrics["frechet_inception_distance"]), "kid": float(metrics["kernel_inception_distance_mean"]),
            "kid_std": float(metrics["kernel_inception_distance_std"]), "generated": len(generated), "real": len(real)}
