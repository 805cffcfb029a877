"""napari layers in and out of a translation: read the sources, show the results.

Reading copies the pixels (the plane shown, or every plane of a stack; an RGB layer feeds
the model channel by channel), so a run never holds, and never modifies, the user's data.
Results are new layers tagged in their metadata (`ROLE_KEY`), placed with the source's
scale and translation and styled like it; a later run updates them in place, and a user's
layer that happens to share a name is never touched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui import widgets
from napari.layers import Image, Labels

from phenotwin.errors import PhenotwinError

if TYPE_CHECKING:
    import napari

    from phenotwin.percell import CellTranslation

ROLE_KEY = "phenotwin"
RGB_NAMES = ("R", "G", "B")
RGB_COLORMAPS = ("red", "green", "blue")
TOP_CELLS = 5


def role(layer) -> str | None:
    """'translation', 'heatmap', 'cell-scores' for our results; None for the user's layers."""
    return layer.metadata.get(ROLE_KEY, {}).get("role")


@dataclass(frozen=True)
class RGBChannel:
    """One colour channel of an RGB layer, offered as a channel choice of its own."""

    layer: Image
    index: int

    @property
    def name(self) -> str:
        return f"{self.layer.name} [{RGB_NAMES[self.index]}]"

    @property
    def metadata(self) -> dict:
        return self.layer.metadata


@dataclass
class SourcePlanes:
    """What a run translates: a copy of the selected plane(s), and how to place results."""

    layers: list[Image]  # the layer behind each channel (an RGB layer may feed several)
    names: list[str]  # one per channel: the layer's name, or 'photo [G]' for an RGB channel
    rgb_index: list[int | None]  # which RGB channel feeds each model channel, None for grey layers
    image: np.ndarray  # (C, H, W), or (C, *leading, H, W) for all planes of a stack: a copy
    scale: tuple[float, ...]  # of the result layers: the last two axes, or all for a stack
    translate: tuple[float, ...]
    fingerprint: str
    units: tuple[str, ...] = ()  # of the scale (napari's, e.g. 'micrometer'); () when this napari has none
    cells_name: str | None = None  # the Labels layer of a per-cell run
    labels: np.ndarray | None = None  # its plane shown (a copy)


def image_choices(viewer: napari.Viewer) -> list[tuple[str, Image | RGBChannel]]:
    """Image layers (not our results); an RGB layer is offered as its three channels."""
    choices = []
    for layer in viewer.layers:
        if not isinstance(layer, Image) or role(layer) is not None:
            continue
        if layer.rgb:
            choices += [(channel.name, channel) for channel in (RGBChannel(layer, i) for i in range(3))]
        else:
            choices.append((layer.name, layer))
    return choices


def labels_choices(viewer: napari.Viewer) -> list[tuple[str, Labels]]:
    return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, Labels) and role(layer) is None]


def default_channel_layers(viewer: napari.Viewer, pickers) -> str:
    """Pick distinct layers for the channels, matching channel names in layer names when possible,
    and never a layer of another condition than the ones still picked (layer metadata). A channel
    left without a layer stays empty; the sentence returned says so ("" when all are picked)."""
    layers = [layer for _, layer in image_choices(viewer)]
    chosen = [picker.value for picker in pickers]
    if chosen and all(value is not None and value in layers and chosen.count(value) == 1 for value in chosen):
        return ""  # a distinct, existing layer per channel: keep the user's choice (e.g. when results are added)
    kept = [value for value in chosen if value is not None and value in layers and chosen.count(value) == 1]
    conditions = {condition_of(value) for value in kept} - {None}
    if conditions:  # the condition of the layers still picked: others' layers are never offered in their place
        layers = [layer for layer in layers if condition_of(layer) in conditions | {None}]
    taken = {_key(value) for value in kept}
    missing = []
    for picker in pickers:
        if picker.value is not None and _key(picker.value) in taken and picker.value in layers:
            continue
        match = next((layer for layer in layers if picker.label.lower() in layer.name.lower()
                      and _key(layer) not in taken), None)
        match = match or next((layer for layer in layers if _key(layer) not in taken), None)
        if match is None:
            missing.append(picker.label)
        else:
            taken.add(_key(match))
        picker.value = match
    if not missing or not layers and not kept:
        return ""
    where = f" of condition {', '.join(sorted(conditions))}" if conditions else ""
    return f"No layer{where} left for {', '.join(missing)}: choose one (another condition's layer is never picked for you)."


