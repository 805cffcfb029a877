"""A phenotype map: a VAE on single-cell crops with a pose latent, cyclical beta and an affinity loss.

After Affinity-VAE (Famili, Mirecka et al. 2022), for cells instead of tomogram subvolumes:

* **pose** -- the encoder also predicts an angle (as cos, sin); the decoder draws the cell in a
  canonical orientation from the other latents and the drawing is rotated by that angle
  (`affine_grid` + `grid_sample`), so rotation has its own dimension and the others need not
  carry it;
* **cyclical beta** (Fu et al. 2019) -- the KL weight ramps from 0 to `beta` over the first half
  of every cycle, then holds: the latents are used before they are regularised;
* **rotation consistency** -- each batch is also encoded turned by known angles d: the pose must
  turn by d (1 - cos of the miss) and the content latents must stay (their squared change), each
  weighted by `consistency`. Reconstruction alone leaves the split between pose and content free
  (a 300-step run's pose followed a known rotation with a circular correlation of 0.18);
* **affinity loss** -- gamma times the mean |A[c_i, c_j] - cos(mu_i, mu_j)| over the pairs of a
  batch, for a condition affinity matrix A (a CSV from the user, or the class-mean cosine
  similarities of a batch-robust encoder): conditions the matrix calls similar are pulled together.

`train_vae_steps` is a generator (a Progress per step); `latents` maps images to (content, angle).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.progress import Progress, Steps


def read_affinity(path, classes: list[str]) -> np.ndarray:
    """A (K, K) affinity matrix from a CSV: a header row of condition names, then one row per condition
    (its name first). Refused unless square over exactly `classes`, symmetric, in [-1, 1], with ones on
    the diagonal; returned in the order of `classes`."""
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            rows = [row for row in csv.reader(handle) if row]
        header = [name.strip() for name in rows[0][1:]]
        names = [row[0].strip() for row in rows[1:]]
        values = np.array([[float(v) for v in row[1:]] for row in rows[1:]], dtype=np.float64)
    except (OSError, IndexError, ValueError) as err:
        raise PhenotwinError(f"cannot read the affinity matrix {path} ({err}): give a CSV with a header of "
                             "condition names and one row per condition, e.g. ',control,treated' / "
                             "'control,1,0.2' / 'treated,0.2,1'.") from None
    if values.ndim != 2 or values.shape != (len(names), len(header)) or len(names) != len(header):
        raise PhenotwinError(f"the affinity matrix {path} is {len(names)} x {len(header)}: it must be square, one row "
                             "and one column per condition.")
    if sorted(names) != sorted(classes) or sorted(header) != sorted(classes):
        raise PhenotwinError(f"the affinity matrix {path} is over {', '.join(header)}, the data's conditions are "
                             f"{', '.join(classes)} ({len(classes)} x {len(classes)} needed): one row and column per "
                             "condition, named as its folder.")
    order_rows = [names.index(c) for c in classes]
    order_cols = [header.index(c) for c in classes]
    matrix = values[np.ix_(order_rows, order_cols)]
    if not np.allclose(matrix, matrix.T, atol=1e-6):
        i, j = np.unravel_index(np.argmax(np.abs(matrix - matrix.T)), matrix.shape)
        raise PhenotwinError(f"the affinity matrix {path} is not symmetric: {classes[i]},{classes[j]} is "
                             f"{matrix[i, j]:g} but {classes[j]},{classes[i]} is {matrix[j, i]:g}. Make them equal.")
    if np.abs(matrix).max() > 1 or not np.allclose(np.diag(matrix), 1):
        raise PhenotwinError(f"the affinity matrix {path} must hold values in [-1, 1] with 1 on the diagonal (a "
                             "condition is fully similar to itself).")
    return matrix


def affinity_from_features(features: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """Class-mean cosine similarities of (e.g. the batch-robust encoder's) features, diagonal 1."""
    means = np.stack([features[labels == c].mean(0) for c in range(classes)])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    matrix = np.clip(means @ means.T, -1, 1)
    np.fill_diagonal(matrix, 1.0)
    return matrix


def cyclical_beta(step: int, beta: float, cycle: int) -> float:
    """0 -> beta linearly over the first half of each `cycle` steps, then beta."""
    phase = (step % cycle) / cycle
    return beta * min(1.0, 2.0 * phase)


def vae_inputs(images: np.ndarray, size: int) -> np.ndarray:
    """Model-range (N, C, H, W) images as the VAE's square `size` crops: the central square, resized
    (antialiased) so a whole field of cells fits."""
    import torch

    if size < 8 or size % 8:
        raise PhenotwinError(f"--vae-size must be a multiple of 8 and >= 8, got {size}.")
    side = min(images.shape[-2:])
    y, x = (images.shape[-2] - side) // 2, (images.shape[-1] - side) // 2
    square = torch.from_numpy(np.ascontiguousarray(images[..., y: y + side, x: x + side], np.float32))
    resized = torch.nn.functional.interpolate(square, size=(size, size), mode="bilinear", antialias=True,
                                              align_corners=False)
    return resized.clamp(-1, 1).numpy()


def build_vae(channels: int, size: int, latent: int = 8, width: int = 16, pose: bool = True):
    import torch
    from torch import nn

    if size % 8:
        raise PhenotwinError(f"the VAE's crop size must be a multiple of 8, got {size}.")
    bottom = size // 8

    class PoseVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.pose = pose
            self.encoder = nn.Sequential(
                nn.Conv2d(channels, width, 3, 2, 1), nn.SiLU(), nn.Conv2d(width, 2 * width, 3, 2, 1), nn.SiLU(),
                nn.Conv2d(2 * width, 4 * width, 3, 2, 1), nn.SiLU(), nn.Flatten())
            flat = 4 * width * bottom * bottom
            self.to_latent = nn.Linear(flat, 2 * latent + (2 if pose else 0))
            self.from_latent = nn.Sequential(nn.Linear(latent, flat), nn.SiLU())
            self.decoder = nn.Sequential(
                nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), nn.SiLU(),
                nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.SiLU(),
                nn.ConvTranspose2d(width, channels, 4, 2, 1))
            self.latent, self.shape = latent, (4 * width, bottom, bottom)

        def encode(self, x):
            out = self.to_latent(self.encoder(x))
            mu, logvar = out[:, :latent], out[:, latent: 2 * latent].clamp(-8, 8)
            angle = torch.atan2(out[:, -1], out[:, -2]) if self.pose else None
            return mu, logvar, angle

        def decode(self, z, angle=None):
            canonical = self.decoder(self.from_latent(z).view(-1, *self.shape))
            if angle is None:
                return canonical
            cos, sin = torch.cos(angle), torch.sin(angle)
            theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                                 torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
            grid = torch.nn.functional.affine_grid(theta, canonical.shape, align_corners=False)
            # padding -1: the model range's background, not a black frame of zeros' grey
            return torch.nn.functional.grid_sample(canonical + 1, grid, align_corners=False) - 1

        def forward(self, x):
            mu, logvar, angle = self.encode(x)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            return self.decode(z, angle), mu, logvar, angle

    return PoseVAE()


