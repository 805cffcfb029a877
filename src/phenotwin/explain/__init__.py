"""Explain the change: what changed in each cell, with uncertainty, and which few features tell the conditions apart.

Qt-free (napari's "Explain change" widget and `phenotwin explain` both call it):

- `features`: per-cell features in plain words (shape, intensity, texture, fragments,
  radial distribution, distance from the nucleus), from labels or an automatic segmentation;
- `effects`: paired effect sizes of a translation against its source and between the real
  conditions, with bootstrap confidence intervals, their agreement, and a forest plot;
- `models`: a sparse (L1) logistic regression choosing k features, a one-line symbolic
  formula (gplearn) and two black boxes (a random forest on the same features, `phenotwin
  evaluate`'s CNN on the cell crops), with held-out accuracy;
- `crops`, `vae`: the cells' crops and a small β-VAE of them, whose latent factors get the
  sparse model too, with reconstructions and latent traversals as a figure;
- `commands`: `phenotwin explain` (folders of images and labels, or `phenotwin translate`'s output).
"""
