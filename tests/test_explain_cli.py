"""`phenotwin explain` end to end on TIFF files written here (explain/pipeline.py, report.py, commands.py)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile

from phenotwin import synthetic
from phenotwin.cli import main
from phenotwin.io import write_json, write_tiff

N = 14  # images per condition: ~20 cells each, enough for the held-out split of the models


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """data/<condition>/*.tif, labels/<condition>/*.tif and trans/: what `phenotwin translate` writes (an image and
    a JSON record per input), holding the true counterfactual of each control image (a perfect translation)."""
    root = tmp_path_factory.mktemp("explain")
    pairs = synthetic.make_pairs(N, phenotype="obvious", seed=0)
    written = synthetic.write_folders(root / "data", pairs)
    for condition, files in written.items():
        (root / "labels" / condition).mkdir(parents=True)
        for path, labels in zip(files, pairs.cell_labels):
            tifffile.imwrite(root / "labels" / condition / path.name, labels.astype(np.uint16))
    for path, treated in zip(written["control"], synthetic.as_camera_units(pairs.treated)):
        name = f"{path.stem}_tif_nocodazole"
        write_tiff(root / "trans" / f"{name}.ome.tif", treated, "CYX", {"condition": "nocodazole"})
        write_json(root / "trans" / f"{name}.json", {"format": 1, "input": str(path), "target": "nocodazole",
                                                    "status": "done", "translated": f"{name}.ome.tif"})
    return root, pairs


def rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_explain_writes_the_ranked_change_its_intervals_and_the_models(folders, capsys):
    root, pairs = folders
    out = root / "out"
    code = main(["explain", "--data", str(root / "data"), "--labels", str(root / "labels"), "--translated",
                 str(root / "trans"), "--out", str(out), "--channel-names", "nucleus", "golgi", "--no-formula",
                 "--vae-steps", "100"])  # the image models at their defaults, but a short β-VAE
    assert code == 0
    cells = int((pairs.cell_labels.reshape(N, -1).max(axis=1)).sum())
    table = rows(out / "features.csv")
    assert len(table) == 3 * cells  # control, nocodazole, translated: every labelled cell once
    effects = rows(out / "effects.csv")
    paired = [r for r in effects if r["comparison"].startswith("nocodazole (translated)")]
    between = [r for r in effects if r["comparison"].endswith("real cells")]
    assert paired[0]["feature"] == "golgi_fragments"  # the planted change ranks first
    assert "golgi_fragments" in [r["feature"] for r in between[:2]]  # (the real cells' s.d. is pooled: near it)
    by_feature = {r["feature"]: r for r in paired}
    assert float(by_feature["golgi_fragments"]["difference_low"]) > 2
    assert float(by_feature["golgi_distance"]["difference_low"]) > 0  # dispersal: further from the nucleus
    assert float(by_feature["cell_area"]["difference"]) == 0  # the same cells
    assert float(by_feature["nucleus_mean"]["difference"]) == 0  # the nuclei are not touched by the phenotype
    record = json.loads((out / "explain.json").read_text())
    assert record["cells"] == {"control": cells, "nocodazole": cells} and record["translations"] == N
    assert record["agreement"]["spearman"] > 0.9 and record["agreement"]["sign_agreement"] == 1.0
    top = record["paired"][0]
    report = (out / "report.md").read_text()
    assert f"golgi fragments per cell: {top['difference']:+.3g} [{top['difference_ci'][0]:.3g}," in report
    forest, cnn, sparse, vae = rows(out / "models.csv")
    assert forest["name"].startswith("black box (random forest") and cnn["name"].startswith("black box (CNN")
    assert float(sparse["relative_to_black_box"]) >= 0.9 and int(sparse["n_features"]) <= 5
    assert 0.5 < float(cnn["accuracy"]) <= 1 and float(cnn["relative_to_cnn"]) == 1.0
    for model in (forest, sparse, vae):  # every model against both black boxes, on the same held-out cells
        assert float(model["relative_to_cnn"]) == pytest.approx(float(model["accuracy"]) / float(cnn["accuracy"]))
        assert float(model["relative_to_black_box"]) == pytest.approx(float(model["accuracy"]) / float(forest["accuracy"]))
    assert vae["name"].startswith("sparse logistic regression on β-VAE factors") and 1 <= int(vae["n_features"]) <= 5
    assert record["vae"]["steps"] == 100 and len(record["vae"]["kl_per_factor"]) == 8
    assert "## β-VAE of the cell crops" in report and "of the CNN" in report
    assert (out / "vae.png").stat().st_size > 20_000
    assert (out / "forest.png").stat().st_size > 10_000 and not (out / "labels").exists()
    assert "golgi fragments per cell" in capsys.readouterr().out


def test_explain_segments_when_no_labels_are_given_and_keeps_them_for_checking(folders):
    root, pairs = folders
    out = root / "segmented"
    assert main(["explain", "--data", str(root / "data"), "--out", str(out), "-n", "12", "--no-formula", "--no-vae",
                 "--no-cnn", "--channel-names", "nucleus", "golgi"]) == 0
    labels = tifffile.imread(out / "labels" / "control" / "obvious_0_00000.tif")
    truth = pairs.cell_labels[0]
    assert labels.shape == truth.shape and labels.max() == truth.max()
    assert ((labels > 0) & (truth > 0)).sum() / ((labels > 0) | (truth > 0)).sum() > 0.6
    assert "segmented here" in (out / "report.md").read_text()
    between = [r for r in rows(out / "effects.csv") if r["comparison"].endswith("real cells")]
    assert between[0]["feature"] == "golgi_fragments"


def test_output_folder_rules(folders, capsys):
    root, _ = folders
    args = ["explain", "--data", str(root / "data"), "--labels", str(root / "labels"), "-n", "12", "--no-formula",
            "--no-vae", "--no-cnn"]
    out = root / "rules"
    assert main([*args, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    manifest = json.loads((out / ".phenotwin-manifest.json").read_text())
    assert "report.md" in manifest["entries"] and "notes.txt" not in manifest["entries"]
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "report.md").write_text("the user's own report")
    assert main([*args, "--out", str(foreign), "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (foreign / "report.md").read_text() == "the user's own report"


def test_bad_inputs_say_what_to_do(folders, tmp_path, capsys):
    root, pairs = folders
    data = root / "data"
    one = tmp_path / "one"
    (one / "control").mkdir(parents=True)
    tifffile.imwrite(one / "control" / "a.tif", synthetic.as_camera_units(pairs.control[0]))
    assert main(["explain", "--data", str(one), "--out", str(tmp_path / "o1")]) == 2
    assert "one condition only" in capsys.readouterr().err
    wrong = tmp_path / "wrong-labels"
    for condition in ("control", "nocodazole"):
        (wrong / condition).mkdir(parents=True)
        for path in sorted((data / condition).glob("*.tif")):
            tifffile.imwrite(wrong / condition / path.name, np.ones((32, 32), np.uint16))
    assert main(["explain", "--data", str(data), "--labels", str(wrong), "--out", str(tmp_path / "o2")]) == 2
    assert "same height and width" in capsys.readouterr().err
    assert main(["explain", "--data", str(data), "--labels", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "o3")]) == 2
    assert "no labels for" in capsys.readouterr().err
    empty = tmp_path / "empty-labels"
    for condition in ("control", "nocodazole"):
        (empty / condition).mkdir(parents=True)
        for path in sorted((data / condition).glob("*.tif")):
            tifffile.imwrite(empty / condition / path.name, np.zeros((64, 64), np.uint16))
    assert main(["explain", "--data", str(data), "--labels", str(empty), "--out", str(tmp_path / "o4")]) == 2
    assert "no cells were found" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o4").exists()
