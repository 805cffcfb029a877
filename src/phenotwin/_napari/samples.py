"""napari sample data: synthetic paired cells in both conditions with their change mask.

Returns plain LayerData tuples, so this module imports neither Qt nor torch.
"""

from __future__ import annotations


def _pairs_layers(phenotype: str) -> list[tuple]:
    from phenotwin.synthetic import make_pairs

    pairs = make_pairs(1, size=256, channels=2, phenotype=phenotype, seed=0)
    control, treated = pairs.condition_names
    layers = []
    for condition, images in ((control, pairs.control), (treated, pairs.treated)):
        layers.append(
            (
                images[0],
                {
                    "name": [f"{condition} {name}" for name in pairs.channel_names],
                    "channel_axis": 0,
                    "colormap": ["magenta", "green"],
                    "blending": "additive",
                    "metadata": {"phenotwin": {"condition": condition, "synthetic": phenotype}},
                },
                "image",
            )
        )
    layers.append(
        (
            pairs.change_mask[0].astype("uint8"),
            {"name": "true change", "opacity": 0.5},
            "labels",
        )
    )
    return layers


def golgi_pairs() -> list[tuple]:
    """The obvious phenotype: a compact Golgi ribbon disperses into fragments."""
    return _pairs_layers("obvious")


def subtle_pairs() -> list[tuple]:
    """A subtle phenotype a person would likely miss by eye."""
    return _pairs_layers("subtle")
