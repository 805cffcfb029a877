"""A small condition classifier: does a translation look like its target condition?

Trained on real images of every condition; its own held-out accuracy is reported with every
flip rate, because a flip rate measured by a weak classifier means little.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# What every flip-rate classifier (evaluate, calibrate, the choice of a save) learns from: 64
# images a condition for 8 epochs told the subtle phenotype apart 65% of the time (held out),
# 400 for 20 epochs 86% (75 s on a busy 2-core CPU). One place, so evaluate and calibrate agree.
CLASSIFIER_IMAGES = 400
CLASSIFIER_EPOCHS = 20


def _network(channels: int, classes: int):
    import torch.nn as nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(channels, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, classes))


@dataclass
class ConditionClassifier:
    network: object
    classes: list[str]
    held_out_accuracy: float

    def predict(self, images: np.ndarray, batch: int = 64) -> np.ndarray:
        """Class index per (N, C, H, W) model-range image."""
        import torch

        self.network.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), batch):
                out.append(self.network(torch.as_tensor(images[i : i + batch], dtype=torch.float32)).argmax(1).numpy())
        return np.concatenate(out)


def train_classifier(images: np.ndarray, labels: np.ndarray, classes: list[str], epochs: int = CLASSIFIER_EPOCHS, seed: int = 0,
                     held_out: float = 0.2) -> ConditionClassifier:
    """Train on model-range (N, C, H, W) images with flips/rotations; accuracy on a held-out fifth."""
    import torch

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    order = rng.permutation(len(images))
    cut = int(len(images) * (1 - held_out))
    train_idx, test_idx = order[:cut], order[cut:]
    network = _network(images.shape[1], len(classes))
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3)
    x_all = torch.as_tensor(images, dtype=torch.float32)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    for _ in range(epochs):
        network.train()
        for start in range(0, len(train_idx), 64):
            idx = train_idx[start : start + 64]
            x = torch.rot90(x_all[idx], k=int(rng.integers(4)), dims=(2, 3))
            if rng.random() < 0.5:
                x = x.flip(3)
            loss = torch.nn.functional.cross_entropy(network(x), y_all[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    classifier = ConditionClassifier(network, list(classes), float("nan"))
    if len(test_idx):
        classifier.held_out_accuracy = float((classifier.predict(images[test_idx]) == labels[test_idx]).mean())
    return classifier
