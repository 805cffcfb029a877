"""Asking before a long run: its estimated cost on this machine, and the crop of the view offered instead.

`checked` is what Translate calls before it starts a run: a run estimated under
`cost.CONFIRM_ABOVE_S` starts at once; a longer one asks, through the module's `ask` (a Qt
dialog; tests replace it), whether to translate it all, only the part of the image in view,
or nothing.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from phenotwin import cost
from phenotwin._napari import layers

if TYPE_CHECKING:
    from phenotwin._napari.session import RunRequest

RUN, CROP, CANCEL = "run", "crop", "cancel"


def ask(parent, text: str, crop_text: str | None) -> str:
    """A dialog: RUN, CROP (when `crop_text` offers one) or CANCEL."""
    from qtpy.QtWidgets import QMessageBox

    box = QMessageBox(parent)
    box.setWindowTitle("A long translation")
    box.setText(text)
    run = box.addButton("Translate it all", QMessageBox.ButtonRole.AcceptRole)
    crop = box.addButton(crop_text, QMessageBox.ButtonRole.ActionRole) if crop_text else None
    box.addButton(QMessageBox.StandardButton.Cancel)
    box.exec()
    clicked = box.clickedButton()
    return RUN if clicked is run else CROP if crop is not None and clicked is crop else CANCEL


def checked(widget, request: RunRequest) -> RunRequest | None:
    """`request`, the crop of the view instead, or None (the user said no) for a run that is long here."""
    plan = widget.session.plan(request)
    if plan.seconds is None or plan.seconds <= cost.CONFIRM_ABOVE_S:
        return request
    crop = None
    if request.labels is None and request.image.ndim == 3 and isinstance(request.context, layers.SourcePlanes):
        crop = view_crop(widget.viewer, request.context, widget.translator.image_size)
    cropped = crop and dataclasses.replace(request, image=crop.image, fingerprint=crop.fingerprint, context=crop)
    offer = None
    if cropped is not None:
        height, width = crop.image.shape[-2:]
        offer = f"Translate the view only ({width}x{height} px: {widget.session.plan(cropped).describe()})"
    answer = ask(widget.native, f"This translation makes {plan.describe()}. Start it?", offer)
    return request if answer == RUN else cropped if answer == CROP else None


def view_crop(viewer, sources: layers.SourcePlanes, size: int) -> layers.SourcePlanes | None:
    """The part of the plane in view (at least the model's size), or None when the whole plane is in view."""
    height, width = sources.image.shape[-2:]
    try:  # napari hands plugins a proxy of the viewer: its canvas is read on the viewer it wraps
        window = getattr(viewer, "__wrapped__", viewer).window
        canvas = np.asarray(window._qt_viewer.canvas.size, dtype=float)  # (height, width) in screen px
    except AttributeError:  # no canvas (a headless viewer): the model's size around the centre of the view
        canvas = np.array([float(size), float(size)]) * viewer.camera.zoom
    centre = np.asarray(viewer.camera.center[-2:], dtype=float)
    scale, translate = np.asarray(sources.scale[-2:], dtype=float), np.asarray(sources.translate[-2:], dtype=float)
    half = canvas / viewer.camera.zoom / 2
    shape = np.array([height, width])
    low = np.clip(np.floor((centre - half - translate) / scale), 0, shape).astype(int)
    high = np.clip(np.ceil((centre + half - translate) / scale), 0, shape).astype(int)
    for axis in (0, 1):  # at least the model's size (or the whole axis), kept inside the plane
        need = min(size, shape[axis])
        if high[axis] - low[axis] < need:
            low[axis] = min(max(0, (low[axis] + high[axis]) // 2 - need // 2), shape[axis] - need)
            high[axis] = low[axis] + need
    if (low == 0).all() and (high == shape).all():
        return None
    image = np.ascontiguousarray(sources.image[:, low[0]:high[0], low[1]:high[1]])
    origin = translate + low * scale
    return dataclasses.replace(sources, image=image, fingerprint=layers.fingerprint(image),
                               translate=(*sources.translate[:-2], *origin.tolist()))
