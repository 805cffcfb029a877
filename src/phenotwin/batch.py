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
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phenotwin.batch_jobs import (
    Job,
    batches_of,
    collect_inputs,
    input_identity,
    is_complete,
    plan_outputs,
    read_record,
    settings_conflict,
)
from phenotwin.errors import PhenotwinError, PhenotwinWarning
from phenotwin.input_fit import FitReport
from phenotwin.io import (
    prepare_folder,
    read_header,
    read_image,
    read_own_csv,
    write_csv,
    write_json,
    write_tiff,
    writing_into,
)
from phenotwin.pipeline.settings import TranslationSettings
from phenotwin.progress import Progress, drive
from phenotwin.stacks import PlaneStack, check_axes, check_axes_letters, file_axes, translate_planes_steps
from phenotwin.trust import TrustVerdict

SUMMARY = "summary.csv"
SUMMARY_COLUMNS = ("input", "status")  # how phenotwin knows its own summary.csv (also from older versions)
RECORD_VERSION = 1


@dataclass(frozen=True)
class InputSelection:
    """Which part of each input file feeds the model (the translation itself is a `TranslationSettings`)."""

    channels: tuple[int, ...] | None = None  # channel indices of the input that feed the model
    axes: str | None = None  # axes of every input, overriding file metadata


@dataclass
class BatchResult:
    """Counts over all processes: translated now, complete from an earlier run (skipped), failed."""

    done: int = 0
    already_done: int = 0
    failed: int = 0
    summary: Path | None = None


def read_stack(path: Path, selection: InputSelection) -> PlaneStack:
    """Read a file as a `PlaneStack`, axes from `selection.axes`, else from its metadata, or say how to name them."""
    return _stack(path, read_image(path), selection)


def _stack(path: Path, array: np.ndarray, selection: InputSelection) -> PlaneStack:
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


def _check_fed_channels(stack: PlaneStack, channels: int) -> None:
    has_channels = stack.channel_axis is not None
    count = len(stack.channels) if stack.channels is not None else (
        stack.array.shape[stack.axes.index(stack.channel_axis)] if has_channels else 1)
    if count != channels:
        raise PhenotwinError(
            f"{count} channel(s) feed the model (axes {stack.axes}, shape {stack.array.shape}) but it was trained on "
            f"{channels}. Pick {channels} with --channels (indices along the channel axis), or check the axes (--axes)."
        )


def check_selection(selection: InputSelection, channels: int) -> None:
    """What --axes and --channels get wrong for any file, said once before any file is read."""
    if selection.axes is not None:
        check_axes_letters(selection.axes)
    if selection.channels is not None:
        chosen = list(selection.channels)
        if len(chosen) != channels or any(c < 0 for c in chosen) or len(set(chosen)) != len(chosen):
            raise PhenotwinError(
                f"--channels {' '.join(map(str, chosen))}: the model takes {channels} channel(s), so give {channels} "
                "different indices (0 or more) along the input's channel axis, in the model's order."
            )


def _selection_misfit(job: Job, selection: InputSelection, channels: int) -> str | None:
    """Why --axes/--channels cannot fit this file, judged from its header (TIFF) or pixels;
    None when they fit or the file cannot be read (its own failure says so later)."""
    try:
        array = read_header(job.input)
    except PhenotwinError:
        return None
    try:
        _check_fed_channels(_stack(job.input, array, selection), channels)
    except PhenotwinError as err:
        return str(err)
    return None


def _channel_names(translator) -> list[str]:
    names = translator.info.channel_names or [f"c{i}" for i in range(translator.channels)]
    return [str(name) for name in names]


