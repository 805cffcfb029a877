"""Cell features that keep the biology and ignore batch effects (CDCL), and what uses them.

Metadata-guided consistency learning (Fredin Haslum et al. 2022): a small CNN learns
features in which an image lies close to images of the *same condition from other batches*
(plates, days, microscopes), so what the batches add (gain, background, blur, illumination)
cannot separate images while the condition still does. The same encoder trained with plain
augmentation pairs (SimCLR) is the baseline it is measured against.

data.py      images of a condition-folder data set with their batch (batches.csv), crops, the pairs
model.py     the encoder (torch), saved as encoder.safetensors + encoder.json; features of images
losses.py    the contrastive loss with a positive mask (NT-Xent / SupCon)
trainer.py   `phenotwin embed train`: accelerate, resumable, progress per step
metrics.py   kNN accuracy and silhouettes by condition and batch; Fréchet distance and KID of features
fid.py       FID/KID of translations in the encoder's features (`phenotwin evaluate translation --features`)
affinity_vae.py  the phenotype map: a VAE with a pose angle, cyclical beta and the affinity loss
map_check.py `phenotwin embed map-check`: the Affinity-VAE against a plain VAE on synthetic cells
phenomap.py  what the Phenotype map dock shows: cells and translations projected to 2-D (Qt-free)
datamap.py   `phenotwin embed map`: a data folder on the map (same projection), measured, written with a report
commands.py  the `phenotwin embed` command
"""
