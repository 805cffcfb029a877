"""`phenotwin embed map-check`: the Affinity-VAE against a plain VAE on synthetic single cells.

Both train on the same crops (one cell per 32 px image, randomly rotated, both conditions) for
the same steps; measured on held-out cells:

* silhouette by condition of the content latents (the pose left out), and the reconstruction
  error it was bought at (a map that separates by drawing badly is no better);
* how well the pose latent follows a known rotation (`affinity_vae.pose_follows_rotation`), and
  the silhouette by condition of the content latents of the same cells rotated: rotation-invariant
  content keeps it.

A third run, the Affinity-VAE without its rotation-consistency loss, shows what that loss buys.
"""

from __future__ import annotations

import numpy as np

from phenotwin.embed.affinity_vae import (
    VAEConfig,
    latents,
    pose_follows_rotation,
    reconstruction_error,
    rotated,
    train_vae_steps,
)
from phenotwin.progress import Steps, relabel


def single_cells(n: int, size: int, start: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(2n crops of one cell each in model range, condition labels), control then treated."""
    from phenotwin.synthetic import make_pairs

    pairs = make_pairs(n, size=size, channels=2, seed=seed, start=start, cells_per_image=(1, 1))
    images = np.concatenate([pairs.control, pairs.treated]) * 2 - 1
    return images.astype(np.float32), np.repeat([0, 1], n)


def silhouette(features: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(features, labels, metric="cosine"))


def map_check_steps(n: int = 200, steps: int = 400, size: int = 32, gamma: float = 1.0, seed: int = 0) -> Steps[dict]:
    """Train both VAEs and measure them; returns the JSON-ready comparison."""
    images, labels = single_cells(n, size, 0, seed)
    held, held_labels = single_cells(max(n // 4, 20), size, 1_000_000, seed)
    angles = np.random.default_rng(seed).uniform(0, 360, len(held))
    affinity = np.eye(2)  # the two conditions unlike each other
    runs = {"affinity-vae": VAEConfig(steps=steps, gamma=gamma, pose=True, seed=seed),
            "affinity-vae without rotation consistency": VAEConfig(steps=steps, gamma=gamma, pose=True, seed=seed,
                                                                   consistency=0.0),
            "plain vae": VAEConfig(steps=steps, gamma=0.0, pose=False, seed=seed)}
    result = {"cells": len(images), "held_out": len(held), "steps": steps, "size": size, "gamma": gamma,
              "affinity": affinity.tolist()}
    for k, (name, config) in enumerate(runs.items()):
        model, history = yield from relabel(train_vae_steps(images, labels, config, affinity), "train map",
                                            k * steps, len(runs) * steps)
        turned = rotated(held, angles)
        content, _ = latents(model, held)
        content_turned, _ = latents(model, turned)
        result[name] = {
            "silhouette_condition": silhouette(content, held_labels),
            "silhouette_condition_rotated": silhouette(content_turned, held_labels),
            "reconstruction_mse": reconstruction_error(model, turned),
            "pose_follows_rotation": pose_follows_rotation(model, held, angles) if config.pose else None,
            "final_losses": {key: float(np.mean(v[-20:])) for key, v in history.items()},
        }
    return result