def translate_file(translator, job: Job, out: Path, settings: TranslationSettings, selection: InputSelection,
                   fingerprint: dict[str, Any],
                   step_progress: Callable[[str], Callable[[Progress], None]] | None = None,
                   strict_fit: bool = False) -> dict[str, Any]:
    """Translate one file plane by plane, write its images and return its record (not yet written).
    With `strict_fit`, a file with a plane that does not fit the model fails before any model call."""
    stack = read_stack(job.input, selection)
    _check_fed_channels(stack, translator.channels)
    has_channels = stack.channel_axis is not None
    if strict_fit:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PhenotwinWarning)  # the refusal below says it
            fits = [translator.processor.preprocess(plane, 0 if has_channels else None, settings.match_intensities).fit
                    for plane in stack.planes()]
        worst = FitReport.worst(fits)
        if worst.level == "does-not-fit":
            raise PhenotwinError(f"{worst.message} (refused by --strict-fit; without it the file is translated and "
                                 "its summary row says input_fit does-not-fit)")
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
    fit = FitReport.worst([r.fit for r in results])
    trust = TrustVerdict.worst([r.trust for r in results])
    metrics: dict[str, Any] = {
        "reconstruction_psnr": float(np.mean(psnrs)),
        "input_fit": fit.level,
        "trust": trust.level,
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
        "input_fit": fit.to_dict(),
        "trust": trust.to_dict(),
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


def _row(job: Job, record: dict[str, Any], columns: list[str], target: str) -> dict[str, Any]:
    row = {"input": str(job.input), "target": target, "status": record["status"],
           "message": record.get("message", ""), "planes": record.get("planes", ""),
           "batch": (record.get("settings") or {}).get("batch") or ""}
    if record["status"] == "done":
        row.update({k: _number(v) for k, v in record["metrics"].items()})
        row.update(translated=job.translated, heatmap=job.heatmap)
    return {column: row.get(column, "") for column in columns}


def _number(value: float | str) -> str:
    if isinstance(value, str):  # a verdict level
        return value
    return "inf" if math.isinf(value) else repr(round(float(value), 6))


def summary_columns(translator) -> list[str]:
    per_channel = [f"{kind}_change_{name}" for name in _channel_names(translator) for kind in ("mean", "p99")]
    batch = ["batch"] if translator.batches else []  # the batch each input was translated in (models with batches)
    return ["input", "target", *batch, "status", "message", "planes", "reconstruction_psnr", "input_fit", "trust",
            "mean_change", *per_channel, "translated", "heatmap"]


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
    strict_fit: bool = False,
    batches_csv: str | os.PathLike | None = None,
) -> BatchResult:
    """Translate every input not already done into `out`; see the module docstring. With
    `strict_fit`, a file that does not fit the model (`input_fit`) fails instead of being translated.
    With `batches_csv` (columns file, batch), each input is translated in its own batch
    (`TranslationSettings.batch`, for a model trained with batches) instead of `settings.batch`.

    Settings errors (unknown condition, bad strength, results from other settings in `out`
    without `overwrite`) raise before any work; a bad file is recorded as failed and skipped.
    """
    import torch
    from accelerate import PartialState
    from tqdm import tqdm

    from phenotwin import Translator
    from phenotwin.modeling.denoiser import pick_device

    out = Path(out)
    _refuse_output_over_inputs(out, items)
    inputs = collect_inputs(items, recursive=recursive, exclude=out)
    if not inputs:
        raise PhenotwinError(
            f"no images found in {', '.join(items)}: give TIFF/PNG/JPEG files, folders holding them "
            "(--recursive for subfolders) or a quoted glob pattern such as 'plate1/**/*.tif'."
        )
    if selection.axes is not None:
        check_axes_letters(selection.axes)
    pick_device(device)  # a device this machine lacks, said before anything starts
    earlier_rows = read_own_csv(out / SUMMARY, SUMMARY_COLUMNS)  # refuses a summary.csv phenotwin did not write
    # cpu=True lets processes started by torchrun (`accelerate launch --multi_gpu`) on a
    # machine without CUDA join a gloo group (MULTI_CPU); without it each would run alone.
    state = PartialState(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))
    if state.num_processes > 1 and device == "auto":
        device = str(state.device)  # one GPU per process, not all on the first
    translator = Translator(checkpoint, device=device)
    settings = translator.resolve(settings)
    if settings.source is None or settings.target is None:
        raise PhenotwinError(f"give the condition the images were acquired in and the one to translate to "
                             f"(--source, --target); this model knows {', '.join(translator.classes)}.")
    check_selection(selection, translator.channels)
    jobs = plan_outputs(inputs, settings.target)
    if batches_csv is not None and settings.batch is not None:
        raise PhenotwinError("give either one batch for every input (--batch) or each input's batch (--batches-csv), "
                             "not both.")
    # Each input's settings (its own batch from the CSV; an unknown batch is refused now) and fingerprint.
    per_job = {job: settings for job in jobs} if batches_csv is None else {
        job: translator.resolve(settings, batch=batch) for job, batch in batches_of(batches_csv, jobs).items()}
    fingerprints = {job: fingerprint_of(translator, per_job[job], selection) for job in jobs}
    records = {job: read_record(out, job) for job in jobs}
    if not overwrite:
        for job in jobs:
            conflict = settings_conflict(records[job], fingerprints[job])
            if conflict:
                raise PhenotwinError(
                    f"{out} already holds a translation of {job.input} made with other settings "
                    f"({'; '.join(conflict)}). Write to another --output folder, or pass --overwrite to redo "
                    "those images with the new settings."
                )
    todo = [job for job in jobs if not is_complete(out, job, records[job], fingerprints[job])]
    if todo and (selection.axes is not None or selection.channels is not None):
        misfits = [_selection_misfit(job, selection, translator.channels) for job in todo]
        if all(misfits):
            raise PhenotwinError(f"{misfits[0]} (it fits none of the {len(todo)} input(s); nothing was translated)")
    if state.is_main_process:
        prepare_folder(out, "--output")
        if todo:
            print(estimate(translator, settings, selection, todo), file=sys.stderr)
    result = BatchResult(already_done=len(jobs) - len(todo))
    state.wait_for_everyone()  # every process has judged completeness before anyone writes
    columns = summary_columns(translator)
    summary = out / SUMMARY

    def write_summary(current: dict[Job, dict[str, Any] | None]) -> None:
        _write_summary(summary, earlier_rows, jobs, current, columns, fingerprints, settings.target)

    try:
        with state.split_between_processes(todo) as mine:
            bar = tqdm(mine, desc="images", unit="image", position=state.process_index, file=sys.stderr)
            for job in bar:
                with writing_into(out):  # a bad file fails alone; a failed write stops the run
                    try:
                        record = translate_file(translator, job, out, per_job[job], selection, fingerprints[job],
                                                step_progress, strict_fit)
                    except PhenotwinError as err:
                        record = {"status": "failed", "message": str(err)}
                        bar.write(f"skipped {job.input}: {err}", file=sys.stderr)
                    else:
                        metrics = record["metrics"]
                        bar.write(f"{job.input}: reconstruction PSNR {metrics['reconstruction_psnr']:.1f} dB, "
                                  f"mean change {metrics['mean_change']:.4f} -> {out / job.translated}")
                record = {"format": RECORD_VERSION, "input": str(job.input), "target": settings.target, **record,
                          "input_identity": input_identity(job.input), "settings": fingerprints[job],
                          "translated": job.translated, "heatmap": job.heatmap}
                with writing_into(out):
                    write_json(out / job.record, record)  # last: the record vouches for both images
                    records[job] = record
                    if state.is_main_process:
                        write_summary(records)
    except BaseException:
        if state.is_main_process:  # Ctrl-C or a crash: the CSV lists everything finished so far
            write_summary({job: read_record(out, job) for job in jobs})
        raise
    state.wait_for_everyone()
    final = {job: read_record(out, job) for job in jobs}
    if state.is_main_process:
        with writing_into(out):
            write_summary(final)
        result.summary = summary
    statuses = [record["status"] for job, record in final.items()
                if record is not None and record.get("settings") == fingerprints[job]]
    result.done = sum(1 for job in todo if final[job] is not None and final[job]["status"] == "done")
    result.failed = statuses.count("failed")
    return result