def affinity_loss(mu, labels, affinity):
    """Mean |A[c_i, c_j] - cos(mu_i, mu_j)| over the pairs i != j of a batch."""
    import torch

    unit = torch.nn.functional.normalize(mu, dim=1)
    similarity = unit @ unit.T
    target = affinity[labels][:, labels]
    off = ~torch.eye(len(mu), dtype=torch.bool, device=mu.device)
    return (target - similarity).abs()[off].mean()


@dataclass(frozen=True)
class VAEConfig:
    steps: int = 400
    batch_size: int = 32
    latent: int = 8
    width: int = 16
    beta: float = 1.0
    cycle: int = 100
    gamma: float = 0.0
    pose: bool = True
    rotate: bool = True  # train on randomly rotated crops: the pose dimension has rotations to explain
    consistency: float = 1.0  # weight of the rotation-consistency loss (pose VAEs only; 0 turns it off)
    learning_rate: float = 2e-3
    seed: int = 0


def rotated(images: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """(N, C, S, S) model-range images rotated by their angles (degrees, counter-clockwise), background -1."""
    from scipy import ndimage as ndi

    return np.stack([ndi.rotate(img, a, axes=(2, 1), reshape=False, order=1, mode="constant", cval=-1.0)
                     for img, a in zip(images, angles_deg)]).astype(np.float32)


def train_vae_steps(images: np.ndarray, labels: np.ndarray, config: VAEConfig,
                    affinity: np.ndarray | None = None) -> Steps[tuple]:
    """Train on (N, C, S, S) model-range crops; returns (model, per-step losses as a dict of lists)."""
    import torch

    if config.gamma and affinity is None:
        raise PhenotwinError("gamma > 0 needs an affinity matrix (--affinity CSV, or --affinity-from ENCODER_DIR).")
    classes = int(labels.max()) + 1
    if affinity is not None and affinity.shape != (classes, classes):
        raise PhenotwinError(f"the affinity matrix is {affinity.shape[0]} x {affinity.shape[1]} but the data have "
                             f"{classes} conditions; give one row and column per condition.")
    torch.manual_seed(config.seed)
    model = build_vae(images.shape[1], images.shape[-1], config.latent, config.width, config.pose)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    target = torch.as_tensor(affinity if affinity is not None else np.eye(classes), dtype=torch.float32)
    history = {"reconstruction": [], "kl": [], "affinity": [], "rotation consistency": []}
    for step in range(config.steps):
        rng = np.random.default_rng([config.seed, step])
        pick = rng.integers(0, len(images), config.batch_size)
        batch = images[pick]
        if config.rotate:
            batch = rotated(batch, rng.uniform(0, 360, len(pick)))
        x = torch.from_numpy(batch)
        y = torch.from_numpy(labels[pick])
        out, mu, logvar, _ = model(x)
        reconstruction = ((out - x) ** 2).mean()
        kl = -0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp(), dim=1).mean()
        affine = affinity_loss(mu, y, target)
        loss = reconstruction + cyclical_beta(step, config.beta, config.cycle) * kl / x[0].numel()
        if config.gamma:
            loss = loss + config.gamma * affine
        consistent = torch.zeros(())
        if config.pose and config.consistency:
            turn = rng.uniform(0, 360, len(pick))
            consistent = rotation_consistency(model, x, torch.from_numpy(rotated(batch, turn)), turn)
            loss = loss + config.consistency * consistent
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for key, value in (("reconstruction", reconstruction), ("kl", kl), ("affinity", affine),
                           ("rotation consistency", consistent)):
            history[key].append(value.item())
        yield Progress("train map", step + 1, config.steps)
    return model.eval(), history


