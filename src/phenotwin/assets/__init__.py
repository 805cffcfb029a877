"""Assets shipped inside the package: the demo models trained on synthetic cells (weights, not network code).

`demo` knows the obvious phenotype's conditions (control, nocodazole); `subtle`, when an install
carries it, the subtle sample's (control, treated). `shipped_models` lists those present, and
`model_for_conditions` finds one that knows given conditions, reading only phenotwin.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "demo"
SUBTLE_MODEL = Path(__file__).parent / "subtle"


def demo_model_path() -> Path | None:
    """The shipped demo checkpoint, or None in an install that does not carry it."""
    return DEMO_MODEL if (DEMO_MODEL / "phenotwin.json").is_file() else None


def shipped_models() -> list[Path]:
    """The shipped checkpoints this install carries, the demo first."""
    return [path for path in (DEMO_MODEL, SUBTLE_MODEL) if (path / "phenotwin.json").is_file()]


def model_classes(path: str | Path) -> list[str]:
    """The conditions a checkpoint knows, from its phenotwin.json alone ([] when it cannot be read)."""
    try:
        classes = json.loads((Path(path) / "phenotwin.json").read_text(encoding="utf-8")).get("classes", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(c) for c in classes] if isinstance(classes, list | str) else []  # "ab": a and b


def model_for_conditions(conditions: Iterable[str], candidates: Iterable[str | Path] | None = None) -> Path | None:
    """The first of `candidates` (default: the shipped models) that knows every one of `conditions`."""
    wanted = set(conditions)
    for path in shipped_models() if candidates is None else candidates:
        if wanted <= set(model_classes(path)):
            return Path(path)
    return None
