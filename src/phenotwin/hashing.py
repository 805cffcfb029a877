"""Content hashes of a folder's files, cached against each file's size and mtime.

A model's id must change when its weights change, even to others of the same size, so every
file is hashed; a multi-GB model would then take seconds to open, so each file's sha256 is
kept in the user's cache folder and reused while its size and mtime are unchanged. Not in the
model folder: it may be read-only or shared. A cache that cannot be read or written is
ignored: the hash is computed again, nothing else changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path


def cache_dir() -> Path:
    """$PHENOTWIN_CACHE_DIR, else the platform's user cache folder."""
    if os.environ.get("PHENOTWIN_CACHE_DIR"):
        return Path(os.environ["PHENOTWIN_CACHE_DIR"])
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "phenotwin" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "phenotwin"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phenotwin"


def file_digests(folder: Path, skip: Iterable[str] = ()) -> dict[str, str]:
    """sha256 of every file below `folder` by relative POSIX path, sorted; hidden files and the
    top-level entries named in `skip` left out."""
    skipped = set(skip)
    files = sorted(file for file in folder.rglob("*") if file.is_file()
                   and file.relative_to(folder).parts[0] not in skipped
                   and not any(part.startswith(".") for part in file.relative_to(folder).parts))
    cache_file = cache_dir() / "file-hashes" / f"{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]}.json"
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):  # missing, unreadable or corrupt: start afresh
        cached = None
    cached = cached if isinstance(cached, dict) else {}
    entries = {}
    for file in files:
        name, stat = file.relative_to(folder).as_posix(), file.stat()
        entry = cached.get(name)
        if not (isinstance(entry, list) and len(entry) == 3 and entry[:2] == [stat.st_size, stat.st_mtime_ns]):
            entry = [stat.st_size, stat.st_mtime_ns, _sha256(file)]
        entries[name] = entry
    if entries != cached:
        from phenotwin.io import write_json

        try:
            write_json(cache_file, {"folder": str(folder.resolve()), "files": entries})
        except OSError:
            pass  # a read-only home: hashed again next time
    return {name: entry[2] for name, entry in entries.items()}


def _sha256(file: Path) -> str:
    hasher = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()