def axes_note(viewer: napari.Viewer, choices: list, all_planes: bool) -> str:
    """What a layer's leading axes are taken as, in words: stack planes, never channels."""
    notes = []
    for choice in choices:
        layer = choice.layer if isinstance(choice, RGBChannel) else choice
        if layer is None or not isinstance(layer, Image):
            continue
        data = layer.data[0] if layer.multiscale else layer.data
        leading = data.shape[: data.ndim - 2 - int(layer.rgb)]
        if not leading:
            continue
        used = "every plane (Stack: all planes)" if all_planes else \
            f"only the plane shown ({', '.join(str(i) for i in current_index(viewer, layer, leading))})"
        notes.append(f"{choice.name!r} has {' x '.join(map(str, leading))} planes, read as a stack (z, time or "
                     f"wells), not as channels: {used} is used. If that axis holds channels, open the image with "
                     "one layer per channel (napari: 'Split Stack').")
    return "\n".join(notes)


class ChannelPickers(widgets.Container):
    """One image-layer choice per model channel: distinct, existing layers of one condition, kept so
    as layers come and go; whatever changes or is refused is said in `note` (and by `warn`)."""

    def __init__(self, viewer: napari.Viewer, on_change, warn=None) -> None:
        super().__init__(labels=True, label="Image")
        self.viewer, self._on_change, self._warn = viewer, on_change, warn or (lambda text: None)
        self.note = widgets.Label(value="", visible=False)
        self.note.native.setWordWrap(True)
        self._previous: dict[int, Any] = {}

    def build(self, names: list[str]) -> None:
        """A picker per channel name ('nucleus', 'golgi'; a layer of that name is chosen when there is one)."""
        self.clear()
        self._previous = {}
        for name in names:
            picker = widgets.ComboBox(label=name, choices=lambda _w: image_choices(self.viewer), nullable=True,
                                      tooltip=f"The image layer that holds the model's {name!r} channel. A layer "
                                              "can feed only one channel.")
            picker.changed.connect(lambda value, p=picker: self._picked(p, value))
            self.append(picker)
        self.refresh()

    def _picked(self, picker, value) -> None:
        others = [other.value for other in self if other is not picker]
        if value is not None and any(other is not None and _key(value) == _key(other) for other in others):
            self._warn(f"{value.name!r} is already the layer of another channel; pick a different layer for "
                       f"{picker.label} (the same layer for two channels is refused).")
            picker.value = self._previous.get(id(picker))  # emits again, with a distinct value
            return
        self._previous[id(picker)] = value
        self._on_change()

    def refresh(self) -> None:
        pickers = list(self)
        for picker in pickers:
            picker.reset_choices()
        said = default_channel_layers(self.viewer, pickers)
        if said and said != self.note.value:
            self._warn(said)
        self.note.value = said
        self.note.visible = bool(said)

    @property
    def choices(self) -> list:
        return [picker.value for picker in self]


def _key(choice) -> Any:
    """The same layer (or the same channel of an RGB layer) has the same key."""
    return (id(choice.layer), choice.index) if isinstance(choice, RGBChannel) else id(choice)


def condition_of(choice) -> str | None:
    """The condition a layer says it shows (its metadata), if any."""
    return getattr(choice, "metadata", {}).get(ROLE_KEY, {}).get("condition") if choice is not None else None


def guess_conditions(classes: list[str], choice, target: str) -> tuple[str, str] | None:
    """(source, target) when the layer of `choice` says which condition it shows (metadata): the
    source is that one, the target stays unless it is the same (then the next condition)."""
    condition = condition_of(choice)
    if condition not in classes:
        return None
    others = [c for c in classes if c != condition]
    return condition, (others[0] if target == condition and others else target)


