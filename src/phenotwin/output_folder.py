"""An output folder that phenotwin shares with the user: replace only what phenotwin wrote there.

The folder's manifest (`.phenotwin-manifest.json`, read by `phenotwin.checkpoint.owned_entries`)
lists the entries a command wrote. A later run refuses to start when one of its file names is
taken (unless --overwrite), and even with --overwrite never replaces an entry the manifest does
not list: a user's own notes, or their own file that happens to be called report.md, survive.
"""

from __future__ import annotations

from pathlib import Path

from phenotwin.checkpoint import MANIFEST_FILE, owned_entries
from phenotwin.errors import PhenotwinError
from phenotwin.io import write_json


def check_output(out: Path, entries, overwrite: bool, option: str = "--out") -> None:
    """Refuse, before any work, to replace what phenotwin did not write (or anything, without --overwrite)."""
    out = Path(out)
    present = [name for name in entries if (out / name).exists() and name != MANIFEST_FILE]
    if not present:
        return
    if not overwrite:
        raise PhenotwinError(f"{out} already holds {', '.join(present)}; pass --overwrite to replace phenotwin's "
                             f"earlier results there, or choose another {option} folder.")
    foreign = [name for name in present if name not in owned_entries(out)]
    if foreign:
        raise PhenotwinError(f"{out} holds {', '.join(foreign)}, which phenotwin did not write there; it is never "
                             f"replaced. Move it away or choose another {option} folder.")


def record_written(out: Path, written) -> None:
    """Add `written` (top-level names) to the folder's manifest, keeping what earlier runs listed."""
    out = Path(out)
    previous = owned_entries(out) if (out / MANIFEST_FILE).exists() else set()
    write_json(out / MANIFEST_FILE, {"written_by": "phenotwin", "entries": sorted(set(written) | previous
                                                                                  | {MANIFEST_FILE})})