def rotation_consistency(model, x, turned, turn_deg: np.ndarray):
    """How far the encoding of `turned` (= `x` rotated by `turn_deg`, as `rotated` turns) is from the
    encoding of `x` with its pose turned by the same angles: mean (1 - cos) of the pose's miss plus the
    mean squared change of the content means. `decode(z, a)` draws as `rotated(decode(z), degrees(a))`
    (tests/test_embed_map.py), so the pose of a turned cell is its pose plus the turn."""
    import torch

    mu, _, angle = model.encode(x)
    mu_turned, _, angle_turned = model.encode(turned)
    miss = angle_turned - angle - torch.as_tensor(np.deg2rad(turn_deg), dtype=angle.dtype)
    return (1 - torch.cos(miss)).mean() + ((mu_turned - mu) ** 2).mean()


def latents(model, images: np.ndarray, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray | None]:
    """(content means (N, latent), pose angles in radians or None) of model-range images."""
    import torch

    mus, angles = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            mu, _, angle = model.encode(torch.from_numpy(np.ascontiguousarray(images[start: start + batch_size])))
            mus.append(mu.numpy())
            if angle is not None:
                angles.append(angle.numpy())
    return np.concatenate(mus), (np.concatenate(angles) if angles else None)


# Content latents whose spread over the cells is below this (the prior's is 1) carry next to nothing:
# collapsed 32 px runs measured 0.005-0.03, runs that learnt 0.12-0.25 (docs/embedding.md, section 4).
COLLAPSED_SPREAD = 0.05


def collapse_warning(content: np.ndarray) -> str | None:
    """What to tell the user when the VAE's content latents (N, latent) barely vary over the cells (the
    encoder collapsed, the decoder draws an average cell: the map is noise), else None."""
    spread = float(content.std(0).mean())
    if spread >= COLLAPSED_SPREAD:
        return None
    return (f"the VAE's content latents vary by only {spread:.3f} over the cells (the prior's spread is 1): they "
            "hold next to nothing of the cells (the VAE did not learn, or learnt only their pose), so the map's "
            "positions are mostly noise. Train it longer (more VAE steps), at another --vae-size, or map with a "
            "trained encoder instead.")


def reconstruction_error(model, images: np.ndarray) -> float:
    """Mean squared error of the decoded means (no sampling) on model-range images."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(images)
        mu, _, angle = model.encode(x)
        return float(((model.decode(mu, angle) - x) ** 2).mean())


def pose_follows_rotation(model, images: np.ndarray, angles_deg: np.ndarray) -> float:
    """Circular correlation between the applied rotations and the pose latent's change they cause.

    Each image's own orientation is unknown, so the pose of the rotated image is compared with the
    pose of the same image unrotated: |mean exp(i (dpose - s * angle))| for the better sign s, 1 when
    the pose turns exactly with the cell."""
    _, base = latents(model, images)
    _, turned = latents(model, rotated(images, angles_deg))
    if base is None:
        return float("nan")
    change = turned - base
    applied = np.deg2rad(angles_deg)
    return float(max(abs(np.mean(np.exp(1j * (change - s * applied)))) for s in (1, -1)))
