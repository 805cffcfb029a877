"""Which views are positives, and the contrastive loss over them (NT-Xent with several positives).

Written out rather than taken from a metric-learning library: it is a masked log-softmax of
ten lines, and the masks (who is a positive, who is left out) are the whole method.
"""

from __future__ import annotations

import numpy as np


def pair_masks(sources: np.ndarray, labels: np.ndarray, batches: np.ndarray,
               method: str) -> tuple[np.ndarray, np.ndarray]:
    """(positive, ignored) boolean (V, V) masks for views of the images `sources`.

    simclr: the other view of the same image is the only positive; every other view is a negative.
    cdcl: views of the same image, and views of the same condition from *another* batch, are
    positives; views of the same condition from the *same* batch are left out of the loss
    (neither pulled nor pushed: pushing them apart would teach the encoder what sets a batch apart)."""
    same_image = sources[:, None] == sources[None, :]
    eye = np.eye(len(sources), dtype=bool)
    if method == "simclr":
        return same_image & ~eye, eye
    if method != "cdcl":
        raise ValueError(f"unknown method {method!r}; use cdcl or simclr.")
    lab, bat = labels[sources], batches[sources]
    same_condition = lab[:, None] == lab[None, :]
    other_batch = bat[:, None] != bat[None, :]
    positive = (same_image | (same_condition & other_batch)) & ~eye
    ignored = eye | (same_condition & ~other_batch & ~same_image)
    return positive, ignored


def contrastive_loss(z, positive, ignored, temperature: float = 0.2):
    """Mean over views of -mean log p(positive) under a softmax over the views not `ignored`."""
    import torch

    z = torch.nn.functional.normalize(z, dim=1)
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(ignored, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(~positive, 0.0)
    counts = positive.sum(1)
    has = counts > 0
    return -(log_prob.sum(1)[has] / counts[has]).mean()
