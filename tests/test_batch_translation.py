"""Batch-aware translation: a model trained with batches.csv keeps an image's batch while it changes the condition."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from phenotwin import PhenotwinError, Translator
from phenotwin.checkpoint import CheckpointError, CheckpointInfo, read_info
from phenotwin.testing import make_tiny_checkpoint

BATCHES = ("p1", "p2")


@pytest.fixture(scope="module")
def batch_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "model", batches=BATCHES)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "model")


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((2, 32, 32)).astype(np.float32)


def labels_seen(translator: Translator, monkeypatch) -> list[list[int]]:
    """The class labels of every UNet call, in order."""
    seen = []
    forward = translator.denoiser.unet.forward

    def spy(sample, timestep, class_labels=None, **kwargs):
        seen.append(class_labels.tolist())
        return forward(sample, timestep, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(translator.denoiser.unet, "forward", spy)
    return seen


@pytest.mark.parametrize("batch, row", [("p1", 0), ("p2", 1), (None, 2)])
def test_each_batch_conditions_the_unet_in_its_own_row_and_guidance_uses_that_rows_null(batch_model, monkeypatch,
                                                                                      batch, row):
    translator = Translator(batch_model, device="cpu")
    seen = labels_seen(translator, monkeypatch)
    translator.translate(image(), "control", "treated", steps=2, strength=1.0, guidance=1.0, confine=False,
                         channel_axis=0, batch=batch)
    stride = 3  # control, treated, null
    inversion, generation = seen[:2], seen[2:]
    assert inversion == [[row * stride + 0]] * 2
    # translation and reconstruction, then their unconditional halves: the null of the same row
    assert generation == [[row * stride + 1, row * stride + 0, row * stride + 2, row * stride + 2]] * 2


def test_the_batch_changes_the_translation_and_a_generation_stays_in_the_inversions_batch(batch_model):
    translator = Translator(batch_model, device="cpu")
    results = {b: translator.translate(image(), "control", "treated", steps=3, channel_axis=0, batch=b)
               for b in (*BATCHES, None)}
    assert not np.allclose(results["p1"].normalised, results["p2"].normalised)
    assert not np.allclose(results["p1"].normalised, results[None].normalised)
    again = translator.translate(image(), "control", "treated", steps=3, channel_axis=0, batch="p2")
    np.testing.assert_array_equal(again.normalised, results["p2"].normalised)
    inversion = results["p2"].inversion
    assert inversion.batch == "p2" and results["p2"].settings.batch == "p2"
    scrubbed = translator.generate(inversion, "treated", strength=0.5)  # no batch given: the inversion's
    assert scrubbed.settings.batch == "p2"
    with pytest.raises(PhenotwinError, match="made in batch 'p2', not 'p1'.*Invert the image again"):
        translator.generate(inversion, settings=scrubbed.settings.replace(batch="p1"))


def test_unknown_batches_and_a_batch_on_a_model_without_batches_are_refused(batch_model, plain_model):
    with pytest.raises(CheckpointError, match="unknown batch 'p3'.*'p1', 'p2'"):
        Translator(batch_model, device="cpu").translate(image(), "control", "treated", steps=2, channel_axis=0,
                                                        batch="p3")
    plain = Translator(plain_model, device="cpu")
    with pytest.raises(CheckpointError, match="trained without batches.*leave the batch unset"):
        plain.translate(image(), "control", "treated", steps=2, channel_axis=0, batch="p1")
    assert plain.batches == [] and Translator(batch_model, device="cpu").batches == list(BATCHES)


def test_batches_are_stored_checked_and_need_enough_class_embeddings(batch_model, tmp_path):
    info = read_info(batch_model)
    assert info.batches == list(BATCHES) and info.label_count == 9
    assert info.batch_row("p2") == 1 and info.batch_row(None) == 2
    base = dict(kind="pixel", classes=["a", "b"], image_size=32, channels=1)
    for bad, message in (({"batches": ["p1"]}, "at least two different batches"),
                         ({"batches": ["p1", "p1"]}, "at least two different batches"),
                         ({"batches": "p1p2"}, "list of batch names")):
        with pytest.raises(CheckpointError, match=message):
            CheckpointInfo(**base, **bad)
    # A phenotwin.json that claims batches its UNet has no embeddings for is refused on load.
    plain = make_tiny_checkpoint(tmp_path / "plain")
    data = json.loads((plain / "phenotwin.json").read_text())
    (plain / "phenotwin.json").write_text(json.dumps({**data, "batches": list(BATCHES)}))
    with pytest.raises(CheckpointError, match="3 class embeddings.*need 9"):
        Translator(plain, device="cpu")


def test_dropout_hides_the_condition_in_its_own_row_and_the_batch_keeping_the_condition():
    from phenotwin.train.data import dropped_labels

    labels = torch.tensor([0, 1, 3, 4, 1, 4])  # conditions 0/1 in rows 0 and 1 of 2 batches (null = 2)
    drop = torch.tensor([True, False, True, False, False, False])
    hide = torch.tensor([False, False, False, True, True, False])
    assert dropped_labels(labels, 2, 2, drop, hide).tolist() == [2, 1, 5, 7, 7, 4]
    assert dropped_labels(labels[:2], 2, 0, drop[:2]).tolist() == [2, 1]  # no batches: as before


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    from phenotwin.synthetic.batches import make_plates, write_plates

    root = tmp_path_factory.mktemp("plates")
    write_plates(root, make_plates(3, 2, size=32, channels=1, seed=1))
    return root


def test_training_on_plates_learns_a_label_per_condition_and_batch(plates, tmp_path):
    from phenotwin.synthetic.batches import read_batches
    from phenotwin.train.data import AugmentedCrops, load_condition_folders, with_batches
    from phenotwin.train.trainer import TrainConfig, train

    data = with_batches(load_condition_folders(plates, 32), plates)
    truth = read_batches(plates)
    assert data.batches == sorted(set(truth.values())) and data.label_count == 9
    crops = AugmentedCrops(data, 32)
    # Every drawn label is its image's condition in its image's batch row: replay the draw.
    crops.reseed(5)
    _, labels = crops.batch(12)
    crops.reseed(5)
    conditions = crops.rng.integers(0, 2, size=12)
    for label, condition in zip(labels, conditions):
        index = crops.rng.choice(crops.by_class[condition])
        crops.rng.integers(0, 1), crops.rng.integers(0, 1), crops.rng.integers(0, 4), crops.rng.random()
        batch = data.batches.index(truth[data.files[index].relative_to(plates).as_posix()])
        assert label == batch * 3 + condition

    out = train(TrainConfig(data=str(plates), out=str(tmp_path / "m"), size=32, steps=2, batch_size=2,
                            checkpoint_every=2, width=8, warmup_steps=1, sample_steps=2, calibrate=False,
                            validation_fraction=0))
    info = read_info(out)
    assert info.batches == data.batches
    translator = Translator(out, device="cpu")
    assert translator.denoiser.unet.config.num_class_embeds == 9
    translated = translator.translate(image()[:1], *translator.classes, steps=2, channel_axis=0,
                                      batch=data.batches[0])
    assert np.isfinite(translated.normalised).all()

    ignored = train(TrainConfig(data=str(plates), out=str(tmp_path / "n"), size=32, steps=1, batch_size=2,
                                checkpoint_every=1, width=8, warmup_steps=1, sample_steps=2, calibrate=False,
                                validation_fraction=0, batches=False))
    assert read_info(ignored).batches is None


def test_a_batches_file_with_one_batch_is_refused_with_the_way_out(plates, tmp_path):
    import shutil

    from phenotwin.train.trainer import TrainConfig, Trainer

    root = tmp_path / "one"
    shutil.copytree(plates, root)
    csv = root / "batches.csv"
    lines = csv.read_text().splitlines()
    header = lines[0].split(",")
    column = header.index("batch")
    rows = [line.split(",") for line in lines[1:]]
    for row in rows:
        row[column] = "plate-a"
    csv.write_text("\n".join([lines[0]] + [",".join(row) for row in rows]) + "\n")
    with pytest.raises(PhenotwinError, match="one batch.*--no-batches"):
        Trainer(TrainConfig(data=str(root), out=str(tmp_path / "m"), size=32, steps=1, batch_size=2, width=8,
                            calibrate=False))


def test_the_translate_command_takes_a_batch(batch_model, tmp_path, capsys):
    import tifffile

    from phenotwin.cli import main

    source = tmp_path / "in" / "cell.tif"
    source.parent.mkdir()
    tifffile.imwrite(source, image(), metadata={"axes": "CYX"})
    common = ["translate", "--checkpoint", str(batch_model), "--input", str(source), "--source", "control",
              "--target", "treated", "--steps", "2", "--device", "cpu"]
    assert main([*common, "--batch", "p2", "--output", str(tmp_path / "out")]) == 0
    (record,) = (tmp_path / "out").glob("*.json")
    assert json.loads(record.read_text())["settings"]["batch"] == "p2"
    assert main([*common, "--batch", "p9", "--output", str(tmp_path / "bad")]) != 0
    assert "unknown batch 'p9'" in capsys.readouterr().err


def test_the_translate_command_takes_each_inputs_batch_from_a_csv(batch_model, tmp_path, capsys):
    import tifffile

    from phenotwin.cli import main

    folder = tmp_path / "plate"
    folder.mkdir()
    for name in ("a", "b"):
        tifffile.imwrite(folder / f"{name}.tif", image(), metadata={"axes": "CYX"})
    table = tmp_path / "batches.csv"
    table.write_text("file,batch\nplate/a.tif,p1\nplate/b.tif,p2\n")
    common = ["translate", "--checkpoint", str(batch_model), "--input", str(folder), "--source", "control",
              "--target", "treated", "--steps", "2", "--device", "cpu"]
    assert main([*common, "--batches-csv", str(table), "--output", str(tmp_path / "out")]) == 0
    records = {p.name.split("_")[0]: json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")}
    assert {name: r["settings"]["batch"] for name, r in records.items()} == {"a": "p1", "b": "p2"}
    images = {name: tifffile.imread(tmp_path / "out" / r["translated"]) for name, r in records.items()}
    assert not np.array_equal(images["a"], images["b"])  # the same pixels, translated in two batches
    with open(tmp_path / "out" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((Path(r["input"]).name, r["batch"]) for r in rows) == [("a.tif", "p1"), ("b.tif", "p2")]
    # run again: both are done already, nothing is redone
    assert main([*common, "--batches-csv", str(table), "--output", str(tmp_path / "out")]) == 0
    assert "translated 0, already done 2" in capsys.readouterr().out

    table.write_text("file,batch\nplate/a.tif,p1\n")
    assert main([*common, "--batches-csv", str(table), "--output", str(tmp_path / "x")]) != 0
    assert "1 input(s) have no batch" in capsys.readouterr().err
    table.write_text("file,batch\nplate/a.tif,p1\nplate/b.tif,p7\n")
    assert main([*common, "--batches-csv", str(table), "--output", str(tmp_path / "y")]) != 0
    assert "unknown batch 'p7'" in capsys.readouterr().err
    assert main([*common, "--batches-csv", str(table), "--batch", "p1", "--output", str(tmp_path / "z")]) != 0
    assert "not both" in capsys.readouterr().err


def test_results_written_before_batches_existed_are_not_redone(plain_model, tmp_path, capsys):
    import tifffile

    from phenotwin.cli import main

    source = tmp_path / "in" / "cell.tif"
    source.parent.mkdir()
    tifffile.imwrite(source, image(), metadata={"axes": "CYX"})
    command = ["translate", "--checkpoint", str(plain_model), "--input", str(source), "--source", "control",
               "--target", "treated", "--steps", "2", "--device", "cpu", "--output", str(tmp_path / "out")]
    assert main(command) == 0
    (record_path,) = (tmp_path / "out").glob("*.json")
    record = json.loads(record_path.read_text())
    del record["settings"]["batch"]  # as an older phenotwin wrote it
    record_path.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(command) == 0
    assert "translated 0, already done 1" in capsys.readouterr().out


def test_calibration_and_evaluation_translate_each_held_out_image_in_its_own_batch(tmp_path, monkeypatch):
    """A batch model is calibrated and evaluated in the batches results will use: each held-out image in its plate's
    labels (from the folder's batches.csv), a plate the model never saw in its "batch unknown" row."""
    from phenotwin.calibration import calibrate_steps
    from phenotwin.evaluate.translation import load_eval_folder, translation_steps
    from phenotwin.progress import drive
    from phenotwin.synthetic.batches import make_plates, read_batches, write_plates
    from phenotwin.train.selection import score_steps

    plates = make_plates(2, 2, size=32, channels=2, seed=0, start=700)
    seen_plate, unseen_plate = (effect.batch for effect in plates.effects)
    write_plates(tmp_path / "held-out", plates)
    model = make_tiny_checkpoint(tmp_path / "model", classes=("control", "nocodazole"), batches=(seen_plate, "p-other"),
                                 normalization={"mode": "fixed", "low": [0, 0], "high": [65535, 65535]})
    data = load_eval_folder(tmp_path / "held-out", 32, 2, 4)
    by_file = read_batches(tmp_path / "held-out")
    files = {c: sorted(f for f in by_file if f.startswith(f"{c}/")) for c in ("control", "nocodazole")}
    assert data.batches == {c: [by_file[f] for f in files[c]] for c in files}  # in the images' order
    assert sorted(set(data.batches["control"])) == sorted([seen_plate, unseen_plate])

    stored = json.loads((Path(model) / "phenotwin.json").read_text())
    stored["defaults"]["steps"] = 2  # a quick verdict table
    (Path(model) / "phenotwin.json").write_text(json.dumps(stored))
    translator = Translator(model, device="cpu")
    asked = []
    invert = translator.invert_steps

    def spy(image, source=None, steps=None, channel_axis=None, *, settings=None, strength=None, batch=None):
        resolved = translator.resolve(settings, source=source, batch=batch)
        asked.append((resolved.source, resolved.batch))
        return (yield from invert(image, source, steps, channel_axis, settings=settings, strength=strength,
                                  batch=batch))

    monkeypatch.setattr(translator, "invert_steps", spy)
    record = drive(calibrate_steps(translator, data, n=4, sweep=False))
    expected = [(c, b if b == seen_plate else None) for c in ("control", "nocodazole") for b in data.batches[c]]
    assert record["images_in_their_batch"] == sum(b is not None for _, b in expected) == 4
    assert sorted(asked, key=str) == sorted(expected, key=str)
    assert (None in {b for _, b in asked}) and (seen_plate in {b for _, b in asked})
    asked.clear()  # `phenotwin evaluate translation` too
    drive(translation_steps(translator, data, n=4, steps=2, classifier_epochs=1, confine=False))
    assert sorted(asked, key=str) == sorted(expected, key=str)
    asked.clear()  # and the end of training's choice of the save to keep
    drive(score_steps(translator, data, 4, None, 0))
    assert sorted(asked, key=str) == sorted(expected, key=str)

    plain = Translator(make_tiny_checkpoint(tmp_path / "plain"), device="cpu")
    assert data.batch_for(plain, "control", 0) is None  # a model without batches translates as ever

    # A batches.csv that does not match the folder stops a batch model's calibration, and no other.
    stray = next((tmp_path / "held-out/control").glob("*.tif"))
    stray.rename(stray.with_name("renamed.tif"))
    broken = load_eval_folder(tmp_path / "held-out", 32, 2, 4)
    assert broken.batch_for(plain, "control", 0) is None
    with pytest.raises(PhenotwinError, match="names 1 image.s. that are not in"):
        broken.batch_for(translator, "control", 0)


def test_the_end_of_training_calibration_knows_each_held_out_images_batch():
    from phenotwin.train.data import ConditionImages
    from phenotwin.train.selection import eval_set

    images = [np.full((2, 40, 40), k, np.float32) for k in range(5)]
    validation = ConditionImages(classes=["control", "treated"], images=images, labels=np.array([0, 1, 0, 1, 0]),
                                 files=[Path(f"{k}.tif") for k in range(5)], low=np.zeros(2), high=np.ones(2),
                                 fingerprint="f", batches=["p1", "p2"], batch_labels=np.array([1, 0, 0, 1, 1]))
    held_out = eval_set(validation, 32)
    assert held_out.batches == {"control": ["p2", "p1", "p2"], "treated": ["p1", "p2"]}
    assert held_out.images["control"][:, 0, 0, 0].tolist() == [0, 2, 4]  # the batches follow their images
    assert eval_set(replace(validation, batches=None, batch_labels=None), 32).batches is None
