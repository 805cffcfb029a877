"""Stacks and channel selection: arrays with named axes (e.g. TZCYX, ZYX, YXS) to model planes and back.

A translation takes one 2-D plane with the model's channels. Microscopy files hold more:
time points, z slices, wells, extra channels, RGB samples. `PlaneStack` names the axes of
such an array, picks the channels that feed the model, iterates over its planes
(channels first, as `Translator.translate(..., channel_axis=0)` takes them) and puts
per-plane results back in the input's axis order. `translate_planes_steps` translates
planes one after the other; batch and the napari widget both run stacks through it.
Qt-free and torch-free so the CLI, the napari widget and scripts share it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.input_fit import FitReport
from phenotwin.progress import Steps, tagged
from phenotwin.trust import TrustVerdict

if TYPE_CHECKING:
    from phenotwin.pipeline import Translation, TranslationSettings, Translator

CHANNEL_AXES = "CS"  # C: channels; S: samples, as tifffile names RGB(A) components
# Leading axes the OME-TIFF writer (tifffile) accepts; others (e.g. tifffile's 'I') are written as Q.
OME_LEADING = "TZQAPRHEL"
UNKNOWN_AXES = "QI"  # tifffile's names for axes it could not identify


def file_axes(path: str | os.PathLike, array: np.ndarray) -> str | None:
    """The axes a file declares (OME/ImageJ/tifffile metadata) for `array` as read, or None if unknown.

    tifffile names axes it cannot identify Q or I: a TIFF with such an axis is unknown
    unless it is 2-D (YX). PNG and JPEG hold YX or YX plus colour samples (YXS).
    """
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return "YX" if array.ndim == 2 else "YXS" if array.ndim == 3 else None
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes if tuple(series.shape) == array.shape else None
    if axes is not None and not any(letter in UNKNOWN_AXES for letter in axes):
        return axes
    return "YX" if array.ndim == 2 else None


def check_axes(axes: str, shape: tuple[int, ...], origin: str = "--axes") -> str:
    """Validate an axes string for an array of `shape`; return it upper-cased."""
    axes = axes.upper()
    problems = []
    if len(axes) != len(shape):
        problems.append(f"it has {len(axes)} letter(s) but the image has {len(shape)} axes {tuple(shape)}")
    _refuse_axes(f"{origin} {axes!r} does not fit the image", problems + _letter_problems(axes))
    return axes


def check_axes_letters(axes: str, origin: str = "--axes") -> str:
    """What is wrong with an axes string whatever the image (no Y, a repeated letter...): said
    once before any file is read, not once per file."""
    axes = axes.upper()
    _refuse_axes(f"{origin} {axes!r} cannot name the axes of any image", _letter_problems(axes))
    return axes


def _letter_problems(axes: str) -> list[str]:
    problems = []
    if not axes.isascii() or not axes.isalpha():
        problems.append("it must be letters only")
    if "Y" not in axes or "X" not in axes:
        problems.append("it needs a Y and an X axis")
    if len(set(axes)) != len(axes):
        problems.append("a letter is repeated")
    if sum(letter in CHANNEL_AXES for letter in axes) > 1:
        problems.append("it has both C and S; name the channel axis C")
    return problems


def _refuse_axes(what: str, problems: list[str]) -> None:
    if problems:
        raise PhenotwinError(
            f"{what}: {'; '.join(problems)}. Give one letter per axis, e.g. "
            "YX (grayscale), CYX (channels first), YXC (channels last), ZYX (z stack), TZCYX; "
            "T = time, Z = depth, Q = any other axis (wells, positions), C = channels."
        )


@dataclass(frozen=True)
class PlaneStack:
    """An image array with named axes, seen as a sequence of model-ready (C, Y, X) planes.

    `channels` are the indices along the channel axis that feed the model (None: all).
    An image without a channel axis gives (Y, X) planes.
    """

    array: np.ndarray
    axes: str
    channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes", check_axes(self.axes, self.array.shape, "axes"))
        if self.channels is not None:
            if self.channel_axis is None:
                raise PhenotwinError(
                    f"channels {list(self.channels)} were selected but the image has no channel axis "
                    f"(axes {self.axes}); drop the channel selection, or name the channel axis C with --axes."
                )
            count = self.array.shape[self.axes.index(self.channel_axis)]
            bad = [c for c in self.channels if not 0 <= c < count]
            if bad or not self.channels:
                raise PhenotwinError(
                    f"channel selection {list(self.channels)} does not fit an image with {count} channel(s); "
                    f"pick indices from 0 to {count - 1}."
                )

    @property
    def channel_axis(self) -> str | None:
        """'C' or 'S' if the image has a channel axis."""
        return next((letter for letter in self.axes if letter in CHANNEL_AXES), None)

    @property
    def leading_axes(self) -> str:
        """Axes over which planes are taken (e.g. 'TZ'), in the input's order."""
        return "".join(letter for letter in self.axes if letter not in "YX" and letter not in CHANNEL_AXES)

    @property
    def leading_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[self.axes.index(letter)] for letter in self.leading_axes)

    @property
    def plane_count(self) -> int:
        return int(np.prod(self.leading_shape, dtype=np.int64))

    def _canonical_order(self) -> str:
        return self.leading_axes + (self.channel_axis or "") + "YX"

    def planes(self) -> Iterator[np.ndarray]:
        """Each (C, Y, X) plane (or (Y, X) without a channel axis), selected channels only; views, not copies."""
        order = self._canonical_order()
        canonical = np.transpose(self.array, [self.axes.index(letter) for letter in order])
        if self.channels is not None:
            canonical = np.take(canonical, self.channels, axis=len(self.leading_axes))
        for index in np.ndindex(*self.leading_shape):
            yield canonical[index]

    def assemble(self, planes: Sequence[np.ndarray], with_channels: bool = True) -> tuple[np.ndarray, str]:
        """Stack per-plane results back in the input's axis order; returns (array, OME axes).

        `planes` are (C, Y, X) results in `planes()` order, or (Y, X) results (e.g. heatmaps)
        with `with_channels=False`, which drops the channel axis. In the axes returned, S is
        written as C and leading axes the OME writer does not know as Q.
        """
        stacked = np.stack(list(planes)).reshape(*self.leading_shape, *planes[0].shape)
        order = self.leading_axes + ((self.channel_axis or "") if with_channels else "") + "YX"
        kept = "".join(letter for letter in self.axes if letter in order)
        result = np.transpose(stacked, [order.index(letter) for letter in kept])
        ome = "".join("C" if letter == "S" else (letter if letter in OME_LEADING + "CYX" else "Q") for letter in kept)
        return result, ome


