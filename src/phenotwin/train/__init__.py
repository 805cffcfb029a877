"""Training and fine-tuning (scratch, full, LoRA, SVDiff); see `phenotwin.train.trainer`."""