def read_sources(viewer: napari.Viewer, choices: list, all_planes: bool = False, cells: Labels | None = None
                 ) -> SourcePlanes:
    """Copies of the chosen channels (one choice per model channel), checked to fit together."""
    if cells is not None and all_planes:
        raise PhenotwinError("per-cell mode translates the plane shown; set Stack to 'current plane', "
                             "or empty Cells (labels) to translate every plane.")
    layers, names, rgb_index, planes = [], [], [], []
    if len({_key(choice) for choice in choices if choice is not None}) < sum(c is not None for c in choices):
        raise PhenotwinError("the same layer is picked for two channels; pick a different layer for each channel.")
    for choice in choices:
        if choice is None:
            raise PhenotwinError("select an image layer for every channel the model needs.")
        layer, index = (choice.layer, choice.index) if isinstance(choice, RGBChannel) else (choice, None)
        if not isinstance(layer, Image):
            raise PhenotwinError(f"layer {layer.name!r} is a {type(layer).__name__} layer; choose an image layer.")
        data = _all_planes(layer) if all_planes else current_plane(viewer, layer)
        planes.append(data if index is None else data[..., index])
        layers.append(layer)
        names.append(choice.name)
        rgb_index.append(index)
    shapes = {plane.shape for plane in planes}
    if len(shapes) > 1:
        raise PhenotwinError(f"the selected layers have different sizes {sorted(shapes)}; pick matching channels.")
    image = np.stack(planes)
    digest = fingerprint(image)
    first, axes = layers[0], image.ndim - 1  # result layers have the planes' axes
    sources = SourcePlanes(layers=layers, names=names, rgb_index=rgb_index, image=image,
                           scale=tuple(first.scale[-axes:]), translate=tuple(first.translate[-axes:]),
                           fingerprint=digest, units=tuple(str(unit) for unit in getattr(first, "units", ())[-axes:]))
    if cells is not None:
        sources.cells_name, sources.labels = cells.name, current_plane(viewer, cells)
    return sources


def fingerprint(image: np.ndarray) -> str:
    """What the inversion cache knows the pixels by: the same pixels, the same inversion."""
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=12).hexdigest()


def current_plane(viewer: napari.Viewer, layer: Image | Labels) -> np.ndarray:
    """The 2-D plane of `layer` shown now (a copy: the layer is never modified); RGB keeps its colours."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    leading = data.shape[: data.ndim - 2 - int(getattr(layer, "rgb", False))]
    if leading:
        data = data[current_index(viewer, layer, leading)]
    return np.array(data, copy=True)


def current_index(viewer: napari.Viewer, layer, leading: tuple[int, ...]) -> tuple[int, ...]:
    """The index along the leading (stack) axes of the plane napari shows now."""
    point = layer.world_to_data(viewer.dims.point)
    return tuple(int(np.clip(round(p), 0, n - 1)) for p, n in zip(point[: len(leading)], leading))


def _all_planes(layer: Image) -> np.ndarray:
    """The whole stack (a copy), leading axes (T, Z, wells) first."""
    return np.array(layer.data[0] if layer.multiscale else layer.data, copy=True)


# -- showing results ------------------------------------------------------------------------


@dataclass
class Shown:
    """What the dock says about a result it showed."""

    status: str
    several: bool  # many cells or planes: the dock's verdict is the worst of them
    top_cells: str | None = None  # per-cell runs: the most changed cells, and the colours' legend
    translations: list[Image] = field(default_factory=list)  # a layer per channel, in channel order
    cells: Labels | None = None  # per-cell runs: the cells scored (the plane's labels), coloured by change


def show_result(viewer: napari.Viewer, result, sources: SourcePlanes) -> Shown:
    """Result layers for a Translation, CellTranslation or StackTranslation of `sources`."""
    from phenotwin.stacks import StackTranslation

    meta = result.metadata() if callable(result.metadata) else result.metadata
    top_cells = cells = None
    if sources.labels is not None:  # a CellTranslation
        meta = {**meta, "cells_layer": sources.cells_name}
        translations = _show_images(viewer, result.image, result.heatmap, meta, sources)
        top_cells, cells = _show_cells(viewer, result, meta, sources)
        described = f"{len(result.scores)} cells"
    else:
        translations = _show_images(viewer, result.image, result.heatmap, meta, sources)
        described = f"{meta['planes']} planes" if isinstance(result, StackTranslation) else "image"
    status = (f"{described.capitalize()}: {meta['source']} → {meta['target']} at strength "
              f"{meta['strength']:.2f} ({meta['steps']} steps).")
    return Shown(status, described != "image", top_cells, translations, cells)


def _show_images(viewer, translated: np.ndarray, heat: np.ndarray, meta: dict[str, Any], sources: SourcePlanes
                 ) -> list[Image]:
    """Translation layers (one per channel, styled like its source) and the heatmap; the translation layers."""
    return [layer for kind, layer in _image_layer_updates(viewer, translated, heat, meta, sources)
            if kind == "translation"]


def image_layer_updates(viewer: napari.Viewer, result, sources: SourcePlanes) -> Iterator[Image]:
    """A plain image's result layers one at a time: the preview comes while the worker computes,
    and adding or updating a layer costs napari 5-60 ms plus a redraw, so a caller that lets the
    event loop run between them keeps each stall to one layer's."""
    meta = result.metadata() if callable(result.metadata) else result.metadata
    for _, layer in _image_layer_updates(viewer, result.image, result.heatmap, meta, sources):
        yield layer


