"""`phenotwin embed train`: the contrastive encoder, trained with accelerate and resumable after a kill.

Every `save_every` steps the weights (encoder.safetensors, atomically) and the training state
(optimizer and step, accelerate's save_state swapped in like `phenotwin train`'s) are saved. The
views of step s are drawn from a random stream fixed by (seed, s), so a resumed run continues
with exactly the batches the killed one would have drawn. At the end the features of every image
are measured (kNN and silhouettes by condition and batch) and stored in encoder.json.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from phenotwin.embed.data import check_pairable, load_batched, training_views
from phenotwin.embed.losses import contrastive_loss, pair_masks
from phenotwin.embed.model import ENCODER_INFO, build_encoder, save_encoder
from phenotwin.errors import PhenotwinError
from phenotwin.io import write_atomically
from phenotwin.progress import Progress, Steps

METHODS = ("cdcl", "simclr")
# Settings a resumed run must share with the saved one (they shape the model or its optimizer state).
RESUME_FIXED = ("method", "size", "width", "projection", "batch_size", "learning_rate", "warmup_steps", "temperature",
                "seed")
# What a run saved before a setting existed trained with: such a run resumes with this value.
BEFORE_SETTING = {"warmup_steps": 0}
LOG_HEADER = "step,loss,seconds\n"


@dataclass(frozen=True)
class EmbedConfig:
    data: str
    out: str
    method: str = "cdcl"
    steps: int = 300
    batch_size: int = 64
    size: int = 32
    width: int = 16
    projection: int = 64
    # Issue 16: at 2e-3 without warm-up CDCL collapsed at 2 training seeds of 6 (every view's projection
    # parallel, the loss stuck at its uniform value 4.72). At initialisation the views are already nearly
    # parallel (cosine ~0.99) and AdamW's first steps are full-size whatever the gradient; runs that learn
    # leave that plateau within 10-40 steps. A linear warm-up over a fixed 50 steps (the plateau does not
    # scale with --steps) or halving the peak rate each left seed 5 collapsed; together they removed both
    # collapses (docs/embedding.md).
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    temperature: float = 0.2
    save_every: int = 100
    seed: int = 0
    resume: bool = False
    overwrite: bool = False

    def check(self) -> None:
        if self.method not in METHODS:
            raise PhenotwinError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}.")
        if self.warmup_steps < 0:
            raise PhenotwinError(f"--warmup-steps must be >= 0, got {self.warmup_steps}.")
        for name in ("steps", "batch_size", "save_every", "width", "projection"):
            if getattr(self, name) < 1:
                raise PhenotwinError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.batch_size < 4 or self.batch_size % 2:
            raise PhenotwinError(f"--batch-size must be even and >= 4 (pairs of views), got {self.batch_size}.")
        if self.size < 8 or self.width % 8:
            raise PhenotwinError(f"--size must be >= 8 and --width a multiple of 8, got {self.size} and {self.width}.")

    def fixed(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in RESUME_FIXED}


def _check_out(config: EmbedConfig, out: Path) -> dict | None:
    """The saved progress to resume from, or None for a new run; refuse to replace what is not ours."""
    from phenotwin.train import state

    saved = state.state_dir(out)
    if config.resume:
        if not saved.is_dir():
            raise PhenotwinError(f"nothing to resume in {out}: no saved training state. Start without --resume.")
        progress = state.saved_progress(out)
        saved = {**BEFORE_SETTING, **progress["config"]}
        changed = {k: (saved.get(k), v) for k, v in config.fixed().items() if saved.get(k) != v}
        if changed:
            listed = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise PhenotwinError(f"cannot resume the run in {out} with other settings ({listed}). Resume with the "
                                 "saved settings, or start a new run in another folder.")
        return progress
    ours = {ENCODER_INFO, "encoder.safetensors", "training"}
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [name for name in present if name not in ours]
    if present and (foreign or not config.overwrite):
        raise PhenotwinError(f"{out} is not empty ({', '.join(present[:5])}). Give a new folder, add --resume to "
                             "continue its training" + ("" if foreign else ", or --overwrite to replace it") + ".")
    return None


def train_steps(config: EmbedConfig, command: str | None = None) -> Steps[Path]:
    """Train (or resume) the encoder of `config`; yields a Progress per step; returns the output folder.

    `command` (the command line that asked for it) is kept in the provenance."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from phenotwin.train import state

    config.check()
    out = Path(config.out)
    progress = _check_out(config, out)
    data = load_batched(config.data, config.size, require_batches=config.method == "cdcl")
    if config.method == "cdcl":
        check_pairable(data)
    if progress is not None and progress.get("data_fingerprint") != data.images.fingerprint:
        raise PhenotwinError(f"the data in {config.data} differ from the data this run started with; resume with "
                             "the original data, or start a new run in another folder.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "training").mkdir(exist_ok=True)
    accelerator = Accelerator()
    set_seed(config.seed)
    model = build_encoder(data.images.channels, config.width, config.projection)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = None
    if config.warmup_steps:  # prepared, so save_state/load_state keep its step; none without warm-up (older runs)
        schedule = accelerator.prepare(torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps)))
    start = 0
    if progress is not None:
        accelerator.load_state(str(state.state_dir(out)))
        start = int(progress["step"])
    log = out / "training" / "log.csv"
    rows = [r for r in (log.read_text().splitlines()[1:] if log.is_file() and start else [])
            if int(r.split(",")[0]) <= start]
    info = {"method": config.method, "classes": data.classes, "batches": data.batch_names,
            "channels": data.images.channels, "size": config.size, "width": config.width,
            "projection": config.projection, "normalization": data.images.normalization(),
            "image_size": image_size(data.images.images),
            "provenance": {"command": command,
                           "data": str(config.data), "data_fingerprint": data.images.fingerprint,
                           "config": asdict(config)}}

    def save(step: int, final: bool = False) -> None:
        unwrapped = accelerator.unwrap_model(model)
        record = {**info, "steps": step}
        if final:
            record["metrics"] = measure(unwrapped, data, accelerator.device)
        save_encoder(unwrapped, record, out)
        state.save_state(accelerator, out, step, {"data_fingerprint": data.images.fingerprint,
                                                  "config": config.fixed()})
        text = LOG_HEADER + "".join(r + "\n" for r in rows)
        write_atomically(log, lambda temp: Path(temp).write_text(text))

    began = time.monotonic()
    device = accelerator.device
    model.train()
    for step in range(start, config.steps):
        rng = np.random.default_rng([config.seed, step])
        views, sources = training_views(data, config.method, config.batch_size, config.size, rng)
        positive, ignored = pair_masks(sources, data.labels, data.batches, config.method)
        loss = contrastive_loss(model(torch.from_numpy(views).to(device)), torch.from_numpy(positive).to(device),
                                torch.from_numpy(ignored).to(device), config.temperature)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        rows.append(f"{step + 1},{loss.item():.5f},{time.monotonic() - began:.2f}")
        if (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            save(step + 1)
        yield Progress("train encoder", step + 1, config.steps)
    save(config.steps, final=True)
    return out


def image_size(images) -> list[int] | None:
    """[height, width] of the training images when they share one (what `embed map` compares), else None."""
    sizes = {tuple(image.shape[1:]) for image in images}
    return list(sizes.pop()) if len(sizes) == 1 else None


def measure(module, data, device) -> dict:
    """The feature report of every image of `data` (whole images) under `module`."""
    from phenotwin.embed.metrics import feature_report
    from phenotwin.embed.model import Encoder

    encoder = Encoder({"channels": data.images.channels, "width": 0}, module.eval())
    features = encoder.features(data.stacked(), raw=False)
    module.train()
    return feature_report(features, data.labels, data.batches)
