"""Microscopy intensities in and out: one `ImageProcessor` for layout, dtype, channels and normalisation.

Models work on channel-first float images in [-1, 1]. Users have 2-D grayscale or
multichannel arrays, channel axis first or last, in uint8, uint16 or float, in their
microscope's units. An `ImageProcessor` (like diffusers' `VaeImageProcessor`, one class for
both directions) checks an image, maps it to model range with the checkpoint's
normalisation, pads it for the model, and maps results back to the input's layout, units
and dtype. The input array is never modified. Torch-free.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from phenotwin.errors import PhenotwinError, PhenotwinWarning
from phenotwin.input_fit import FitReport, check_fit

MIN_SIZE = 16


@dataclass(frozen=True)
class ImageLayout:
    """How to put a model-range (C, H, W) result back into the user's array conventions."""

    shape: tuple[int, ...]
    dtype: np.dtype
    channel_axis: int | None
    low: np.ndarray  # (C,) raw value mapped to 0
    high: np.ndarray  # (C,) raw value mapped to 1


def _normalise_channel_axis(ndim: int, channel_axis: int | None) -> int | None:
    if channel_axis is None:
        return None
    if channel_axis not in (0, -1, ndim - 1):
        raise PhenotwinError(
            f"channel_axis={channel_axis} is not supported: channels must be the first (0) or last (-1) axis. "
            "Move the channel axis with numpy.moveaxis first."
        )
    return 0 if channel_axis == 0 else -1


def channels_first(image: Any, channel_axis: int | None = None) -> tuple[np.ndarray, int | None]:
    """A (C, H, W) view of one 2-D plane, grayscale (no `channel_axis`) or with channels first (0)
    or last (-1), plus the channel axis as 0, -1 or None; the one place the axis is interpreted."""
    array = np.asarray(image)
    if array.ndim == 2:
        if channel_axis is not None:
            raise PhenotwinError(
                f"channel_axis={channel_axis} was given but the image is 2-D {array.shape}; omit channel_axis for grayscale."
            )
        return array[np.newaxis], None
    if array.ndim == 3:
        if channel_axis is None:
            raise PhenotwinError(
                f"image is 3-D {array.shape} but no channel_axis was given. If it holds channels, pass "
                "channel_axis=0 (first) or -1 (last); if it is a stack (time, z, wells), translate one 2-D plane at a time."
            )
        axis = _normalise_channel_axis(3, channel_axis)
        return (array if axis == 0 else np.moveaxis(array, -1, 0)), axis
    raise PhenotwinError(
        f"image is {array.ndim}-D {array.shape}; a translation takes one 2-D plane, grayscale or with a channel "
        "axis. Select a single plane of the stack (e.g. image[t, z]) and translate planes one at a time."
    )


def to_channels_first(image: Any, channels: int, channel_axis: int | None = None) -> tuple[np.ndarray, int | None]:
    """Validate a user image and return a float64 (C, H, W) copy plus the normalised channel axis."""
    array = np.asarray(image)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise PhenotwinError(
            f"image has dtype {array.dtype}; expected uint8, uint16 or float intensities. "
            "Labels, masks and complex data cannot be translated."
        )
    chw, axis = channels_first(array, channel_axis)
    if chw.shape[0] != channels:
        raise PhenotwinError(
            f"image has {chw.shape[0]} channel(s) but the model was trained on {channels}. "
            + (
                "Select a single channel, or use a model trained on multichannel images."
                if channels == 1
                else f"Give an image with exactly {channels} channels in the model's order, or check channel_axis."
            )
        )
    height, width = chw.shape[1:]
    if min(height, width) < MIN_SIZE:
        raise PhenotwinError(
            f"image is {height}x{width} pixels; at least {MIN_SIZE}x{MIN_SIZE} is needed. Select a larger region."
        )
    data = chw.astype(np.float64)  # always a copy: the caller's array is never touched
    bad = ~np.isfinite(data)
    if bad.any():
        raise PhenotwinError(
            f"image contains {int(bad.sum())} NaN or infinite value(s). Replace them (e.g. numpy.nan_to_num) "
            "or crop them away before translating."
        )
    if data.max() == data.min():
        raise PhenotwinError(
            f"image is constant (every pixel is {data.flat[0]:g}); there are no cells to translate. "
            "Check that the right layer or plane is selected."
        )
    return data, axis


