"""napari sample data: synthetic paired cells in both conditions with their change mask.

Intensities are 16-bit camera units, like a microscope's and like the demo model's
training data. Returns plain LayerData tuples, so this module imports neither Qt nor torch.
"""

from __future__ import annotations

# Held out from the demo model's training set, which starts at index 0.
HELD_OUT_START = 100_000
COLORMAPS = ["magenta", "green", "cyan"]


def _pairs_layers(phenotype: str, size: int, both_conditions: bool = True) -> list[tuple]:
    from phenotwin.synthetic import as_camera_units, make_pairs

    pairs = make_pairs(1, size=size, channels=2, phenotype=phenotype, seed=0, start=HELD_OUT_START)
    control, treated = pairs.condition_names
    conditions = ((control, pairs.control), (treated, pairs.treated)) if both_conditions else ((control, pairs.control),)
    layers = []
    for condition, images in conditions:
        layers.append((
            as_camera_units(images[0]),
            {
                "name": [f"{condition} {name}" for name in pairs.channel_names],
                "channel_axis": 0,
                "colormap": COLORMAPS[: len(pairs.channel_names)],
                "blending": "additive",
                "metadata": {"phenotwin": {"condition": condition, "synthetic": phenotype}},
                "visible": condition == control,
            },
            "image",
        ))
    layers.append((pairs.change_mask[0].astype("uint8"), {"name": "true change", "opacity": 0.4, "visible": False},
                   "labels"))
    return layers


def golgi_pairs() -> list[tuple]:
    """The obvious phenotype: a compact Golgi ribbon disperses into fragments (a 256 px field)."""
    return _pairs_layers("obvious", 256)


def subtle_pairs() -> list[tuple]:
    """A subtle phenotype a person would likely miss by eye (a 256 px field)."""
    return _pairs_layers("subtle", 256)


def demo_scene() -> list[tuple]:
    """Held-out cells at the demo model's 64 px, both conditions, ready for the Translate widget."""
    return _pairs_layers("obvious", 64)
