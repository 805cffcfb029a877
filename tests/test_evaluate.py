"""`phenotwin evaluate memorization | translation` on tiny models and data: outputs and the direction of the numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from phenotwin.cli import main
from phenotwin.evaluate import memorization, metrics
from phenotwin.synthetic import make_pairs, write_folders
from phenotwin.testing import make_tiny_checkpoint

SIZE = 32
RAW = {"mode": "fixed", "low": [0.0, 0.0], "high": [65535.0, 65535.0]}  # synthetic files are full-range uint16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    model = make_tiny_checkpoint(root / "model", channels=2, size=SIZE, classes=("control", "nocodazole"), normalization=RAW)
    twin = make_tiny_checkpoint(root / "twin", channels=2, size=SIZE, classes=("control", "nocodazole"), normalization=RAW)
    write_folders(root / "train", make_pairs(4, size=SIZE, seed=0))
    write_folders(root / "held-out", make_pairs(4, size=SIZE, seed=0, start=100_000))
    return root, model, twin


# -- metric functions on constructed cases -------------------------------------------------


def test_the_true_counterfactual_scores_ratio_0_and_its_difference_auroc_1():
    pairs = make_pairs(3, size=SIZE, seed=0, start=100_000)
    control, treated = pairs.control.astype(np.float64), pairs.treated.astype(np.float64)
    assert metrics.counterfactual_ratio(treated, control, treated) == 0.0
    assert metrics.counterfactual_ratio(control, control, treated) == 1.0
    heatmaps = np.abs(treated - control).sum(axis=1)  # the heatmap a perfect translation would give
    assert metrics.auroc(heatmaps, pairs.change_mask) > 0.99
    assert metrics.auroc(-heatmaps, pairs.change_mask) < 0.01
    fpr, tpr = metrics.roc_curve(heatmaps, pairs.change_mask)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)


def test_cosine_is_one_for_identical_images_and_nearest_search_undoes_flips_and_rotations():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 2, 16, 16))
    assert np.allclose(metrics.paired_cosine(images, images), 1.0)
    assert np.all(metrics.paired_cosine(images, rng.normal(size=images.shape)) < 0.5)
    turned = np.stack([np.rot90(images[0], 1, axes=(1, 2)), images[3][..., ::-1]])
    best, index = metrics.nearest_similarity(turned, images)
    assert np.allclose(best, 1.0) and list(index) == [0, 3]
    best_new, _ = metrics.nearest_similarity(rng.normal(size=(2, 2, 16, 16)), images)
    assert np.all(best_new < 0.5)
    # a brighter copy is still the same image: channel means are removed, the cosine ignores scale
    assert metrics.paired_cosine(images[:1], 3 * images[:1] + 5)[0] == pytest.approx(1.0)


@pytest.mark.parametrize("a_vs_b, nearest, real, expected", [
    (0.95, 0.55, 0.6, "generalises"),  # A and B agree, generations no closer to training than new cells
    (0.95, 0.9, 0.6, "memorises"),     # closer to training images than new real cells come
    (0.4, 0.7, 0.7, "memorises"),      # A and B disagree while each matches its training half
    (0.95, 0.1, 0.6, "unclear"),       # generations look like no cell: undertrained
    (0.6, 0.58, 0.6, "unclear"),
])
def test_verdict_rule(a_vs_b, nearest, real, expected):
    assert memorization.verdict(a_vs_b, nearest, real)[0] == expected


# -- phenotwin evaluate memorization --------------------------------------------------------


def test_identical_models_agree_and_outputs_are_written(tiny, capsys):
    root, model, twin = tiny
    out = root / "mem-identical"
    code = main(["evaluate", "memorization", "--model-a", str(model), "--model-b", str(twin), "--train-data-a",
                 str(root / "train"), "--held-out", str(root / "held-out"), "-n", "3", "--sample-steps", "3",
                 "--out", str(out)])
    assert code == 0
    result = json.loads((out / "memorization.json").read_text())
    assert result["a_vs_b"]["median"] > 0.999  # same weights, same noise: the same images
    assert {"a_vs_b", "nearest_train", "held_out_to_train", "verdict", "reason", "rule"} <= result.keys()
    assert result["a_vs_b"]["fraction_above_0.95"] == 1.0
    assert len(result["nearest_train"]["values"]) == 6  # 3 per condition
    assert sum(result["a_vs_b"]["histogram"]["counts"]) == 6
    assert result["verdict"] in ("generalises", "memorises", "unclear")
    assert (out / "memorization.png").stat().st_size > 5000
    assert "verdict:" in capsys.readouterr().out


def test_generations_are_nearer_to_their_own_training_images_than_to_held_out_ones(tiny):
    """Make a 'training set' out of the model's own generations (some turned): a memorising model."""
    from phenotwin import Translator
    from phenotwin.progress import drive

    root, model, twin = tiny
    generated = Translator(model).sample("control", 3, seed=0, steps=3)
    folder = root / "memorised"
    for i, image in enumerate(generated):
        raw = np.round((image + 1) / 2 * 65535).astype(np.uint16)
        for condition in ("control", "nocodazole"):
            (folder / condition).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(folder / condition / f"g{i}.tif", np.rot90(raw, i, axes=(1, 2)))
    own = drive(memorization.memorization_steps(model, twin, folder, root / "held-out", count=3, steps=3))
    other = drive(memorization.memorization_steps(model, twin, root / "held-out", folder, count=3, steps=3))
    control_own = own["nearest_train"]["values"][:3]
    assert min(control_own) > 0.99  # found again despite the rotations
    assert own["nearest_train"]["median"] > other["nearest_train"]["median"] + 0.2
    assert own["verdict"] == "memorises"