class StagedLayers:
    """Shows a plain image's result layers one per event-loop turn (`image_layer_updates`)."""

    def __init__(self) -> None:
        self._pending: Iterator[Image] | None = None

    def show(self, viewer: napari.Viewer, result, sources: SourcePlanes) -> None:
        self._pending = image_layer_updates(viewer, result, sources)
        self._next()

    def stop(self) -> None:
        """No more layers: the translation came (a late preview layer would overwrite it), or the dock closed."""
        self._pending = None

    def _next(self) -> None:
        from qtpy.QtCore import QTimer

        if self._pending is not None and next(self._pending, None) is not None:
            QTimer.singleShot(0, self._next)
        else:
            self._pending = None


def _image_layer_updates(viewer, translated: np.ndarray, heat: np.ndarray, meta: dict[str, Any],
                         sources: SourcePlanes) -> Iterator[tuple[str, Image]]:
    meta = {**meta, "source_layers": sources.names}
    for c, (layer, name, rgb) in enumerate(zip(sources.layers, sources.names, sources.rgb_index)):
        style = {"colormap": layer.colormap, "blending": layer.blending} if rgb is None else \
            {"colormap": RGB_COLORMAPS[rgb], "blending": "additive"}
        yield "translation", _put_layer(viewer, f"{name} → {meta['target']}", translated[c], "translation", meta,
                                        sources, contrast_limits=layer.contrast_limits, gamma=layer.gamma, **style)
    top = float(np.percentile(heat, 99.5)) if heat.size else 0.0
    yield "heatmap", _put_layer(viewer, f"{_common_name(sources.names)} Δ", heat, "heatmap", meta, sources,
                                colormap="inferno", blending="additive", opacity=0.8,
                                contrast_limits=(0.0, max(top, 1e-3)))


