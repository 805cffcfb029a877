"""How good a feature space is (kNN accuracy, silhouettes) and distances between sets in it (FID, KID).

kNN accuracy and silhouettes are scikit-learn's. The Fréchet distance and the polynomial-kernel
KID are written here with numpy/scipy, as torch-fidelity defines them for Inception features, so
that the same two numbers exist offline in any feature space (no Inception weights needed).
"""

from __future__ import annotations

import numpy as np
from scipy import linalg


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 5, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy of a k-nearest-neighbour classifier (cosine: on unit features)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray(labels)
    smallest = int(np.bincount(np.unique(labels, return_inverse=True)[1]).min())
    folds = min(folds, smallest)
    if folds < 2:
        return float("nan")
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # a handful of images: no more neighbours than the smallest class has in a training fold (else ties vote)
    k = max(1, min(k, smallest - -(-smallest // folds)))
    return float(cross_val_score(KNeighborsClassifier(n_neighbors=k), _unit(features), labels, cv=split).mean())


def feature_report(features: np.ndarray, conditions: np.ndarray, batches: np.ndarray | None = None,
                   k: int = 5) -> dict:
    """kNN accuracy and silhouette (cosine) by condition and by batch, with the chance levels.

    Without batches, or with one batch, the batch numbers are left out: nothing to tell apart; so are the
    condition numbers for one condition."""
    from sklearn.metrics import silhouette_score

    unit = _unit(features)

    def chance(labels):
        return float(np.bincount(np.unique(labels, return_inverse=True)[1]).max() / len(labels))

    report = {"images": int(len(features))}
    if len(np.unique(conditions)) > 1:  # one condition (cells placed on a saved map): nothing to tell apart
        report.update({"knn_condition_accuracy": knn_accuracy(unit, conditions, k),
                       "condition_chance": chance(conditions),
                       "silhouette_condition": float(silhouette_score(unit, conditions, metric="cosine"))})
    if batches is not None and len(np.unique(batches)) > 1:
        report.update({"knn_batch_accuracy": knn_accuracy(unit, batches, k), "batch_chance": chance(batches),
                       "silhouette_batch": float(silhouette_score(unit, batches, metric="cosine"))})
    return report


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two (N, D) feature sets (FID's formula)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    if not np.isfinite(root).all():  # near-singular covariances (few images): regularise, as FID implementations do
        eps = np.eye(len(s_a)) * 1e-6
        root = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    value = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root.real))
    return max(value, 0.0)


def kernel_distance(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """(mean, std) over random subsets of the unbiased MMD^2 with the kernel (x.y / D + 1)^3 (KID)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    dim = a.shape[1]
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / dim + 1) ** 3, (y @ y.T / dim + 1) ** 3, (x @ y.T / dim + 1) ** 3)
        off = ~np.eye(m, dtype=bool)
        values.append(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def feature_fid_kid(generated_features: np.ndarray, real_features: np.ndarray) -> dict:
    """FID and KID between two feature sets, in the shape `evaluate.metrics.fid_kid` returns them."""
    if min(len(generated_features), len(real_features)) < 2:
        return {"fid": None, "kid": None, "note": "needs at least 2 images on each side"}
    kid, kid_std = kernel_distance(generated_features, real_features)
    return {"fid": frechet_distance(generated_features, real_features), "kid": kid, "kid_std": kid_std,
            "generated": len(generated_features), "real": len(real_features)}
