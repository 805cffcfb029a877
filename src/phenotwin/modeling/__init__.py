"""Network code, a leaf of the package: it imports nothing else of phenotwin.

- `conditioning`: how a condition reaches a UNet (class embeddings, learned contexts), the one
  conditioned forward pass shared by inference and training, and channel adapters between
  microscopy images and a pretrained RGB autoencoder;
- `svdiff`: SVDiff spectral-shift fine-tuning (peft has none);
- `denoiser`: the class-conditional denoiser used at inference, tiled over large fields.
"""
