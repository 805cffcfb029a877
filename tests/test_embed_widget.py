"""The phenotype map: its points and arrows (Qt-free), and the dock in a real napari window."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from phenotwin.embed.phenomap import MAP_SPAN, map_steps
from phenotwin.errors import PhenotwinError
from phenotwin.progress import drive
from phenotwin.testing import make_tiny_plates_and_encoder


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("map")
    _, encoder = make_tiny_plates_and_encoder(root, n=3, seed=4, steps=2)
    # a "translation" of two control cells: the first nocodazole image written under their names
    (root / "translated/control").mkdir(parents=True)
    first_treated = tifffile.imread(sorted((root / "plates/nocodazole").glob("*.tif"))[0])
    sources = sorted((root / "plates/control").glob("*.tif"))[:2]
    for source in sources:
        tifffile.imwrite(root / "translated/control" / f"{source.stem}_translated.tif", first_treated)
    return root, encoder, first_treated


def test_map_points_and_translation_arrows(material):
    root, encoder, _ = material
    result = drive(map_steps(encoder, root / "plates", root / "translated"))
    assert result.coords.shape == (12, 2) and result.conditions.count("control") == 6
    assert result.coords.min() == pytest.approx(0) and result.coords.max() == pytest.approx(MAP_SPAN)
    assert len(result.arrows) == 2
    treated = next(i for i, f in enumerate(result.files) if f.parent.name == "nocodazole")
    for k, source in enumerate(result.arrow_sources):
        assert result.conditions[source] == "control"
        assert np.allclose(result.arrows[k, 0], result.coords[source])
        # the arrow ends where the nocodazole image it copies lies on the map
        assert np.allclose(result.arrows[k, 0] + result.arrows[k, 1], result.coords[treated], atol=1e-6)
    with pytest.raises(PhenotwinError, match="named after a cell"):
        drive(map_steps(encoder, root / "plates", root / "enc"))


gui = pytest.mark.skipif(not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen",
                         reason="needs a display: run under xvfb-run")


@pytest.mark.gui
@gui
def test_map_dock_shows_points_and_selection_shows_the_cells(make_napari_viewer, qtbot, material):
    pytest.importorskip("napari")
    from phenotwin._napari.map_widget import PhenotypeMapWidget

    root, encoder, _ = material
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-phenotwin", "Phenotype map")
    assert isinstance(widget, PhenotypeMapWidget)
    widget.encoder.value, widget.data.value = str(encoder), str(root / "plates")
    widget.translations.value = str(root / "translated")
    widget.start()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert widget.status.value == "Done: 12 cells, 2 translations."
    points = viewer.layers["Phenotype map"]
    assert len(points.data) == 12 and list(points.features["condition"]).count("nocodazole") == 6
    colours = {tuple(np.round(c, 3)) for c in points.face_color}
    assert len(colours) == 2  # one colour per condition
    assert viewer.layers["Translations"].data.shape == (2, 2, 2)
    points.selected_data = {3, 7}
    assert viewer.dims.current_step[0] == 3
    cells = viewer.layers["Map cells"].data
    shown = viewer.layers["Selected cells"].data
    assert np.array_equal(shown, np.concatenate([cells[3], cells[7]], axis=1))


def test_a_vae_map_places_translations_and_walks_its_axes(material):
    import torch

    from phenotwin.embed.phenomap import vae_map_steps

    root, _, _ = material
    events = []
    result = drive(vae_map_steps(root / "plates", root / "translated", steps=20, size=16), events.append)
    assert [e.step for e in events] == list(range(1, 21))  # one Progress per training step
    assert result.coords.shape == (12, 2) and len(result.arrows) == 2
    treated = next(i for i, f in enumerate(result.files) if f.parent.name == "nocodazole")
    for arrow in result.arrows:  # a copy of a nocodazole cell lands on that cell (within 0.05 of 400)
        assert np.allclose(arrow[0] + arrow[1], result.coords[treated], atol=0.05)
    rows = result.traversal(3, count=7)
    assert rows.shape == (2, 7, 2, 16, 16)
    with torch.no_grad():  # the middle of both walks is the cell itself, decoded upright
        own = result.traversal.model.decode(torch.as_tensor(result.traversal.latents[3:4])).clamp(-1, 1).numpy()[0]
    np.testing.assert_allclose(rows[0, 3], own, atol=1e-6)
    np.testing.assert_allclose(rows[1, 3], own, atol=1e-6)
    for line in rows:  # each walk changes the drawing, more the further it goes
        steps = [np.abs(image - own).mean() for image in line]
        assert steps[0] > steps[2] > 0 and steps[6] > steps[4] > 0


@pytest.mark.gui
@gui
def test_the_vae_map_dock_shows_the_selected_cells_latent_traversal(make_napari_viewer, qtbot, material,
                                                                    monkeypatch):
    import phenotwin.embed.affinity_vae as affinity_vae
    from phenotwin._napari.map_widget import VAE, PhenotypeMapWidget

    root, _, _ = material
    said = []
    monkeypatch.setattr(affinity_vae, "collapse_warning", lambda content: said.append(content.shape) or "flat map")
    viewer = make_napari_viewer()
    widget = PhenotypeMapWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.features.value = VAE
    assert widget.encoder.native.isHidden() and not widget.vae_steps.native.isHidden()
    widget.vae_steps.value, widget.data.value = 20, str(root / "plates")
    widget.start()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert len(viewer.layers["Phenotype map"].data) == 12
    assert said == [(12, 8)] and widget.status.value.endswith("Warning: flat map")  # the check saw the latents
    viewer.layers["Phenotype map"].selected_data = {5}
    qtbot.waitUntil(lambda: "Latent traversal" in viewer.layers, timeout=30_000)
    layer = viewer.layers["Latent traversal"]
    expected = widget.result.traversal(5)[:, :, 0]
    assert layer.data.shape == (2 * 32, 7 * 32)  # two walks of 7 cells, 32 px (the VAE's size)
    np.testing.assert_allclose(layer.data[:32, 3 * 32: 4 * 32], expected[0, 3], atol=1e-6)
    np.testing.assert_allclose(layer.scale, (1.0, 1.0))  # the cells are 32 px too


@pytest.mark.gui
@gui
def test_a_vae_map_trained_in_the_dock_is_saved_and_places_cells_where_the_dock_did(make_napari_viewer, qtbot,
                                                                                   material, tmp_path, monkeypatch):
    from phenotwin._napari import map_widget
    from phenotwin._napari.map_widget import VAE, PhenotypeMapWidget
    from phenotwin.cli import main
    from phenotwin.embed.phenomap import saved_vae_map_steps

    root, _, _ = material
    viewer = make_napari_viewer()
    widget = PhenotypeMapWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.features.value = VAE
    assert not widget.save_folder.native.isHidden() and not widget.save_button.enabled  # nothing to save yet
    widget.vae_steps.value, widget.data.value = 20, str(root / "plates")
    widget.translations.value = str(root / "translated")
    widget.start()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert widget.save_button.enabled and len(widget.result.arrows) == 2
    widget.save_folder.value = str(tmp_path / "dock-map")
    widget.save()
    assert "Saved the VAE map" in widget.status.value
    # the saved map puts the same cells where the dock showed them, and the command reads it too
    placed = drive(saved_vae_map_steps(tmp_path / "dock-map", root / "plates", root / "translated"))
    np.testing.assert_allclose(placed.coords, viewer.layers["Phenotype map"].data - [0, 32 + map_widget.MAP_GAP],
                               atol=1e-3)
    np.testing.assert_allclose(placed.arrows, widget.result.arrows, atol=1e-3)
    assert main(["embed", "map", "--data", str(root / "plates"), "--vae-from", str(tmp_path / "dock-map"),
                 "--out", str(tmp_path / "placed")]) == 0
    # a second save asks first; No leaves the saved map as it was
    before = (tmp_path / "dock-map" / "vae.safetensors").read_bytes()
    asked = []
    monkeypatch.setattr(map_widget, "ask_replace", lambda parent, text: asked.append(text) or False)
    widget.result.traversal.model.to_latent.bias.data += 1.0  # as if another map had been trained
    widget.save()
    assert "already holds a VAE map" in asked[0] and (tmp_path / "dock-map" / "vae.safetensors").read_bytes() == before
    monkeypatch.setattr(map_widget, "ask_replace", lambda parent, text: True)
    widget.save()
    assert (tmp_path / "dock-map" / "vae.safetensors").read_bytes() != before
    # a vae.json phenotwin did not write there, or the command's map folder, is never replaced
    shown = []
    monkeypatch.setattr(map_widget, "show_error", shown.append)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "vae.json").write_text("{}")
    widget.save_folder.value = str(tmp_path / "theirs")
    widget.save()
    assert "did not write there" in shown[-1] and (tmp_path / "theirs" / "vae.json").read_text() == "{}"
    widget.save_folder.value = str(tmp_path / "placed")
    widget.save()
    assert "holds a map made by `phenotwin embed map`" in shown[-1]


@pytest.fixture(scope="module")
def saved_map(material, tmp_path_factory):
    """A VAE map of the plates, made and saved by `phenotwin embed map --vae`."""
    from phenotwin.cli import main

    root, _, _ = material
    out = tmp_path_factory.mktemp("saved") / "map"
    assert main(["embed", "map", "--data", str(root / "plates"), "--vae", "--vae-steps", "20", "--vae-size", "16",
                 "--out", str(out)]) == 0
    return out


def test_cells_placed_on_a_saved_vae_map_land_where_the_command_put_them(material, saved_map):
    import csv

    from phenotwin.embed.phenomap import saved_vae_map_steps

    root, _, _ = material
    result = drive(saved_vae_map_steps(saved_map, root / "plates", root / "translated"))
    with open(saved_map / "map.csv", newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    for k, file in enumerate(result.files):
        row = rows[file.relative_to(root / "plates").as_posix()]
        np.testing.assert_allclose(result.coords[k], [float(row["x"]) * MAP_SPAN, float(row["y"]) * MAP_SPAN],
                                   atol=1e-3)
    treated = next(i for i, f in enumerate(result.files) if f.parent.name == "nocodazole")
    for k in range(len(result.arrows)):  # a translation lands where the cell it copies lies
        np.testing.assert_allclose(result.arrows[k, 0] + result.arrows[k, 1], result.coords[treated], atol=1e-3)
    assert result.traversal is not None and result.traversal(0).shape == (2, 7, 2, 16, 16)
    with pytest.raises(PhenotwinError, match="holds no saved VAE map"):
        drive(saved_vae_map_steps(root / "plates", root / "plates"))


def test_one_condition_placed_on_a_saved_map_is_compared_with_the_maps_own_conditions(material, saved_map, tmp_path,
                                                                                      capsys):
    import json
    import shutil

    from phenotwin.cli import main

    root, _, _ = material
    shutil.copytree(root / "plates" / "nocodazole", tmp_path / "new-plate" / "nocodazole")  # one condition
    assert main(["embed", "map", "--data", str(tmp_path / "new-plate"), "--vae-from", str(saved_map),
                 "--out", str(tmp_path / "placed")]) == 0
    record = json.loads((tmp_path / "placed" / "map.json").read_text())
    nearest = record["metrics"]["nearest_map_condition"]["nocodazole"]
    # the map's own nocodazole cells: their mean is that landmark, the other condition's lies further
    assert nearest["nearest"] == "nocodazole" and nearest["distances"]["nocodazole"] < 1e-4
    assert nearest["distances"]["control"] > 0.01
    assert "knn_condition_accuracy" not in record["metrics"]  # one condition: nothing to tell apart
    report = (tmp_path / "placed" / "report.md").read_text()
    assert "| nocodazole | " in report and "Where these conditions land" in report
    assert record["source"]["warning"] is None or "px across" not in record["source"]["warning"]
    # the same cells imaged at twice the pixel size: placed, with a warning that names the sizes
    (tmp_path / "zoomed" / "nocodazole").mkdir(parents=True)
    for file in sorted((root / "plates" / "nocodazole").glob("*.tif")):
        image = tifffile.imread(file)
        tifffile.imwrite(tmp_path / "zoomed" / "nocodazole" / file.name, image.repeat(2, -1).repeat(2, -2))
    assert main(["embed", "map", "--data", str(tmp_path / "zoomed"), "--vae-from", str(saved_map),
                 "--out", str(tmp_path / "placed-zoomed")]) == 0
    warning = json.loads((tmp_path / "placed-zoomed" / "map.json").read_text())["source"]["warning"]
    side = tifffile.imread(file).shape[-1]
    assert f"these images are {2 * side} px across and the map's were {side} px" in warning
    assert "50% smaller" in warning
    # a map of its own still needs two conditions, and the refusal says how to place them instead
    assert main(["embed", "map", "--data", str(tmp_path / "new-plate"), "--vae", "--vae-steps", "20",
                 "--out", str(tmp_path / "own")]) == 2
    assert "has one condition" in capsys.readouterr().err and not (tmp_path / "own").exists()


@pytest.mark.gui
@gui
def test_the_map_dock_places_cells_on_a_saved_vae_map(make_napari_viewer, qtbot, material, saved_map):
    from phenotwin._napari.map_widget import SAVED, PhenotypeMapWidget
    from phenotwin.embed.phenomap import saved_vae_map_steps

    root, _, _ = material
    viewer = make_napari_viewer()
    widget = PhenotypeMapWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.features.value = SAVED
    assert widget.encoder.native.isHidden() and widget.vae_steps.native.isHidden()
    assert not widget.saved_map.native.isHidden()
    widget.data.value = str(root / "plates")
    widget.start()  # no map folder yet: refused, nothing started
    assert widget._worker is None and "Phenotype map" not in viewer.layers
    widget.saved_map.value = str(saved_map)
    widget.start()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    expected = drive(saved_vae_map_steps(saved_map, root / "plates")).coords
    points = viewer.layers["Phenotype map"].data
    np.testing.assert_allclose(points - points.min(0), expected - expected.min(0), atol=1e-4)
    marks = viewer.layers["Map conditions"]  # the map's own conditions, at their mean cell's place
    for k, condition in enumerate(marks.features["condition"]):
        mine = [i for i, c in enumerate(widget.result.conditions) if c == condition]
        np.testing.assert_allclose(marks.data[k] - points.min(0),
                                   expected[mine].mean(0) - expected.min(0), atol=1e-3)  # linear: mean of places
    assert "nocodazole lands nearest the map's nocodazole (distance 0.00" in widget.status.value
    viewer.layers["Phenotype map"].selected_data = {2}
    qtbot.waitUntil(lambda: "Latent traversal" in viewer.layers, timeout=30_000)
    assert viewer.layers["Latent traversal"].data.shape == (2 * 16, 7 * 16)


def test_a_vae_whose_latents_barely_vary_is_called_untrustworthy():
    from phenotwin.embed.affinity_vae import COLLAPSED_SPREAD, collapse_warning

    rng = np.random.default_rng(0)
    assert collapse_warning(rng.normal(0, 0.2, (50, 8))) is None
    message = collapse_warning(rng.normal(0, 0.02, (50, 8)))
    assert "hold next to nothing" in message and "0.02" in message and "VAE steps" in message
    assert collapse_warning(np.full((50, 8), 3.0)) is not None and COLLAPSED_SPREAD == 0.05
