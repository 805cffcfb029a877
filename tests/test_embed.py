"""The batch-robust encoder: its pairs, its loss, a tiny resumable training run, its files and its FID/KID."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from phenotwin.cli import main
from phenotwin.embed.data import consistency_partners, load_batched, training_views
from phenotwin.embed.losses import contrastive_loss, pair_masks
from phenotwin.embed.metrics import feature_fid_kid, feature_report, frechet_distance, kernel_distance
from phenotwin.embed.model import ENCODER_INFO, ENCODER_WEIGHTS, load_encoder
from phenotwin.embed.trainer import EmbedConfig, train_steps
from phenotwin.errors import PhenotwinError
from phenotwin.progress import drive
from phenotwin.synthetic.batches import BATCHES_FILE, make_plates, write_plates

TINY = {"steps": 4, "batch_size": 8, "size": 16, "width": 8, "save_every": 2}


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("plates")
    write_plates(root, make_plates(4, 3, size=32, seed=2))
    return root


def test_consistency_partners_are_the_same_condition_in_another_batch(plates):
    data = load_batched(plates, 16)
    assert data.batch_names == ["plate00", "plate01", "plate02"] and data.classes == ["control", "nocodazole"]
    rng = np.random.default_rng(0)
    anchors = rng.integers(0, len(data.labels), 200)
    partners = consistency_partners(data.labels, data.batches, anchors, rng)
    assert np.array_equal(data.labels[partners], data.labels[anchors])
    assert (data.batches[partners] != data.batches[anchors]).all()
    # every other batch is drawn, not always the same one
    assert len({(int(data.batches[a]), int(data.batches[p])) for a, p in zip(anchors, partners)}) == 6
    views, sources = training_views(data, "cdcl", 8, 16, rng)
    assert views.shape == (16, 2, 16, 16) and np.array_equal(sources[:8], sources[8:])
    half = sources[:4], sources[4:8]
    assert (data.batches[half[0]] != data.batches[half[1]]).all()
    assert (data.labels[half[0]] == data.labels[half[1]]).all()


def test_pair_masks():
    sources = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    labels = np.array([0, 0, 1, 0])  # per image
    batches = np.array([0, 1, 0, 0])
    positive, ignored = pair_masks(sources, labels, batches, "simclr")
    assert positive.sum() == 8 and positive[0, 4] and not positive[0, 1]
    assert np.array_equal(ignored, np.eye(8, dtype=bool))
    positive, ignored = pair_masks(sources, labels, batches, "cdcl")
    assert positive[0, 4] and positive[0, 1] and positive[0, 5]  # same image; same condition, other batch
    assert not positive[0, 3] and ignored[0, 3] and ignored[0, 7]  # same condition, same batch: left out
    assert not positive[0, 2] and not ignored[0, 2]  # other condition: a negative
    assert not (positive & ignored).any()


def test_loss_is_lower_when_positives_agree():
    import torch

    sources = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    positive, ignored = (torch.from_numpy(m) for m in pair_masks(sources, np.zeros(4, int), np.arange(4), "simclr"))
    basis = torch.eye(4, 16)
    aligned = contrastive_loss(torch.cat([basis, basis]), positive, ignored)
    crossed = contrastive_loss(torch.cat([basis, basis.roll(1, 0)]), positive, ignored)
    assert float(aligned) < float(crossed) - 1.0


def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / ENCODER_WEIGHTS))


def test_training_resumes_after_a_kill_to_the_same_weights(plates, tmp_path):
    whole = drive(train_steps(EmbedConfig(data=str(plates), out=str(tmp_path / "whole"), **TINY)))
    killed = train_steps(EmbedConfig(data=str(plates), out=str(tmp_path / "killed"), **TINY))
    for _ in range(3):  # steps 1-3: the state saved at step 2, step 3 lost
        next(killed)
    killed.close()
    progress = json.loads((tmp_path / "killed/training/state/progress.json").read_text())
    assert progress["step"] == 2
    assert (tmp_path / "killed/training/state/scheduler.bin").is_file()  # the warm-up's step is resumed too
    with pytest.raises(PhenotwinError, match="not empty.*--resume"):
        drive(train_steps(EmbedConfig(data=str(plates), out=str(tmp_path / "killed"), **TINY)))
    with pytest.raises(PhenotwinError, match="other settings.*width"):
        drive(train_steps(EmbedConfig(data=str(plates), out=str(tmp_path / "killed"), resume=True,
                                      **{**TINY, "width": 16})))
    drive(train_steps(EmbedConfig(data=str(plates), out=str(tmp_path / "killed"), resume=True, **TINY)))
    a, b = _weights(whole), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    info = json.loads((whole / ENCODER_INFO).read_text())
    assert info["steps"] == 4 and info["batches"] == ["plate00", "plate01", "plate02"]
    metrics = info["metrics"]
    assert metrics["images"] == 24 and metrics["batch_chance"] == pytest.approx(1 / 3)
    assert 0 <= metrics["knn_batch_accuracy"] <= 1 and -1 <= metrics["silhouette_condition"] <= 1
    log = (tmp_path / "killed/training/log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["1", "2", "3", "4"]


def test_a_run_saved_before_the_warm_up_setting_resumes_without_warm_up(plates, tmp_path):
    old = {**TINY, "warmup_steps": 0}
    whole = drive(train_steps(EmbedConfig(data=str(plates), out=str(tmp_path / "whole"), **old)))
    killed = train_steps(EmbedConfig(data=str(plates), out=str(tmp_path / "killed"), **old))
    for _ in range(3):
        next(killed)
    killed.close()
    path = tmp_path / "killed/training/state/progress.json"
    progress = json.loads(path.read_text())
    del progress["config"]["warmup_steps"]  # as saved before the setting existed
    path.write_text(json.dumps(progress))
    with pytest.raises(PhenotwinError, match="other settings.*warmup_steps: saved 0, now 50"):
        drive(train_steps(EmbedConfig(data=str(plates), out=str(tmp_path / "killed"), resume=True, **TINY)))
    drive(train_steps(EmbedConfig(data=str(plates), out=str(tmp_path / "killed"), resume=True, **old)))
    a, b = _weights(whole), _weights(tmp_path / "killed")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_cli_train_and_evaluate(plates, tmp_path, capsys):
    out = tmp_path / "enc"
    args = ["embed", "train", "--data", str(plates), "--out", str(out), "--method", "simclr"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "kNN batch accuracy" in printed and "(chance 0.333)" in printed
    assert main(["embed", "evaluate", "--encoder", str(out), "--data", str(plates), "--json",
                 str(tmp_path / "m.json")]) == 0
    saved = json.loads((tmp_path / "m.json").read_text())
    stored = json.loads((out / ENCODER_INFO).read_text())["metrics"]
    # the same images, the same features: evaluate reproduces what training measured
    assert saved["knn_condition_accuracy"] == pytest.approx(stored["knn_condition_accuracy"])
    assert saved["silhouette_batch"] == pytest.approx(stored["silhouette_batch"])


def test_cdcl_refuses_one_batch_and_a_condition_in_one_batch(plates, tmp_path):
    import shutil

    single = tmp_path / "single"
    shutil.copytree(plates, single)

    def rebatch(keep_batch):  # batches.csv with the batch column rewritten (file names carry the batch too)
        with open(plates / BATCHES_FILE, newline="") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            row["batch"] = row["batch"] if keep_batch(row) else "plate00"
        with open(single / BATCHES_FILE, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    rebatch(lambda row: False)
    with pytest.raises(PhenotwinError, match="has 1 batch"):
        drive(train_steps(EmbedConfig(data=str(single), out=str(tmp_path / "a"), **TINY)))
    rebatch(lambda row: row["condition"] != "control")
    with pytest.raises(PhenotwinError, match="condition 'control' has images from one batch only"):
        drive(train_steps(EmbedConfig(data=str(single), out=str(tmp_path / "b"), **TINY)))
    with pytest.raises(PhenotwinError, match="not an encoder folder"):
        load_encoder(tmp_path)


def test_frechet_and_kernel_distance_zero_for_identical_sets_and_grow_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    b = rng.standard_normal((300, 8))
    shifts = [feature_fid_kid(a, b + s) for s in (0.0, 0.5, 1.0, 2.0)]
    fids, kids = [r["fid"] for r in shifts], [r["kid"] for r in shifts]
    assert fids == sorted(fids) and kids == sorted(kids)
    # the unbiased KID of a set with itself is ~0 (slightly negative: its estimator leaves the diagonal out)
    assert abs(kernel_distance(a, a, subsets=5, subset_size=100)[0]) < 0.01 * kids[2]
    assert fids[0] < 0.5 and fids[-1] == pytest.approx(8 * 4.0, rel=0.15)  # ||mu||^2 = 8 dims x 2^2
    # a covariance change with equal means is seen too
    assert frechet_distance(a, 2 * b) > 10 * frechet_distance(a, b)


def test_encoder_fid_is_zero_for_identical_images_and_grows_with_a_planted_shift(plates, tmp_path):
    out = drive(train_steps(EmbedConfig(data=str(plates), out=str(tmp_path / "enc"), **TINY)))
    encoder = load_encoder(out)
    data = load_batched(plates, 16)
    raw = np.stack(data.images.images)
    real = encoder.features(raw)
    assert feature_fid_kid(real, real)["fid"] == pytest.approx(0.0, abs=1e-6)
    fids = [feature_fid_kid(encoder.features(raw * gain), real)["fid"] for gain in (1.0, 1.3, 1.8)]
    assert fids[0] == pytest.approx(0.0, abs=1e-6) and fids[0] < fids[1] < fids[2]


def test_feature_report_on_planted_structure():
    rng = np.random.default_rng(1)
    conditions = np.repeat([0, 1], 60)
    batches = np.tile([0, 1, 2], 40)
    features = rng.standard_normal((120, 6)) * 0.1
    features[:, 0] += np.where(conditions == 1, 1.0, -1.0)  # the condition separates, the batch does not
    report = feature_report(features, conditions, batches)
    assert report["knn_condition_accuracy"] > 0.95 and report["silhouette_condition"] > 0.5
    assert report["knn_batch_accuracy"] < 0.55 and abs(report["silhouette_batch"]) < 0.1
    assert report["batch_chance"] == pytest.approx(1 / 3)


def test_evaluate_translation_reports_fid_in_encoder_features(plates, tmp_path, capsys):
    """`phenotwin evaluate translation --features`: per target, overall, and both references, offline."""
    from phenotwin.synthetic import make_pairs, write_folders
    from phenotwin.testing import make_tiny_checkpoint

    raw = {"mode": "fixed", "low": [0.0, 0.0], "high": [65535.0, 65535.0]}
    model = make_tiny_checkpoint(tmp_path / "model", channels=2, size=32, classes=("control", "nocodazole"),
                                 normalization=raw)
    write_folders(tmp_path / "held-out", make_pairs(4, size=32, seed=0, start=100_000))
    encoder = drive(train_steps(EmbedConfig(data=str(plates), out=str(tmp_path / "enc"), **TINY)))
    assert main(["evaluate", "translation", "--checkpoint", str(model), "--data", str(tmp_path / "held-out"),
                 "--out", str(tmp_path / "eval"), "-n", "3", "--steps", "2", "--features", str(encoder)]) == 0
    record = json.loads((tmp_path / "eval/translation.json").read_text())["fid_kid"]["encoder"]
    (strength, values), = record["by_strength"].items()
    assert set(values["by_target"]) == {"control", "nocodazole"}
    assert values["by_target"]["control"]["generated"] == 3 and values["by_target"]["control"]["real"] == 4
    assert values["overall"]["generated"] == 6 and values["overall"]["fid"] >= 0
    for target in ("control", "nocodazole"):
        refs = record["references"][target]
        assert refs["real_halves"]["generated"] == 2 and refs["identity"]["generated"] == 3
        assert refs["real_halves"]["fid"] >= 0 and refs["identity"]["fid"] >= 0
    printed = capsys.readouterr().out
    assert f"strength {strength}, overall: FID {values['overall']['fid']:.3f}" in printed and "real vs real" in printed
