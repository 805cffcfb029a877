"""napari-phenotwin: see the same cells under another experimental condition.

Importing this package is cheap: torch and diffusers load only when a model is used, so
napari's Plugins menu stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from phenotwin.errors import Cancelled, CheckpointError, PhenotwinError, PhenotwinWarning

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "CheckpointError",
    "Inversion",
    "PhenotwinError",
    "PhenotwinWarning",
    "Translation",
    "TranslationSettings",
    "Translator",
    "__version__",
]

if TYPE_CHECKING:
    from phenotwin.pipeline import Inversion, Translation, TranslationSettings, Translator


def __getattr__(name: str):
    if name in ("Translator", "Translation", "TranslationSettings", "Inversion"):
        from phenotwin import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'phenotwin' has no attribute {name!r}")
