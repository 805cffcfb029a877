"""Batch translation of files, folders and globs: what `phenotwin translate` runs.

Per input it writes the translated image and its heatmap as OME-TIFF with provenance, and
a JSON record (written last, so a record means both images are complete). The summary CSV
is rebuilt from the records, so a killed run keeps what is done and the next run with the
same command skips it. Under `accelerate launch` the inputs are sharded over processes;
each writes its own files and records, and the main process writes the CSV once all are done.
Qt-free; torch and accelerate load only when a batch runs.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.io import IMAGE_SUFFIXES, read_image, write_csv, write_json, write_tiff
from phenotwin.pipeline.settings import TranslationSettings
from phenotwin.progress import Progress, drive
from phenotwin.stacks import PlaneStack, check_axes, file_axes, translate_planes_steps

SUMMARY = "summary.csv"
RECORD_VERSION = 1


@dataclass(frozen=True)
class InputSelection:
    """Which part of each input file feeds the model (the translation itself is a `TranslationSettings`)."""

    channels: tuple[int, ...] | None = None  # channel indices of the input that feed the model
    axes: str | None = None  # axes of every input, overriding file metadata


@dataclass(frozen=True)
class Job:
    """One input and where its results go (paths relative to the output folder)."""

    input: Path
    translated: str
    heatmap: str
    record: str


@dataclass
class BatchResult:
    """Counts over all processes: translated now, complete from an earlier run (skipped), failed."""

    done: int = 0
    already_done: int = 0
    failed: int = 0
    summary: Path | None = None


def collect_inputs(items: Sequence[str], recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """Image files named by `items`: files, folders (their TIFF/PNG/JPEG files; subfolders with
    `recursive`) and glob patterns (`**` always recurses). Sorted per item, duplicates dropped,
    hidden files and anything under `exclude` (the output folder) left out. A name that is
    none of these is kept, so that it is reported as missing rather than silently ignored."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found.extend(sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif glob.has_magic(item) and not path.exists():
            found.extend(sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file()))
        else:
            found.append(path)
    excluded = exclude.resolve() if exclude is not None else None
    unique: dict[Path, Path] = {}
    for path in found:
        resolved = path.resolve()
        if path.name.startswith(".") or (excluded is not None and resolved.is_relative_to(excluded)):
            continue
        unique.setdefault(resolved, path)
    return list(unique.values())


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def plan_outputs(inputs: Sequence[Path], target: str) -> list[Job]:
    """Output names that mirror the inputs' folders below their common parent, so two
    `a.tif` in different folders never collide; `a.tif` and `a.png` in one folder keep their suffix."""
    parents = [p.resolve().parent for p in inputs]
    try:
        root = Path(os.path.commonpath(parents))
        folders = [parent.relative_to(root) for parent in parents]
    except ValueError:  # different drives (Windows): mirror the whole path, drive letter first
        folders = [Path(parent.drive.rstrip(":")) / parent.relative_to(parent.anchor) for parent in parents]
    bases = [folder / _stem(path) for folder, path in zip(folders, inputs)]
    seen: dict[Path, int] = {}
    for base in bases:
        seen[base] = seen.get(base, 0) + 1
    jobs = []
    for path, base in zip(inputs, bases):
        if seen[base] > 1:
            base = base.with_name(path.name.replace(".", "_"))
        name = f"{base.as_posix()}_{target}"
        jobs.append(Job(path, f"{name}.ome.tif", f"{name}_heatmap.ome.tif", f"{name}.json"))
    return jobs


