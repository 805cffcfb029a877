"""What every widget's worker thread runs first, and the generator napari's workers drive."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from typing import Any, TypeVar

T = TypeVar("T")

_DIFFUSERS_CLASSES = ("AutoencoderKL", "UNet2DModel", "UNet2DConditionModel", "DDIMScheduler", "DDIMInverseScheduler")
_diffusers_lock = threading.Lock()


def resolve_diffusers() -> None:
    """Import diffusers' classes one thread at a time.

    diffusers resolves its classes lazily, and two threads resolving them at once fail with
    "cannot import name 'AutoencoderKL'" (the demo model still loading while the user loads
    another, or the Evaluate widget starting beside the Translate widget). Cheap once done."""
    with _diffusers_lock:
        import diffusers

        for name in _DIFFUSERS_CLASSES:
            getattr(diffusers, name)


def load(function: Callable[..., T], *args: Any) -> T:
    """For `create_worker`: `function(*args)` after diffusers is safely imported."""
    resolve_diffusers()
    return function(*args)


def run_steps(steps: Generator[Any, None, T]) -> Generator[Any, None, T]:
    """For `create_worker`: forwards every progress event of `steps`, returns its result."""
    resolve_diffusers()
    return (yield from steps)
