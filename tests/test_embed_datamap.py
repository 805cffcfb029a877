"""`phenotwin embed map`: a user's folder on the phenotype map, its files and numbers, its refusals."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from phenotwin.cli import main
from phenotwin.embed.data import load_batched
from phenotwin.embed.metrics import feature_report
from phenotwin.embed.model import load_encoder
from phenotwin.embed.phenomap import MAP_SPAN, Projection, map_steps
from phenotwin.progress import drive
from phenotwin.synthetic.batches import BATCHES_FILE, make_plates, write_plates
from phenotwin.testing import make_tiny_plates_and_encoder


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return make_tiny_plates_and_encoder(tmp_path_factory.mktemp("datamap"))


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _map(*args):
    return main(["embed", "map", *map(str, args)])


def test_embed_map_writes_a_row_per_image_the_map_and_the_silhouettes(material, tmp_path, capsys):
    plates, encoder = material
    out = tmp_path / "map"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _map("--data", plates, "--encoder", encoder, "--out", out) == 0
    assert "silhouette by batch" in capsys.readouterr().out
    rows = _rows(out / "map.csv")
    images = sorted(p.relative_to(plates).as_posix() for p in plates.glob("*/*.tif"))
    assert sorted(r["file"] for r in rows) == images and len(images) == 16
    batch_of = {r["file"]: r["batch"] for r in _rows(plates / BATCHES_FILE)}
    for row in rows:
        assert row["condition"] == row["file"].split("/")[0] and row["batch"] == batch_of[row["file"]]
    # the CSV holds the encoder's features of each image and their map position by the dock's projection
    data = load_batched(plates, 8, normalization=load_encoder(encoder).info["normalization"])
    features = load_encoder(encoder).features(data.stacked(), raw=False)
    order = [rows.index(next(r for r in rows if r["file"] == f.relative_to(plates).as_posix()))
             for f in data.images.files]
    written = np.array([[float(rows[i][k]) for k in rows[i] if k.startswith("feature_")] for i in order])
    assert written.shape == (16, 32) and np.allclose(written, features, rtol=1e-4, atol=1e-6)
    xy = np.array([[float(rows[i]["x"]), float(rows[i]["y"])] for i in order])
    assert np.allclose(xy, Projection.fit(features, span=1.0)(features), atol=1e-5)
    assert xy.min() == pytest.approx(0, abs=1e-6) and xy.max() == pytest.approx(1, abs=1e-6)
    record = json.loads((out / "map.json").read_text())
    expected = feature_report(features, data.labels, data.batches)
    for key in ("silhouette_condition", "silhouette_batch", "knn_condition_accuracy", "knn_batch_accuracy"):
        assert record["metrics"][key] == pytest.approx(expected[key], abs=1e-6)
    assert record["metrics"]["batch_chance"] == 0.5 and record["batches"] == {"plate00": 8, "plate01": 8}
    assert (out / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "map.png").stat().st_size > 5000
    report = (out / "report.md").read_text()
    assert f"{expected['silhouette_batch']:.3f}" in report and "kNN batch accuracy" in report
    # a second run needs --overwrite; the user's file stays either way
    assert _map("--data", plates, "--encoder", encoder, "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _map("--data", plates, "--encoder", encoder, "--out", out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"


def test_a_foreign_file_of_the_same_name_is_kept_even_with_overwrite(material, tmp_path, capsys):
    plates, encoder = material
    out = tmp_path / "map"
    out.mkdir()
    (out / "report.md").write_text("my own report")
    assert _map("--data", plates, "--encoder", encoder, "--out", out, "--overwrite") == 2
    assert "report.md, which phenotwin did not write" in capsys.readouterr().err
    assert (out / "report.md").read_text() == "my own report" and not (out / "map.csv").exists()


def test_the_dock_and_the_command_draw_the_same_map(material, tmp_path):
    plates, encoder = material
    assert _map("--data", plates, "--encoder", encoder, "--out", tmp_path / "map") == 0
    dock = drive(map_steps(encoder, plates))
    cli = {r["file"]: (float(r["x"]), float(r["y"])) for r in _rows(tmp_path / "map/map.csv")}
    xy = np.array([cli[f.relative_to(plates).as_posix()] for f in dock.files])
    assert np.allclose(dock.coords / MAP_SPAN, xy, atol=1e-4)


def _copy(plates, tmp_path, name="data"):
    copy = tmp_path / name
    shutil.copytree(plates, copy)
    return copy


def test_metadata_naming_unknown_images_is_refused(material, tmp_path, capsys):
    plates, encoder = material
    data = _copy(plates, tmp_path)
    with open(data / BATCHES_FILE, "a") as handle:
        handle.write("control/gone.tif,control,plate00" + "," * 7 + "\n")
    assert _map("--data", data, "--encoder", encoder, "--out", tmp_path / "map") == 2
    err = capsys.readouterr().err
    assert "names 1 image(s) that are not in" in err and "'control/gone.tif'" in err and "remove those rows" in err
    assert not (tmp_path / "map/map.csv").exists()


def test_a_single_condition_is_refused(material, tmp_path, capsys):
    plates, encoder = material
    data = _copy(plates, tmp_path)
    shutil.rmtree(data / "nocodazole")
    (data / BATCHES_FILE).unlink()
    assert _map("--data", data, "--encoder", encoder, "--out", tmp_path / "map") == 2
    err = capsys.readouterr().err
    assert "has one condition ('control')" in err and "Add a subfolder" in err


@pytest.mark.parametrize("size, channels, words", [(40, 2, "trained on 32x32 images"),
                                                   (32, 1, "trained on 2-channel images")])
def test_an_encoder_trained_at_another_size_or_channel_count_is_refused(material, tmp_path, capsys, size, channels,
                                                                         words):
    _, encoder = material
    other = tmp_path / "other"
    write_plates(other, make_plates(2, 2, size=size, channels=channels, seed=5))
    assert _map("--data", other, "--encoder", encoder, "--out", tmp_path / "map") == 2
    err = capsys.readouterr().err
    assert words in err and "train an encoder on these images" in err
    assert not (tmp_path / "map").exists()  # refused before anything was written


def test_the_affinity_vae_map_of_a_folder_without_batches(material, tmp_path, capsys):
    plates, _ = material
    data = _copy(plates, tmp_path)
    (data / BATCHES_FILE).unlink()
    (tmp_path / "affinity.csv").write_text(",control,nocodazole\ncontrol,1,0.2\nnocodazole,0.2,1\n")
    assert _map("--data", data, "--vae", "--vae-steps", 3, "--vae-size", 16, "--affinity", tmp_path / "affinity.csv",
                "--out", tmp_path / "map") == 0
    rows = _rows(tmp_path / "map/map.csv")
    assert len(rows) == 16 and {r["batch"] for r in rows} == {""}
    assert sum(k.startswith("feature_") for k in rows[0]) == 8 and "pose_degrees" in rows[0]
    record = json.loads((tmp_path / "map/map.json").read_text())
    assert record["source"]["kind"] == "affinity-vae" and record["source"]["affinity"] == [[1, 0.2], [0.2, 1]]
    assert "silhouette_condition" in record["metrics"] and "silhouette_batch" not in record["metrics"]
    assert "batch effects are not measured" in (tmp_path / "map/report.md").read_text()
    (tmp_path / "bad.csv").write_text(",control,nocodazole\ncontrol,1,0.2\nnocodazole,0.5,1\n")
    assert _map("--data", data, "--vae", "--vae-steps", 3, "--vae-size", 16, "--affinity", tmp_path / "bad.csv",
                "--out", tmp_path / "map2") == 2
    assert "not symmetric" in capsys.readouterr().err


def test_a_vae_map_is_saved_and_other_data_are_placed_on_its_axes(material, tmp_path, capsys):
    import tifffile

    plates, _ = material
    assert _map("--data", plates, "--vae", "--vae-steps", 30, "--vae-size", 16, "--out", tmp_path / "map") == 0
    first = _rows(tmp_path / "map/map.csv")
    saved = json.loads((tmp_path / "map/vae.json").read_text())
    assert saved["size"] == 16 and saved["classes"] == ["control", "nocodazole"]
    assert "--vae-from" in (tmp_path / "map/report.md").read_text()

    # The same images placed on the saved map land where they were: the same VAE, range and axes.
    assert _map("--data", plates, "--vae-from", tmp_path / "map", "--out", tmp_path / "placed") == 0
    placed = {r["file"]: r for r in _rows(tmp_path / "placed/map.csv")}
    for row in first:
        again = placed[row["file"]]
        assert [float(again[k]) for k in ("x", "y")] == pytest.approx([float(row[k]) for k in ("x", "y")], abs=1e-5)
    record = json.loads((tmp_path / "placed/map.json").read_text())
    made = json.loads((tmp_path / "map/map.json").read_text())
    assert record["source"]["vae_from"] == str(tmp_path / "map")
    assert record["source"]["warning"] == made["source"]["warning"]  # no range warning: the same images
    shares = record["projection"]["explained_variance"]  # of the placed images' variance: the same images, the same
    assert shares == pytest.approx(made["projection"]["explained_variance"], rel=1e-4)
    assert "on that map's axes" in (tmp_path / "placed/report.md").read_text()

    # Brighter images than the map was made from are placed, and said to be out of its range.
    bright = _copy(plates, tmp_path, "bright")
    for path in bright.glob("*/*.tif"):
        tifffile.imwrite(path, np.clip(tifffile.imread(path).astype(np.float64) * 4, 0, 65535).astype(np.uint16))
    assert _map("--data", bright, "--vae-from", tmp_path / "placed", "--out", tmp_path / "bright-map") == 0
    assert "outside the range the map was made with" in capsys.readouterr().err
    moved = {r["file"]: [float(r["x"]), float(r["y"])] for r in _rows(tmp_path / "bright-map/map.csv")}
    bright_shares = json.loads((tmp_path / "bright-map/map.json").read_text())["projection"]["explained_variance"]
    assert bright_shares != pytest.approx(shares, rel=1e-3) and 0 <= sum(bright_shares) <= 1 + 1e-9
    assert max(abs(np.subtract(moved[r["file"]], [float(r["x"]), float(r["y"])])).max() for r in first) > 1e-3

    # Refusals: a folder without a saved VAE, and the map itself as --out.
    assert _map("--data", plates, "--vae-from", plates, "--out", tmp_path / "nothing") == 2
    assert "holds no saved VAE map" in capsys.readouterr().err and not (tmp_path / "nothing").exists()
    assert _map("--data", plates, "--vae-from", tmp_path / "map", "--out", tmp_path / "map") == 2
    assert "would replace the one it is placed on" in capsys.readouterr().err
    assert (tmp_path / "map/vae.safetensors").is_file()
    assert _map("--data", plates, "--vae-from", tmp_path / "map", "--vae-size", 24, "--out", tmp_path / "x") == 2
    assert "--vae-size shape a VAE trained by --vae" in capsys.readouterr().err
    assert _map("--data", plates, "--vae-from", tmp_path / "map", "--affinity", "a.csv", "--out", tmp_path / "x") == 2
    assert "trained already" in capsys.readouterr().err and not (tmp_path / "x").exists()
    (tmp_path / "placed/vae.json").write_text("[1, 2]")  # not a description: refused in words, not a traceback
    assert _map("--data", plates, "--vae-from", tmp_path / "placed", "--out", tmp_path / "x") == 2
    assert "is not a phenotwin VAE map description" in capsys.readouterr().err

    # An encoder's map replacing a VAE map takes the VAE away with it: it no longer matches map.png.
    _, encoder = material
    assert _map("--data", plates, "--encoder", encoder, "--out", tmp_path / "map", "--overwrite") == 0
    assert not (tmp_path / "map/vae.json").exists() and not (tmp_path / "map/vae.safetensors").exists()


def test_an_output_folder_inside_the_data_is_refused(material, tmp_path, capsys):
    plates, encoder = material
    data = _copy(plates, tmp_path)
    assert _map("--data", data, "--encoder", encoder, "--out", data / "map") == 2
    assert "inside --data" in capsys.readouterr().err and not (data / "map").exists()


def test_the_numbers_of_a_handful_of_images():
    # 3 + 3 images: kNN asks for no more neighbours than a fold trains on
    features = np.array([[1, 0.1], [1, 0.2], [1, 0.0], [0.1, 1], [0.2, 1], [0.0, 1]])
    report = feature_report(features, np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 0, 1, 0, 1]))
    assert report["knn_condition_accuracy"] == 1.0 and report["silhouette_condition"] > 0.8
    assert report["knn_batch_accuracy"] <= 0.5 and report["silhouette_batch"] < 0.1
