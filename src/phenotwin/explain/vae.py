"""A small disentangled VAE (β-VAE) of the cell crops: a handful of latent factors to model the condition on.

Soelistyo & Lowe (2024) learn disentangled factors of cell images with a β-VAE and fit sparse
models on them: a factor the decoder can draw (a latent traversal) is a variable a biologist
can look at, where a CNN's activations are not. β > 1 (Higgins et al. 2017) presses the
posterior towards independent factors; the crops are small (32 × 32 per channel) and the
network is a few convolutions, so it trains on a CPU.

The budget is a fixed number of gradient steps, not of epochs, so its cost does not grow with
the number of cells: VAE_STEPS at batch BATCH took about VAE_CPU_SECONDS of CPU time on the
development machine (a 2-core CPU, one thread). It trains on the training cells of the models'
split only: the held-out cells stay unseen by every model, this one included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from phenotwin.progress import Progress, Steps

LATENT_DIMS = 8
BETA = 4.0
VAE_STEPS = 1000
VAE_CPU_SECONDS = 40  # measured: 36 s for 174 cells of the obvious phenotype (docs/explain.md)
BATCH = 64
TRAVERSAL = np.linspace(-2.5, 2.5, 7)  # latent values in standard deviations of the cells' latent means
REPORT_EVERY = 25  # steps between Progress reports (the napari dock cancels at the next one)
# nats: a factor whose mean KL is below this is ignored by the decoder (posterior collapse), its traversal
# draws nothing and its standardised mean is noise blown up, so no model may use it
ACTIVE_KL = 0.1


@dataclass
class VAESummary:
    """What the report shows of a trained β-VAE (numpy only: writing the figure needs no torch)."""

    latents: np.ndarray  # (N, dims) posterior means of every crop
    kl: np.ndarray  # (dims,) mean KL divergence per factor on the training crops: which factors carry information
    examples: np.ndarray  # (n, C, S, S) held-out crops
    reconstructions: np.ndarray  # (n, C, S, S) their decoded posterior means
    traversals: np.ndarray  # (dims, len(TRAVERSAL), C, S, S): one factor varied, the others at the cells' mean
    channel_names: list[str] = field(default_factory=list)
    beta: float = BETA
    steps: int = VAE_STEPS
    loss: float = float("nan")  # last 50 steps' mean: reconstruction + β KL per crop
    cpu_seconds: float = float("nan")

    def order(self) -> np.ndarray:
        """Factors, most informative (largest KL) first."""
        return np.argsort(-self.kl)

    def active(self) -> np.ndarray:
        """The factors that carry information (KL >= ACTIVE_KL), most informative first; all if none does."""
        order = self.order()
        informative = order[self.kl[order] >= ACTIVE_KL]
        return informative if len(informative) else order

    def to_dict(self) -> dict:
        return {"latent_dims": int(self.latents.shape[1]), "beta": self.beta, "steps": self.steps,
                "crop_size": int(self.examples.shape[-1]), "loss": self.loss, "cpu_seconds": self.cpu_seconds,
                "kl_per_factor": [round(float(v), 4) for v in self.kl],
                "active_factors": [f"z{j + 1}" for j in self.active()]}


def _network(channels: int, dims: int, size: int):
    import torch.nn as nn

    side = size // 8  # three stride-2 convolutions

    class BetaVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(
                nn.Conv2d(channels, 16, 4, 2, 1), nn.SiLU(), nn.Conv2d(16, 64, 4, 2, 1), nn.SiLU(),
                nn.Conv2d(64, 64, 4, 2, 1), nn.SiLU(), nn.Flatten(), nn.Linear(64 * side * side, 256), nn.SiLU(),
                nn.Linear(256, 2 * dims))
            self.decoder = nn.Sequential(
                nn.Linear(dims, 256), nn.SiLU(), nn.Linear(256, 64 * side * side), nn.SiLU(),
                nn.Unflatten(1, (64, side, side)), nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.SiLU(),
                nn.ConvTranspose2d(64, 16, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(16, channels, 4, 2, 1))

        def encode(self, x):
            mean, log_var = self.encoder(x).chunk(2, dim=1)
            return mean, log_var.clamp(-10, 10)

        def decode(self, z):  # logits of the [0, 1] intensities
            return self.decoder(z)

    return BetaVAE()


def train_vae_steps(crops: np.ndarray, train: np.ndarray, channel_names: list[str] | None = None,
                    dims: int = LATENT_DIMS, beta: float = BETA, steps: int = VAE_STEPS, seed: int = 0,
                    examples: np.ndarray | None = None) -> Steps[VAESummary]:
    """Train on the crops `train` indexes ((N, C, S, S) in [0, 1], S a multiple of 8); yields a Progress
    every REPORT_EVERY steps. The loss is the Bernoulli likelihood of the intensities (binary cross-entropy,
    as in Higgins et al.) plus β times the KL divergence from the unit Gaussian prior."""
    import torch
    import torch.nn.functional as F

    started = time.process_time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = torch.as_tensor(np.asarray(crops, np.float32))
    train = np.asarray(train)
    network = _network(data.shape[1], dims, data.shape[-1])
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    losses = []
    network.train()
    for step in range(steps):
        if step % REPORT_EVERY == 0:
            yield Progress("train β-VAE", step, steps)
        x = data[rng.choice(train, size=min(BATCH, len(train)), replace=False)]
        # the crops' orientation is arbitrary: the 8 rotations and flips multiply the few training cells
        x = torch.rot90(x, k=int(rng.integers(4)), dims=(2, 3))
        if rng.random() < 0.5:
            x = x.flip(3)
        mean, log_var = network.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        reconstruction = F.binary_cross_entropy_with_logits(network.decode(z), x, reduction="sum") / len(x)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(1).mean()
        loss = reconstruction + beta * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    yield Progress("train β-VAE", steps, steps)
    network.eval()
    with torch.inference_mode():
        means, log_vars = zip(*(network.encode(data[i:i + 256]) for i in range(0, len(data), 256)))
        mean, log_var = torch.cat(means), torch.cat(log_vars)
        kl = (0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var))[torch.as_tensor(train)].mean(0).numpy()
        latents = mean.numpy().astype(np.float64)
        shown = np.arange(min(6, len(data))) if examples is None else np.asarray(examples)
        reconstructions = torch.sigmoid(network.decode(mean[shown])).numpy()
        centre, spread = latents.mean(0), latents.std(0)
        grid = np.repeat(centre[None, None], dims, 0).repeat(len(TRAVERSAL), 1)  # (dims, steps, dims)
        for j in range(dims):
            grid[j, :, j] = centre[j] + TRAVERSAL * spread[j]
        decoded = torch.sigmoid(network.decode(torch.as_tensor(grid.reshape(-1, dims), dtype=torch.float32)))
        traversals = decoded.numpy().reshape(dims, len(TRAVERSAL), *data.shape[1:])
    return VAESummary(latents, kl, data[shown].numpy(), reconstructions, traversals,
                      list(channel_names or [f"channel {c + 1}" for c in range(data.shape[1])]), beta, steps,
                      float(np.mean(losses[-50:])) if losses else float("nan"), time.process_time() - started)


COLOURS = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # magenta, green, ...


def composite(crop: np.ndarray) -> np.ndarray:
    """(C, S, S) in [0, 1] as one RGB image (S, S, 3): a colour per channel, as napari's additive blending."""
    colours = COLOURS[: len(crop)] if len(crop) > 1 else np.ones((1, 3))
    return np.clip(np.einsum("chw,ck->hwk", np.asarray(crop, np.float64), colours), 0.0, 1.0)


