"""Explain the change: what changed in each cell, with uncertainty, and which few features tell the conditions apart.

Qt-free (napari's "Explain change" widget and `phenotwin explain` both call it):

- `features`: per-cell features in plain words (shape, intensity, texture, fragments,
  radial distribution, distance from the nucleus), from labels or an automatic segmentation;
- `effects`: paired effect sizes of a translation against its source and between the real
  conditions, with bootstrap confidence intervals, their agreement, and a forest plot;
- `models`: a sparse (L1) logistic regression choosing k features, a one-line symbolic
  formula (gplearn) and a black-box baseline on the same features, with held-out accuracy;
- `commands`: `phenotwin explain` (folders of images and labels, or `phenotwin translate`'s output).
"""