def _input_identity(path: Path) -> dict[str, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_record(out: Path, job: Job) -> dict[str, Any] | None:
    try:
        return json.loads((out / job.record).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing or unreadable: not done


def is_complete(out: Path, job: Job, record: dict[str, Any] | None, fingerprint: dict[str, Any]) -> bool:
    """Done earlier with these settings: a 'done' record, both images present, input unchanged."""
    return (
        record is not None
        and record.get("status") == "done"
        and record.get("settings") == fingerprint
        and record.get("input_identity") == _input_identity(job.input)
        and (out / job.translated).is_file()
        and (out / job.heatmap).is_file()
    )


def _settings_conflict(record: dict[str, Any] | None, fingerprint: dict[str, Any]) -> list[str]:
    """Settings that differ from an earlier successful run into the same output folder."""
    if record is None or record.get("status") != "done" or record.get("settings") == fingerprint:
        return []
    earlier = record.get("settings") or {}
    return [f"{key}: {earlier.get(key)!r} then, {value!r} now" for key, value in fingerprint.items()
            if earlier.get(key) != value]


def read_stack(path: Path, selection: InputSelection) -> PlaneStack:
    """Read a file as a `PlaneStack`, axes from `selection.axes`, else from its metadata, or say how to name them."""
    array = read_image(path)
    if selection.axes is not None:
        axes = check_axes(selection.axes, array.shape)
    else:
        try:
            axes = file_axes(path, array)
        except Exception as err:  # a file read above but with broken metadata
            raise PhenotwinError(f"cannot read the axes of {path}: {err}. Name them with --axes.") from err
        if axes is None:
            raise PhenotwinError(
                f"the axes of this {array.ndim}-D image {array.shape} are not recorded in the file; name them with "
                "--axes, e.g. CYX (channels first), YXC (channels last), ZYX (a z stack), TCYX."
            )
    return PlaneStack(array, axes, selection.channels)


def _channel_names(translator) -> list[str]:
    names = translator.info.channel_names or [f"c{i}" for i in range(translator.channels)]
    return [str(name) for name in names]


def translate_file(translator, job: Job, out: Path, settings: TranslationSettings, selection: InputSelection,
                   fingerprint: dict[str, Any],
                   step_progress: Callable[[str], Callable[[Progress], None]] | None = None) -> dict[str, Any]:
    """Translate one file plane by plane, write its images and return its record (not yet written)."""
    stack = read_stack(job.input, selection)
    has_channels = stack.channel_axis is not None
    count = len(stack.channels) if stack.channels is not None else (
        stack.array.shape[stack.axes.index(stack.channel_axis)] if has_channels else 1)
    if count != translator.channels:
        raise PhenotwinError(
            f"{count} channel(s) feed the model (axes {stack.axes}, shape {stack.array.shape}) but it was trained on "
            f"{translator.channels}. Pick {translator.channels} with --channels (indices along the channel axis), "
            "or check the axes (--axes)."
        )
    bars: dict[int, Callable[[Progress], None]] = {}  # one progress bar per plane

    def progress(event: Progress) -> None:
        if event.item not in bars:
            bars[event.item] = step_progress(job.input.name if event.items == 1 else
                                             f"{job.input.name} plane {event.item}/{event.items}")
        bars[event.item](event)

    planes = translate_planes_steps(translator, stack.planes(), stack.plane_count, settings,
                                    channel_axis=0 if has_channels else None)
    results = drive(planes, progress if step_progress else None)
    translated, axes = stack.assemble([r.image for r in results], with_channels=True)
    heatmap, heatmap_axes = stack.assemble([r.heatmap for r in results], with_channels=False)
    per_channel = np.stack([r.heatmap_channels for r in results])  # (planes, C, Y, X)
    psnrs = [r.reconstruction_psnr for r in results]
    metrics: dict[str, Any] = {
        "reconstruction_psnr": float(np.mean(psnrs)),
        "mean_change": float(heatmap.mean()),
    }
    for channel, name in enumerate(_channel_names(translator)):
        values = per_channel[:, channel]
        metrics[f"mean_change_{name}"] = float(values.mean())
        metrics[f"p99_change_{name}"] = float(np.percentile(values, 99))
    provenance = {
        **results[0].metadata(),
        "reconstruction_psnr": metrics["reconstruction_psnr"],
        "plane_reconstruction_psnr": psnrs,
        "input": str(job.input),
        "input_axes": stack.axes,
        "input_shape": list(stack.array.shape),
        "channels": None if stack.channels is None else list(stack.channels),
        "checkpoint_path": str(translator.checkpoint_path),
        "checkpoint_provenance": translator.info.provenance,
        "settings": fingerprint,
    }
    write_tiff(out / job.translated, translated, axes, {**provenance, "axes": axes})
    write_tiff(out / job.heatmap, heatmap.astype(np.float32), heatmap_axes, {**provenance, "axes": heatmap_axes})
    return {"status": "done", "message": "", "planes": stack.plane_count, "metrics": metrics,
            "plane_reconstruction_psnr": psnrs}


def _row(job: Job, record: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    row = {"input": str(job.input), "status": record["status"], "message": record.get("message", ""),
           "planes": record.get("planes", "")}
    if record["status"] == "done":
        row.update({k: _number(v) for k, v in record["metrics"].items()})
        row.update(translated=job.translated, heatmap=job.heatmap)
    return {column: row.get(column, "") for column in columns}


def _number(value: float) -> str:
    return "inf" if math.isinf(value) else repr(round(float(value), 6))


def summary_columns(translator) -> list[str]:
    per_channel = [f"{kind}_change_{name}" for name in _channel_names(translator) for kind in ("mean", "p99")]
    return ["input", "status", "message", "planes", "reconstruction_psnr", "mean_change", *per_channel,
            "translated", "heatmap"]


def fingerprint_of(translator, settings: TranslationSettings, selection: InputSelection) -> dict[str, Any]:
    """Every setting that changes the pixels written (resolved `settings`, the model, the input
    selection): a result made with another fingerprint is not this run's."""
    return {"checkpoint": translator.checkpoint_id, **settings.to_dict(),
            "channels": None if selection.channels is None else list(selection.channels), "axes": selection.axes}


def run_batch(
    checkpoint: str | os.PathLike,
    items: Sequence[str],
    out: str | os.PathLike,
    settings: TranslationSettings,
    selection: InputSelection = InputSelection(),
    device: str = "auto",
    recursive: bool = False,
    overwrite: bool = False,
    step_progress: Callable[[str], Callable[[Progress], None]] | None = None,
) -> BatchResult:
    """Translate every input not already done into `out`; see the module docstring.

    Settings errors (unknown condition, bad strength, results from other settings in `out`
    without `overwrite`) raise before any work; a bad file is recorded as failed and skipped.
    """
    import torch
    from accelerate import PartialState
    from tqdm import tqdm

    from phenotwin import Translator

    # cpu=True lets processes started by torchrun (`accelerate launch --multi_gpu`) on a
    # machine without CUDA join a gloo group (MULTI_CPU); without it each would run alone.
    state = PartialState(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))
    out = Path(out)
    inputs = collect_inputs(items, recursive=recursive, exclude=out)
    if not inputs:
        raise PhenotwinError(
            f"no images found in {', '.join(items)}: give TIFF/PNG/JPEG files, folders holding them "
            "(--recursive for subfolders) or a quoted glob pattern such as 'plate1/**/*.tif'."
        )
    if state.num_processes > 1 and device == "auto":
        device = str(state.device)  # one GPU per process, not all on the first
    translator = Translator(checkpoint, device=device)
    settings = translator.resolve(settings)
    if settings.source is None or settings.target is None:
        raise PhenotwinError(f"give the condition the images were acquired in and the one to translate to "
                             f"(--source, --target); this model knows {', '.join(translator.classes)}.")
    fingerprint = fingerprint_of(translator, settings, selection)
    jobs = plan_outputs(inputs, settings.target)
    records = {job: _read_record(out, job) for job in jobs}
    if not overwrite:
        for job in jobs:
            conflict = _settings_conflict(records[job], fingerprint)
            if conflict:
                raise PhenotwinError(
                    f"{out} already holds a translation of {job.input} made with other settings "
                    f"({'; '.join(conflict)}). Write to another --output folder, or pass --overwrite to redo "
                    "those images with the new settings."
                )
    todo = [job for job in jobs if not is_complete(out, job, records[job], fingerprint)]
    result = BatchResult(already_done=len(jobs) - len(todo))
    state.wait_for_everyone()  # every process has judged completeness before anyone writes
    columns = summary_columns(translator)
    summary = out / SUMMARY
    try:
        with state.split_between_processes(todo) as mine:
            bar = tqdm(mine, desc="images", unit="image", position=state.process_index, file=sys.stderr)
            for job in bar:
                try:
                    record = translate_file(translator, job, out, settings, selection, fingerprint, step_progress)
                except PhenotwinError as err:
                    record = {"status": "failed", "message": str(err)}
                    bar.write(f"skipped {job.input}: {err}", file=sys.stderr)
                else:
                    metrics = record["metrics"]
                    bar.write(f"{job.input}: reconstruction PSNR {metrics['reconstruction_psnr']:.1f} dB, "
                              f"mean change {metrics['mean_change']:.4f} -> {out / job.translated}")
                record = {"format": RECORD_VERSION, "input": str(job.input), **record,
                          "input_identity": _input_identity(job.input), "settings": fingerprint,
                          "translated": job.translated, "heatmap": job.heatmap}
                write_json(out / job.record, record)  # last: the record vouches for both images
                records[job] = record
                if state.is_main_process:
                    _write_summary(summary, jobs, records, columns, fingerprint)
    except BaseException:
        if state.is_main_process:  # Ctrl-C or a crash: the CSV lists everything finished so far
            _write_summary(summary, jobs, {job: _read_record(out, job) for job in jobs}, columns, fingerprint)
        raise
    state.wait_for_everyone()
    final = {job: _read_record(out, job) for job in jobs}
    if state.is_main_process:
        _write_summary(summary, jobs, final, columns, fingerprint)
        result.summary = summary
    statuses = [record["status"] for record in final.values()
                if record is not None and record.get("settings") == fingerprint]
    result.done = sum(1 for job in todo if final[job] is not None and final[job]["status"] == "done")
    result.failed = statuses.count("failed")
    return result


def _write_summary(path: Path, jobs: list[Job], records: dict[Job, dict[str, Any] | None], columns: list[str],
                   fingerprint: dict[str, Any]) -> None:
    """One row per input of this run that has a record made with this run's settings, in input order."""
    rows = [_row(job, records[job], columns) for job in jobs
            if records.get(job) is not None and records[job].get("settings") == fingerprint]
    write_csv(path, columns, rows)