def vae_figure(path, summary: VAESummary, title: str = ""):
    """Reconstructions (inputs above, their reconstructions below) and the latent traversals (a row per
    factor, most informative first, its KL beside it) as a PNG, written atomically."""
    from matplotlib.figure import Figure

    from phenotwin.io import write_png_figure

    n, order = len(summary.examples), summary.order()
    dims, columns = len(order), max(len(TRAVERSAL), n)
    figure = Figure(figsize=(1.1 * columns + 1.6, 1.1 * (dims + 2) + 1.0))
    grid = figure.add_gridspec(dims + 2, columns, hspace=0.35, wspace=0.08)
    for i in range(n):
        for row, images, words in ((0, summary.examples, "input"), (1, summary.reconstructions, "reconstruction")):
            axes = figure.add_subplot(grid[row, i])
            axes.imshow(composite(images[i]), interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if i == 0:
                axes.set_ylabel(words, fontsize=8)
    for row, j in enumerate(order, start=2):
        for column, value in enumerate(TRAVERSAL):
            axes = figure.add_subplot(grid[row, column])
            axes.imshow(composite(summary.traversals[j, column]), interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if column == 0:
                axes.set_ylabel(f"z{j + 1}\nKL {summary.kl[j]:.2f}", fontsize=8)
            if row == len(order) + 1:
                axes.set_xlabel(f"{value:+.1f} sd", fontsize=8)
    channels = ", ".join(f"{name} ({colour})" for name, colour in zip(summary.channel_names,
                                                                       ("magenta", "green", "cyan", "yellow")))
    figure.suptitle(title or f"β-VAE (β = {summary.beta:g}, {dims} factors): reconstructions and latent traversals"
                    f"\n{channels}", fontsize=9)
    return write_png_figure(path, figure)
