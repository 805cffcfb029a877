"""Inference: settings, schedules, the inversion trajectory, caches, the edit mask, outputs and the Translator.

Modules, in the order an image meets them:
- `settings`: `TranslationSettings`, the one settings object, and its only validator;
- `schedulers`: the matched DDIM and DPM-Solver++ pairs and the one strength -> steps map;
- `trajectory`: DDIM or DPM-Solver++ step by step (inversion, kept states, generation, sampling);
- `edit_mask`: where the conditions differ (DiffEdit-style, soft, per channel);
- `cache`: generated images kept for scrubbing, within a byte budget;
- `heatmap`: the difference maps and PSNR;
- `outputs`: `Inversion` and `Translation`;
- `translator`: `Translator`, which orchestrates them.
Names are imported lazily so that `import phenotwin.pipeline` stays cheap (no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from phenotwin.pipeline.outputs import Inversion, Translation
    from phenotwin.pipeline.settings import TranslationSettings
    from phenotwin.pipeline.translator import Translator

__all__ = ["Inversion", "Translation", "TranslationSettings", "Translator"]
_HOMES = {"Inversion": "outputs", "Translation": "outputs", "TranslationSettings": "settings", "Translator": "translator"}


def __getattr__(name: str):
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(f"phenotwin.pipeline.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'phenotwin.pipeline' has no attribute {name!r}")