def _show_cells(viewer, result: CellTranslation, meta: dict[str, Any], sources: SourcePlanes) -> tuple[str, Labels]:
    """A new Labels layer (the user's is never touched) with the scores as features, coloured by change;
    the most changed cells in words, and the layer."""
    from matplotlib import colormaps
    from napari.utils.colormaps import DirectLabelColormap

    features = {"index": [row["label"] for row in result.scores],
                **{column: [row[column] for row in result.scores] for column in result.columns}}
    top = max(max(features["change"]), 1e-6)
    viridis = colormaps["viridis"]
    colors = {None: np.zeros(4), 0: np.zeros(4)}
    colors.update({label: np.asarray(viridis(change / top)) for label, change in
                   zip(features["index"], features["change"])})
    layer_name = f"{sources.cells_name} scores"
    existing = viewer.layers[layer_name] if layer_name in viewer.layers else None
    if existing is not None and role(existing) == "cell-scores":
        viewer.layers.remove(existing)
    layer = viewer.add_labels(sources.labels, name=layer_name, features=features,
                      metadata={ROLE_KEY: {"role": "cell-scores", **meta}}, opacity=0.6,
                      colormap=DirectLabelColormap(color_dict=colors), scale=sources.scale,
                      translate=sources.translate)
    ranked = sorted(result.scores, key=lambda row: row["change"], reverse=True)[:TOP_CELLS]
    return (f"Cell colours (viridis): dark purple = no change, yellow = the most, {top:.3f}.\n"
            "Most changed cells (label: change):\n" + "\n".join(f"{row['label']}: {row['change']:.3f}" for row in ranked)
            ), layer


def _put_layer(viewer, name: str, data: np.ndarray, kind: str, meta: dict[str, Any], sources: SourcePlanes,
               **style):
    """Update our result layer in place if it still exists, else add it with the source's geometry; the layer."""
    metadata = {ROLE_KEY: {"role": kind, **meta}}
    existing = viewer.layers[name] if name in viewer.layers else None
    if existing is not None and role(existing) != kind:
        existing = None  # the user's layer of that name: never touched, ours gets a new name
    if existing is not None and existing.data.shape != data.shape:  # a plane before, a stack now
        viewer.layers.remove(existing)
        existing = None
    units = {"units": sources.units} if sources.units else {}  # the source's µm stay µm
    if existing is not None:
        existing.data = data
        existing.metadata = metadata
        for key, value in {"scale": sources.scale, "translate": sources.translate}.items():
            if not np.array_equal(getattr(existing, key), value):  # each set redraws: only a changed one
                setattr(existing, key, value)  # the source's geometry, should it have changed since
        if units:
            existing.units = sources.units
        if kind == "heatmap":
            existing.contrast_limits = style["contrast_limits"]
        return existing
    return viewer.add_image(data, name=name, scale=sources.scale, translate=sources.translate, metadata=metadata, **units,
                     **style)


def save_scores(result: CellTranslation | None, path) -> None:
    """Write per-cell scores as CSV (atomically), saying what happened."""
    from napari.utils.notifications import show_error, show_info, show_warning

    if result is None:
        show_warning("No per-cell scores yet: choose a Cells (labels) layer and press Translate.")
        return
    try:
        written = result.write_csv(path)
    except OSError as err:
        show_error(f"Could not write {path}: {err}. Choose a folder you can write to.")
        return
    show_info(f"Per-cell scores written to {written}")


def keep_results(viewer: napari.Viewer) -> list:
    """Pin our current result layers (translation, heatmap, cell scores) under new names."""
    ours = [layer for layer in viewer.layers if role(layer) in ("translation", "heatmap", "cell-scores")]
    taken = {layer.name for layer in viewer.layers}
    number = next(n for n in range(1, 10_000) if not any(f"[kept {n}]" in name for name in taken))
    for layer in ours:
        meta = layer.metadata[ROLE_KEY]
        layer.metadata = {**layer.metadata, ROLE_KEY: {**meta, "role": f"kept {meta['role']}"}}
        layer.name = f"{layer.name} [kept {number}]"
    return ours


def result_layers(viewer: napari.Viewer, kind: str | None = None) -> list[Image]:
    """Our translation and heatmap layers (or those of one `kind`)."""
    return [layer for layer in viewer.layers if role(layer) in ((kind,) if kind else ("translation", "heatmap"))]


def _common_name(names: list[str]) -> str:
    """'control nucleus', 'control golgi' -> 'control'."""
    if len(names) == 1:
        return names[0]
    words = [name.split() for name in names]
    common = []
    for group in zip(*words):
        if len(set(group)) > 1:
            break
        common.append(group[0])
    return " ".join(common) or names[0]
