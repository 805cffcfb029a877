"""Training and fine-tuning (scratch, full, LoRA, SVDiff) of class-conditional diffusion models.

- `config`: `TrainConfig` (the settings, their checks and defaults; also the `phenotwin train` flags) and `TrainProgress`;
- `data`: the condition folders, checked up front, served as augmented crops;
- `models`: what is trained: the scratch UNet and noise schedule, a base to fine-tune, the LoRA or SVDiff wrapping;
- `trainer`: the accelerate loop, periodic atomic saves and resume (`Trainer`, `train`);
- `commands`: the `phenotwin train` command.
"""
