"""Assets shipped inside the package: the demo model trained on synthetic cells (weights, not network code)."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "demo"


def demo_model_path() -> Path | None:
    """The shipped demo checkpoint, or None in an install that does not carry it."""
    return DEMO_MODEL if (DEMO_MODEL / "phenotwin.json").is_file() else None
