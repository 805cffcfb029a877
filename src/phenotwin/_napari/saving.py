"""Saving the result shown and opening it again: one OME-TIFF with its settings, and the npe2 reader.

"Save results…" writes the translation (one channel per model channel) and the heatmap as the
channels of one OME-TIFF (float32; each channel's own dtype is restored when read), and in its
OME description a JSON record: the layers' names, roles, colormaps and contrast limits, the
physical scale and placement, the run's provenance (the result's `metadata()`) and its complete
`TranslationSettings.to_dict()`. The reader (`get_reader`, the manifest's reader contribution)
claims only files that carry that record and opens them as kept result layers, styled as they
were, with the same metadata; any other TIFF is left to other readers. Imports neither Qt nor torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from phenotwin.errors import PhenotwinError

FORMAT, VERSION = "phenotwin-result", 1
KEY = "phenotwin"  # the layers' metadata key, and the record's in the OME description
STYLE = ("colormap", "contrast_limits", "blending", "gamma", "opacity")


def save_results(viewer, path: str | Path, result: Any) -> Path:
    """Write the result layers shown (translation channels, then the heatmap) and `result`'s settings."""
    from phenotwin._napari.layers import result_layers
    from phenotwin.io import write_tiff

    ours = result_layers(viewer, "translation") + result_layers(viewer, "heatmap")
    if not ours or result is None:
        raise PhenotwinError("there is no result to save yet: press Translate first.")
    first = ours[0]
    data = np.stack([np.asarray(layer.data, dtype=np.float32) for layer in ours])  # (C, *leading, H, W)
    leading = data.ndim - 3
    if leading > 2:
        raise PhenotwinError(f"results with {leading} stack axes cannot be saved as OME-TIFF (at most 2).")
    provenance = {k: v for k, v in first.metadata[KEY].items() if k != "role"}
    record = {
        "format": FORMAT, "version": VERSION, "axes": "C" + "TZ"[2 - leading:] + "YX",
        "scale": [float(s) for s in first.scale], "translate": [float(t) for t in first.translate],
        "layers": [{"name": layer.name, "role": layer.metadata[KEY]["role"], "dtype": str(layer.data.dtype),
                    **_style(layer)} for layer in ours],
        "provenance": provenance, "settings": result.settings.to_dict(),
        "units": [str(unit) for unit in getattr(first, "units", ())],  # napari's, restored by the reader
    }
    # OME's own fields too: other OME readers see the scale and the channels' names
    physical = dict(zip("TZ"[2 - leading:] + "YX", first.scale))
    physical.pop("T", None)  # a time step is not a length
    # OME wants the channel axis after time and z: (*leading, C, H, W) on disk
    return write_tiff(path, np.moveaxis(data, 0, leading), "TZ"[2 - leading:] + "CYX", {KEY: record},
                      physical_size=physical, unit=ome_unit(first), channel_names=[layer.name for layer in ours])


def ome_unit(layer) -> str:
    """The OME unit of the layer's scale along Y and X: its napari unit's symbol ('µm', 'nm'); napari's
    default 'pixel' (no reader said) counts as µm, the unit microscopy readers give napari scales in."""
    units = getattr(layer, "units", None)
    unit = units[-1] if units else None
    symbol = f"{unit:~}" if unit is not None else "px"
    return "µm" if symbol in ("px", "pixel") else symbol


def _style(layer) -> dict[str, Any]:
    return {"colormap": layer.colormap.name, "contrast_limits": [float(c) for c in layer.contrast_limits],
            "blending": str(layer.blending), "gamma": float(layer.gamma), "opacity": float(layer.opacity)}


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The phenotwin record of an OME-TIFF, or None when it is not a saved phenotwin result."""
    import xml.etree.ElementTree as ElementTree

    import tifffile

    if not str(path).lower().endswith((".tif", ".tiff")) or not Path(path).is_file():
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata
        if not xml:
            return None
        texts = [e.text for e in ElementTree.fromstring(xml).iter() if e.tag.endswith("Description") and e.text]
        record = json.loads(texts[0]).get(KEY) if texts else None
    except (OSError, ValueError, tifffile.TiffFileError, ElementTree.ParseError, AttributeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def get_reader(path: str | list[str]):
    """npe2 reader: `read_results` for a saved phenotwin result, else None (another reader's file)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    return read_results if read_record(path) is not None else None


def read_results(path: str | list[str]) -> list[tuple]:
    """The saved layers as napari layer data: kept results (never updated by a run, never offered as
    inputs), styled as saved, with the run's provenance and settings in their metadata."""
    import tifffile

    path = path[0] if isinstance(path, list) else path
    record = read_record(path)
    if record is None:
        raise PhenotwinError(f"{path} is not a result saved by phenotwin (no phenotwin record in it).")
    data = tifffile.imread(path)
    leading = len(record["axes"]) - 3
    data = np.moveaxis(data, leading, 0)  # channels first again
    layers = []
    for plane, saved in zip(data, record["layers"]):
        meta = {**record["provenance"], "role": f"kept {saved['role']}", "settings": record["settings"],
                "saved_as": str(path)}
        style = {key: saved[key] for key in STYLE}
        units = {"units": record["units"]} if record.get("units") else {}
        layers.append((plane.astype(saved["dtype"]), {"name": saved["name"], "scale": record["scale"], **units,
                                                       "translate": record["translate"], "metadata": {KEY: meta},
                                                       **style}, "image"))
    return layers