def intensity_range(chw: np.ndarray, normalization: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel raw values that map to 0 and 1, from the checkpoint's normalisation."""
    mode = normalization["mode"]
    if mode == "fixed":
        low = np.asarray(normalization["low"], dtype=np.float64)
        high = np.asarray(normalization["high"], dtype=np.float64)
    elif mode == "percentile":
        flat = chw.reshape(chw.shape[0], -1)
        low = np.percentile(flat, normalization.get("low", 0.1), axis=1)
        high = np.percentile(flat, normalization.get("high", 99.9), axis=1)
    else:  # validated when the checkpoint is read
        raise PhenotwinError(f"unknown normalization mode {mode!r}")
    flat_channels = high <= low
    if flat_channels.any():
        # A channel with no contrast (e.g. empty) must not divide by zero; use its full span.
        span = chw.reshape(chw.shape[0], -1)
        low = np.where(flat_channels, span.min(axis=1), low)
        high = np.where(flat_channels, np.maximum(span.max(axis=1), low + 1e-6), high)
    return low, high


def normalise(chw: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Raw intensities to model range [-1, 1] (values outside the range are clipped)."""
    unit = (chw - low[:, None, None]) / (high - low)[:, None, None]
    return (np.clip(unit, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def denormalise(model_range: np.ndarray, layout: ImageLayout) -> np.ndarray:
    """Model range (C, H, W) back to the caller's units, dtype and channel layout."""
    unit = (np.clip(model_range.astype(np.float64), -1.0, 1.0) + 1.0) / 2.0
    raw = unit * (layout.high - layout.low)[:, None, None] + layout.low[:, None, None]
    if np.issubdtype(layout.dtype, np.integer):
        info = np.iinfo(layout.dtype)
        raw = np.clip(np.rint(raw), info.min, info.max).astype(layout.dtype)
    else:
        raw = raw.astype(layout.dtype if layout.dtype.itemsize >= 4 else np.float32)
    return from_channels_first(raw, layout.channel_axis)


def from_channels_first(chw: np.ndarray, channel_axis: int | None) -> np.ndarray:
    if channel_axis is None:
        return chw[0]
    return chw if channel_axis == 0 else np.moveaxis(chw, 0, -1)


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the model, and what it takes to put results back."""

    model_input: np.ndarray  # (C, H', W') model range, padded to at least the model size
    normalised: np.ndarray  # (C, H, W) model range, at the image's own size
    layout: ImageLayout
    fit: FitReport  # how the image's intensities compare with the training images'


class ImageProcessor:
    """A model's view of images: its channel count, its normalisation (and the statistics of
    its training images), its size and the multiple its autoencoder needs; `preprocess` goes
    to model range and reports the input's fit, `postprocess` goes back."""

    def __init__(self, channels: int, normalization: dict[str, Any], model_size: int, multiple: int = 1,
                 statistics: dict[str, Any] | None = None, channel_names: list[str] | None = None):
        self.channels = channels
        self.normalization = normalization
        self.model_size = model_size
        self.multiple = multiple
        self.statistics = statistics
        self.channel_names = channel_names

    def preprocess(self, image: Any, channel_axis: int | None = None, match_intensities: bool = False) -> PreparedImage:
        """Check and normalise an image, and compare its intensities with the training images'.

        The model input is the normalised image, reflect-padded at the bottom and right to at
        least the model's size and to a multiple of `multiple` (the autoencoder's downsampling);
        results are cropped back. Fields larger than the model are translated tile by tile.
        `match_intensities` maps the image's own percentiles (those the training range was
        taken at) onto the training range, for images from another microscope setting; results
        come back in the image's own units.
        """
        original = np.asarray(image)
        chw, axis = to_channels_first(original, self.channels, channel_axis)
        low, high = intensity_range(chw, self.normalization)
        mode = self.normalization["mode"]
        matched = match_intensities and mode == "fixed"
        if matched:
            own_low, own_high = intensity_range(chw, {"mode": "percentile", **_percentiles(self.normalization)})
            in_training_units = (chw - own_low[:, None, None]) / (own_high - own_low)[:, None, None]
            fit = check_fit(in_training_units * (high - low)[:, None, None] + low[:, None, None], low, high,
                            self.statistics, mode, original.dtype, self.channel_names, matched=True)
            low, high = own_low, own_high
        else:
            fit = check_fit(chw, low, high, self.statistics, mode, original.dtype, self.channel_names)
        full = normalise(chw, low, high)
        layout = ImageLayout(shape=original.shape, dtype=original.dtype, channel_axis=axis, low=low, high=high)
        height, width = full.shape[1:]
        size = self.model_size
        if height < size or width < size:
            warnings.warn(
                f"image is {height}x{width}, smaller than the model's {size}x{size}; it is padded by "
                "reflection for translation. Cells near the padded edge may be translated less faithfully.",
                PhenotwinWarning,
                stacklevel=3,
            )
        if fit.level in ("warning", "does-not-fit"):
            warnings.warn(fit.message, PhenotwinWarning, stacklevel=3)
        target_h = max(size, -(-height // self.multiple) * self.multiple)
        target_w = max(size, -(-width // self.multiple) * self.multiple)
        return PreparedImage(pad_reflect(full, target_h, target_w), full, layout, fit)

    @staticmethod
    def postprocess(model_range: np.ndarray, layout: ImageLayout) -> np.ndarray:
        """Model range (C, H, W) back to the caller's units, dtype and channel layout."""
        return denormalise(model_range, layout)

    def to_model_range(self, images: np.ndarray) -> np.ndarray:
        """Raw (N, C, H, W) images in model range with this model's normalisation (evaluation, metrics)."""
        return np.stack([normalise(im.astype(np.float64), *intensity_range(im, self.normalization)) for im in images])


def _percentiles(normalization: dict[str, Any]) -> dict[str, float]:
    """The percentiles a fixed training range was taken at (phenotwin train records them)."""
    low, high = normalization.get("from_percentiles", (0.1, 99.9))
    return {"low": low, "high": high}


def pad_reflect(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad bottom/right by mirroring (symmetric, so a pad larger than the image still works)."""
    pad_h, pad_w = height - chw.shape[1], width - chw.shape[2]
    if pad_h == 0 and pad_w == 0:
        return chw
    return np.pad(chw, ((0, 0), (0, pad_h), (0, pad_w)), mode="symmetric")