def test_memorization_trains_two_models_from_a_data_folder(tiny):
    root, _, _ = tiny
    out = root / "mem-trained"
    code = main(["evaluate", "memorization", "--data", str(root / "train"), "--out", str(out), "--steps", "2",
                 "--width", "8", "--batch-size", "2", "-n", "2", "--sample-steps", "2"])
    assert code == 0
    for name in ("model-a", "model-b"):
        assert (out / name / "phenotwin.json").is_file()
    halves = [sorted(p.name for p in (out / h / "control").iterdir()) for h in ("half-a", "half-b")]
    assert halves[0] and halves[1] and not set(halves[0]) & set(halves[1])
    result = json.loads((out / "memorization.json").read_text())
    assert result["held_out_data"].endswith("half-b")
    # evaluating translations on the images a model was trained on is flagged
    assert main(["evaluate", "translation", "--checkpoint", str(out / "model-a"), "--data", str(out / "half-a"),
                 "--out", str(out / "tr"), "-n", "1", "--steps", "2", "--source", "control"]) == 0
    assert json.loads((out / "tr" / "translation.json").read_text())["data_is_training_data"] is True
    assert "WARNING: these are the model's training images" in (out / "tr" / "report.md").read_text()


def test_memorization_without_models_or_data_is_a_clear_error(tiny, capsys):
    root, model, _ = tiny
    assert main(["evaluate", "memorization", "--model-a", str(model), "--out", str(root / "x")]) == 2
    assert "--model-b" in capsys.readouterr().err


# -- phenotwin evaluate translation ---------------------------------------------------------


def test_translation_report_on_synthetic_pairs(tiny, capsys):
    root, model, _ = tiny
    out = root / "tr"
    code = main(["evaluate", "translation", "--checkpoint", str(model), "--data", str(root / "held-out"),
                 "--out", str(out), "-n", "2", "--steps", "3", "--strength", "0.5", "1.0"])
    assert code == 0
    for name in ("report.md", "translation.json", "translation-metrics.png", "translation-examples.png"):
        assert (out / name).stat().st_size > 0
    result = json.loads((out / "translation.json").read_text())
    assert result["synthetic_ground_truth"] is True
    assert 0 <= result["classifier"]["held_out_accuracy"] <= 1
    rows = result["results"]
    assert {(r["source"], r["target"], r["strength"]) for r in rows} == {
        (s, t, v) for s, t in (("control", "nocodazole"), ("nocodazole", "control")) for v in (0.5, 1.0)}
    for row in rows:
        assert 0 <= row["flip_rate"] <= 1 and 0 <= row["heatmap_auroc"] <= 1
        assert row["reconstruction_ssim"] <= 1 and row["counterfactual_ratio"] >= 0
        assert len(row["per_image"]["reconstruction_psnr"]) == 2
    assert result["fid_kid"]["available"] is False
    report = (out / "report.md").read_text()
    assert "flip rate" in report and "heatmap AUROC" in report and "FID/KID skipped" in report
    assert "FID/KID skipped" in capsys.readouterr().err


def test_synthetic_ground_truth_is_found_from_file_names(tiny):
    from phenotwin.evaluate.translation import load_eval_folder

    root, _, _ = tiny
    data = load_eval_folder(root / "held-out", SIZE, 2, n=3)
    assert data.aligned and np.array_equal(data.masks, make_pairs(3, size=SIZE, seed=0, start=100_000).change_mask)
    renamed = root / "renamed"
    for condition in ("control", "nocodazole"):
        (renamed / condition).mkdir(parents=True)
        for i, file in enumerate(sorted((root / "held-out" / condition).iterdir())):
            (renamed / condition / f"cell{i}.tif").write_bytes(file.read_bytes())
    assert not load_eval_folder(renamed, SIZE, 2).aligned


def test_fid_without_inception_weights_says_how_to_provide_them():
    weights, message = metrics.find_inception_weights()
    assert weights is None  # no weights on test machines, and nothing is downloaded
    assert message.startswith("FID/KID skipped") and ("--inception-weights" in message or "[evaluate]" in message)


def test_translation_refuses_data_with_other_channels(tiny, capsys):
    root, model, _ = tiny
    write_folders(root / "one-channel", make_pairs(2, size=SIZE, channels=1, seed=0))
    code = main(["evaluate", "translation", "--checkpoint", str(model), "--data", str(root / "one-channel"),
                 "--out", str(root / "bad"), "-n", "1", "--steps", "2"])
    assert code == 2
    assert "1-channel images but the model takes 2" in capsys.readouterr().err
