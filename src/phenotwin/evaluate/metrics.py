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