def estimate(translator, settings: TranslationSettings, selection: InputSelection, jobs: list[Job]) -> str:
    """What the batch will cost, said before it starts: from the files' headers (no pixels read) and
    one model call timed now. A file whose header cannot be read fails on its turn and is not counted."""
    from phenotwin.cost import describe_batch, time_one_call

    time_one_call(translator)
    fields = []
    for job in jobs:
        try:
            stack = _stack(job.input, read_header(job.input), selection)
        except PhenotwinError:
            continue
        shape = stack.array.shape
        fields.append((stack.plane_count, shape[stack.axes.index("Y")], shape[stack.axes.index("X")]))
    return describe_batch(translator, settings, len(jobs), fields)


def _refuse_output_over_inputs(out: Path, items: Sequence[str]) -> None:
    """--output that is an input folder, or holds an input: its images would be left out as
    results, which reads as "no images found"; a subfolder of an input folder is fine (skipped)."""
    target = out.resolve()
    for item in items:
        path = Path(item)
        if not glob.has_magic(item) and path.exists() and path.resolve().is_relative_to(target):
            raise PhenotwinError(
                f"--output {out} {'is' if path.resolve() == target else 'holds'} the input {item}: results "
                "would be written among the inputs. Choose another output folder (a new subfolder such as "
                f"{Path(item) / 'translated'} works)."
            )


def _write_summary(path: Path, earlier: list[dict[str, str]], jobs: list[Job],
                   records: dict[Job, dict[str, Any] | None], columns: list[str],
                   fingerprints: dict[Job, dict[str, Any]], target: str) -> None:
    """summary.csv merged, never truncated: the earlier rows (a rerun on a subset keeps the
    others), each replaced in place by this run's row for the same input and target (those
    with a record made with this run's settings), new ones appended in input order."""
    def key(row: dict[str, Any]) -> tuple[str, str]:
        return os.path.abspath(row["input"]), row.get("target") or ""

    rows = {key(row): row for row in earlier}
    for job in jobs:
        record = records.get(job)
        if record is not None and record.get("settings") == fingerprints[job]:
            row = _row(job, record, columns, target)
            rows[key(row)] = row
    header = columns + [c for c in (earlier[0] if earlier else {}) if c not in columns]
    write_csv(path, header, list(rows.values()))
