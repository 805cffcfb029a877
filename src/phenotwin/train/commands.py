"""`phenotwin train`: its flags, built from `TrainConfig`'s fields, and its runner (cli.py only dispatches here).

A field with `flag(...)` metadata becomes `--field-name`: its type, default and whether it
is required come from the dataclass, its help text and choices from the metadata. A field
without it (e.g. `sample_steps`) is set only from Python.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path

from phenotwin.errors import PhenotwinError
from phenotwin.train.config import OutputFolderInUse, TrainConfig


def _flags() -> list[tuple[str, dict]]:
    """(option name, add_argument keywords) for every TrainConfig field that is a flag, in field order."""
    hints = typing.get_type_hints(TrainConfig)
    flags = []
    for spec in fields(TrainConfig):
        if "cli" not in spec.metadata:
            continue
        options = dict(spec.metadata["cli"], dest=spec.name)
        name = options.pop("option", "--" + spec.name.replace("_", "-"))
        kind = hints[spec.name]
        if kind is bool:
            # A switch names the change from the default: --overwrite turns on, --no-zero-snr turns off.
            options["action"] = "store_false" if spec.default else "store_true"
            flags.append((name, options))
            continue
        if spec.default is MISSING:
            options["required"] = True
        else:
            options["default"] = spec.default
        if type(None) in typing.get_args(kind):  # `int | None`: the flag takes an int
            (kind,) = (a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is list:
            options.setdefault("nargs", "+")
            (kind,) = typing.get_args(kind)
        if kind is not str:
            options.setdefault("type", kind)
        flags.append((name, options))
    return flags


def add_parser(commands) -> None:
    """Add `train` to the `phenotwin` subparsers."""
    train = commands.add_parser(
        "train", help="train or fine-tune a translation model on DIR/<condition>/*.tif",
        description="Train (scratch) or fine-tune (full, lora, svdiff) a class-conditional diffusion model. "
        "Works on CPU and GPU; for several GPUs or nodes run it through `accelerate launch -m phenotwin train ...`.",
    )
    for name, options in _flags():
        train.add_argument(name, **options)


def config_from(args: argparse.Namespace, **more) -> TrainConfig:
    """The TrainConfig the parsed flags describe (plus `more`, e.g. the command line)."""
    return TrainConfig(**{options["dest"]: getattr(args, options["dest"]) for _, options in _flags()}, **more)


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Exit 0 when trained; a bad setting or input found up front raises (`phenotwin` exits 2);
    1 when training itself fails (e.g. the loss diverges); 130 when interrupted (saved first)."""
    from tqdm import tqdm

    from phenotwin.train.trainer import Trainer

    config = config_from(args, command="phenotwin " + " ".join(argv if argv is not None else sys.argv[1:]))
    try:
        trainer = Trainer(config)
    except OutputFolderInUse as err:
        raise PhenotwinError(err.describe(resume="--resume", overwrite="--overwrite")) from None
    counts = ", ".join(f"{name}: {n}" for name, n in trainer.data.counts().items())
    if trainer.data.batches:  # a label per condition and batch (batches.csv); --no-batches turns it off
        counts += f" in batches {', '.join(trainer.data.batches)}"
    main_process = trainer.accelerator.is_main_process
    if main_process and trainer.tidied:
        print(f"removed what a killed run left half-written: {', '.join(trainer.tidied)}", file=sys.stderr)
    if main_process:
        print(f"training {config.method} ({trainer.kind}) on {counts} images, {trainer.data.channels} channel(s), "
              f"device {trainer.accelerator.device}, {trainer.accelerator.num_processes} process(es), "
              f"from step {trainer.step} to {config.steps}")
    steps = trainer.steps()
    bar = tqdm(total=config.steps, initial=trainer.step, unit="step", desc="train", disable=not main_process)
    try:
        for event in steps:
            if event.stage != "training":  # after the last step: one bar per calibration stage
                if bar.desc != event.stage:
                    bar.close()
                    bar = tqdm(total=event.total, unit="call", desc=event.stage, disable=not main_process)
                bar.update(event.step - bar.n)
                continue
            bar.update(1)
            bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.learning_rate:.1e}", refresh=False)
    except KeyboardInterrupt:
        steps.close()  # the trainer saves the model and its state before stopping
        bar.close()
        if main_process:
            print(f"interrupted: saved at step {trainer.step} in {config.out}; continue with the same command and "
                  "--resume", file=sys.stderr)
        # The launcher stops all processes once one exits with an error: wait for the main one's report.
        trainer.accelerator.wait_for_everyone()
        return 130
    except PhenotwinError as err:
        bar.close()
        print(f"phenotwin: training failed at step {trainer.step}: {err}", file=sys.stderr)
        return 1
    finally:
        # Leave the process group (several processes) before exiting, as torch.distributed asks.
        trainer.accelerator.end_training()
    bar.close()
    if main_process:
        for note in trainer.calibration.notes if trainer.calibration else []:
            print(note, file=sys.stderr)
        print(f"saved {config.out} (samples and log in {Path(config.out) / 'training'})")
    return 0
