"""Reading microscopy files and writing results atomically (tifffile, scikit-image)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from phenotwin.errors import PhenotwinError

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (*TIFF_SUFFIXES, ".png", ".jpg", ".jpeg")
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


def safe_name(name: str) -> str:
    """`name` (e.g. a condition) as one file-name component that stays inside its folder.

    Anything but letters, digits, '.', '-' and '_' becomes '_' and leading or trailing dots go
    (no '..', no hidden or Windows-reserved names); a name that had to change gets 8 hex digits
    of its hash, so `a/b` and `a_b` still get different files. Callers keep the original name
    in their provenance.
    """
    cleaned = re.sub(r"[^\w.-]", "_", str(name)).strip(".")
    if cleaned and cleaned == name and cleaned.split(".")[0].upper() not in WINDOWS_RESERVED:
        return cleaned
    return f"{cleaned or 'name'}-{hashlib.sha256(str(name).encode()).hexdigest()[:8]}"


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF (tifffile) or PNG/JPEG (scikit-image) into a numpy array, or say why not."""
    file = Path(path)
    if not file.is_file():
        raise PhenotwinError(f"{file} does not exist or is not a file. Check the path.")
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        raise PhenotwinError(f"{file} is not an image phenotwin reads ({', '.join(IMAGE_SUFFIXES)}).")
    try:
        if file.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            return tifffile.imread(file)
        from skimage.io import imread

        return imread(file)
    except Exception as err:  # any decoder failure means the same thing to the user
        raise PhenotwinError(f"cannot read {file}: {err}. The file may be truncated or not really an image.") from err


def read_header(path: str | os.PathLike) -> np.ndarray:
    """An array with the file's shape and dtype and no pixels read (a TIFF's header), for checks
    that need only the shape; PNG and JPEG files (small) are read."""
    file = Path(path)
    if file.suffix.lower() in TIFF_SUFFIXES and file.is_file():
        import tifffile

        try:
            with tifffile.TiffFile(file) as tif:
                series = tif.series[0]
                return np.broadcast_to(np.zeros((), series.dtype), series.shape)
        except Exception:  # read_image says what is wrong with it
            pass
    return read_image(file)


def shareable_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give under the user's umask.

    tempfile creates private (0600/0700) files; results and models written through a
    temporary name must still be readable by the lab like any other file.
    """
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def prepare_folder(folder: Path, option: str) -> None:
    """Create an output folder and prove it takes files, before any work: a file in its place,
    a read-only disk or missing permissions are said now, by the option's name."""
    if folder.exists() and not folder.is_dir():
        raise PhenotwinError(f"{option} {folder} is a file; give a folder (it is created when missing).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".phenotwin-write-test.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise PhenotwinError(f"cannot write into {option} {folder} ({err.strerror or err}). Choose a folder you can "
                             "write to, or change its permissions.") from err


@contextmanager
def writing_into(folder: Path) -> Iterator[None]:
    """A write that fails midway (disk full, folder removed or made read-only) stops the work with
    what to do: every later file would fail the same way."""
    try:
        yield
    except OSError as err:
        raise PhenotwinError(f"cannot write results into {folder} ({err.strerror or err}). Free space or fix the "
                             "folder, then run the same command again: finished results are kept.") from err


def write_atomically(path: str | os.PathLike, write) -> Path:
    """Call `write(temporary_path)` then rename it to `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, shareable_mode())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_tiff(path: str | os.PathLike, array: np.ndarray, axes: str, metadata: dict[str, Any] | None = None,
               physical_size: dict[str, float] | None = None, unit: str = "µm",
               channel_names: list[str] | None = None) -> Path:
    """Write an OME-TIFF atomically (temp file + rename), provenance in its description.

    `physical_size` ({"X": 0.5, "Y": 0.5, "Z": 2.0}, in `unit`) and `channel_names` go into the
    standard OME fields (Pixels PhysicalSizeX/Y/Z and their units, Channel Name), so that other OME
    readers (Fiji, bioformats, bioio) see the scale and the channels, not only phenotwin's record.
    """
    import tifffile

    ome: dict[str, Any] = {"axes": axes, "Description": json.dumps(metadata or {}, default=str)}
    for axis, size in (physical_size or {}).items():
        ome[f"PhysicalSize{axis}"], ome[f"PhysicalSize{axis}Unit"] = float(size), unit
    if channel_names:
        ome["Channel"] = {"Name": [str(name) for name in channel_names]}

    def write(temp: str) -> None:
        tifffile.imwrite(
            temp,
            array,
            ome=True,
            photometric="minisblack",
            # channels last (YXC) are stored as interleaved samples; without this tifffile
            # refuses the OME axes ("shape does not match stored shape")
            planarconfig="contig" if axes.endswith("C") else None,
            metadata=ome,
        )

    return write_atomically(path, write)


def write_text(path: str | os.PathLike, text: str) -> Path:
    def write(temp: str) -> None:
        Path(temp).write_text(text, encoding="utf-8")

    return write_atomically(path, write)


def write_csv(path: str | os.PathLike, header: list[str], rows: list[dict[str, Any]]) -> Path:
    """Write a CSV atomically: a reader (or a killed run) never sees half a table."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)

    def write(temp: str) -> None:
        Path(temp).write_text(buffer.getvalue(), encoding="utf-8")

    return write_atomically(path, write)


def read_own_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of a CSV phenotwin wrote earlier (none if absent); one whose header does not
    start with `columns[0]` and hold the others was not phenotwin's: refused, not replaced."""
    if not path.exists():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows, header = list(reader), reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PhenotwinError(f"cannot read {path} ({err}); move it away, then run again.") from err
    if header[:1] != [columns[0]] or not set(columns) <= set(header):
        raise PhenotwinError(f"{path} was not written by phenotwin (its columns are {', '.join(header[:4])}...): it "
                             "would be replaced. Move it away or choose another --output folder.")
    return rows


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_png_figure(path: str | os.PathLike, figure) -> Path:
    def write(temp: str) -> None:
        figure.savefig(temp, format="png", dpi=110, bbox_inches="tight")

    return write_atomically(path, write)