def translate_planes_steps(translator: Translator, planes: Iterable[np.ndarray], count: int,
                           settings: TranslationSettings, channel_axis: int | None = 0) -> Steps[list[Translation]]:
    """Translate `count` planes in turn, each `Progress` tagged "plane k of count"; an error names its plane."""
    results = []
    for k, plane in enumerate(planes):
        try:
            run = translator.translate_steps(plane, channel_axis=channel_axis, settings=settings)
            results.append((yield from tagged(run, k + 1, count, "plane")))
        except PhenotwinError as err:
            if count == 1:
                raise
            raise PhenotwinError(f"plane {k + 1} of {count}: {err}") from err
    return results


@dataclass
class StackTranslation:
    """Every plane of a stack translated: results with the stack's shape."""

    image: np.ndarray  # (C, *leading, H, W) in the input's units
    heatmap: np.ndarray  # (*leading, H, W)
    metadata: dict[str, Any]
    reconstruction_psnr: float  # the worst plane's
    fit: FitReport | None = None  # the worst plane's input fit
    trust: TrustVerdict | None = None  # the least trustworthy plane's verdict


def translate_stack_steps(translator: Translator, image: np.ndarray,
                          settings: TranslationSettings) -> Steps[StackTranslation]:
    """Every plane of a (C, *leading, H, W) array (a napari stack, channels first), one after the other."""
    leading = image.shape[1:-2]
    indices = list(np.ndindex(*leading))
    results = yield from translate_planes_steps(translator, (image[(slice(None), *i)] for i in indices), len(indices),
                                                settings)
    translated = np.stack([r.image for r in results], axis=1).reshape(image.shape)
    heatmap = np.stack([r.heatmap for r in results]).reshape(*leading, *image.shape[-2:])
    worst = min(r.reconstruction_psnr for r in results)
    fit, trust = FitReport.worst([r.fit for r in results]), TrustVerdict.worst([r.trust for r in results])
    meta = {**results[0].metadata(), "reconstruction_psnr": worst, "planes": len(results), "trust": trust.to_dict(),
            "input_fit": {"level": fit.level, "findings": list(fit.findings)}}
    return StackTranslation(image=translated, heatmap=heatmap, metadata=meta, reconstruction_psnr=worst, fit=fit,
                            trust=trust)
