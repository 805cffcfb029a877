"""Is the Affinity-VAE's affinity loss stuck where every latent points the same way? (docs/embedding.md, section 4)

Trains the map-check's Affinity-VAE on its synthetic single cells and prints, over held-out cells,
the mean pairwise cosine of the content latents, the length of their mean over their spread, the
affinity loss over the last 20 steps, the silhouette by condition and how well the pose follows
rotation. A cosine near 1 with a flat loss of 0.5 is the trap: the loss's gradient vanishes there.

    python benchmarks/affinity_trap.py [--size 32] [--gamma 1] [--steps 400] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from phenotwin.embed.affinity_vae import VAEConfig, latents, pose_follows_rotation, train_vae_steps
    from phenotwin.embed.map_check import silhouette, single_cells
    from phenotwin.progress import drive

    images, labels = single_cells(200, args.size, 0, args.seed)
    held, held_labels = single_cells(50, args.size, 1_000_000, args.seed)
    config = VAEConfig(steps=args.steps, gamma=args.gamma, pose=True, seed=args.seed)
    model, history = drive(train_vae_steps(images, labels, config, np.eye(2)))
    content, _ = latents(model, held)
    unit = content / np.linalg.norm(content, axis=1, keepdims=True)
    cosine = (unit @ unit.T)[np.triu_indices(len(content), 1)].mean()
    angles = np.random.default_rng(args.seed).uniform(0, 360, len(held))
    print(f"{args.size} px, gamma {args.gamma:g}, {args.steps} steps, seed {args.seed}: "
          f"mean pairwise cosine {cosine:.3f}, |mean| / spread {np.linalg.norm(content.mean(0)) / content.std(0).mean():.1f}, "
          f"affinity loss {np.mean(history['affinity'][-20:]):.3f}, "
          f"silhouette by condition {silhouette(content, held_labels):.3f}, "
          f"pose follows rotation {pose_follows_rotation(model, held, angles):.3f}")


if __name__ == "__main__":
    main()
