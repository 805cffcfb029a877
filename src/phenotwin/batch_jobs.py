"""Batch jobs: which inputs, the output names each gets, and whether it is already done.

Every input gets an output name of its own, stable across reruns (`plan_outputs`), and a
JSON record written after its images: a record made with this run's settings, for the
input as it is now, with both images present, means "done" (`is_complete`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phenotwin.errors import PhenotwinError
from phenotwin.io import IMAGE_SUFFIXES, safe_name


@dataclass(frozen=True)
class Job:
    """One input and where its results go (paths relative to the output folder)."""

    input: Path
    translated: str
    heatmap: str
    record: str


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


def output_stem(path: Path) -> str:
    """`a.tif` -> `a_tif`, `a.ome.tif` -> `a_ome.tif`, `notes` -> `notes_`: the file name with its
    image suffix after the last '_' (suffixes hold none), so two names in one folder never give one
    output name, whatever else the folder holds or the run includes (stable across reruns)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return f"{name[: -len(suffix)]}_{name[1 - len(suffix):]}"
    return f"{name}_"


def plan_outputs(inputs: Sequence[Path], target: str) -> list[Job]:
    """Output names that mirror the inputs' folders below their common parent (two `a.tif` in
    different folders never collide) and keep each input's suffix (`a.tif`, `a.png` and
    `a_tif.tif` in one folder neither). The condition is made file-name safe (`safe_name`).
    Names that differ only in case (one file on macOS and Windows) get a hash of their input."""
    parents = [p.resolve().parent for p in inputs]
    try:
        root = Path(os.path.commonpath(parents))
        folders = [parent.relative_to(root) for parent in parents]
    except ValueError:  # different drives (Windows): mirror the whole path, drive letter first
        folders = [Path(parent.drive.rstrip(":")) / parent.relative_to(parent.anchor) for parent in parents]
    names = [f"{(folder / output_stem(path)).as_posix()}_{safe_name(target)}" for folder, path in zip(folders, inputs)]
    folded = Counter(name.casefold() for name in names)
    jobs = []
    for path, folder, name in zip(inputs, folders, names):
        if folded[name.casefold()] > 1:
            name += "-" + hashlib.sha256((folder / path.name).as_posix().encode()).hexdigest()[:8]
        jobs.append(Job(path, f"{name}.ome.tif", f"{name}_heatmap.ome.tif", f"{name}.json"))
    return jobs


def input_identity(path: Path) -> dict[str, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_record(out: Path, job: Job) -> dict[str, Any] | None:
    try:
        record = json.loads((out / job.record).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing or unreadable: not done
    settings = record.get("settings") if isinstance(record, dict) else None
    if isinstance(settings, dict) and "solver" not in settings:
        settings["solver"] = "ddim"  # written before the solver was a setting: DDIM was the only one
    if isinstance(settings, dict):
        settings.setdefault("batch", None)  # written before batches: no batch given
    return record


def is_complete(out: Path, job: Job, record: dict[str, Any] | None, fingerprint: dict[str, Any]) -> bool:
    """Done earlier with these settings: a 'done' record, both images present, input unchanged."""
    return (
        record is not None
        and record.get("status") == "done"
        and record.get("settings") == fingerprint
        and record.get("input_identity") == input_identity(job.input)
        and (out / job.translated).is_file()
        and (out / job.heatmap).is_file()
    )


def settings_conflict(record: dict[str, Any] | None, fingerprint: dict[str, Any]) -> list[str]:
    """Settings that differ from an earlier successful run into the same output folder."""
    if record is None or record.get("status") != "done" or record.get("settings") == fingerprint:
        return []
    earlier = record.get("settings") or {}
    return [f"{key}: {earlier.get(key)!r} then, {value!r} now" for key, value in fingerprint.items()
            if earlier.get(key) != value]


def batches_of(csv_path: str | os.PathLike, jobs: list[Job]) -> dict[Job, str]:
    """Each job's batch (plate, day) from a CSV with the columns file and batch, files relative to the
    CSV's folder (as a data folder's batches.csv); every input must have a row."""
    import csv

    path = Path(csv_path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise PhenotwinError(f"cannot read the batch table {path} ({err}): give a CSV with the columns file and "
                             "batch, one row per input (file relative to the CSV's folder).") from None
    if not rows or not {"file", "batch"} <= set(rows[0]):
        raise PhenotwinError(f"{path} needs the columns file and batch and one row per input image, e.g. "
                             "'file,batch' / 'plate1/well_A01.tif,plate1'.")
    table = {os.path.abspath(path.parent / row["file"].replace("\\", "/")): (row["batch"] or "").strip() for row in rows}
    missing = [job.input for job in jobs if not table.get(os.path.abspath(job.input))]
    if missing:
        raise PhenotwinError(f"{len(missing)} input(s) have no batch in {path}, e.g. {missing[0]}: add a row (file "
                             "relative to the CSV's folder, and its batch), or translate them without --batches-csv.")
    return {job: table[os.path.abspath(job.input)] for job in jobs}
