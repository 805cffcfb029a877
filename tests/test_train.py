"""Training: every method makes a checkpoint the Translator runs; resume, interrupt and bad data."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from phenotwin import PhenotwinError, Translator
from phenotwin.checkpoint import read_info
from phenotwin.train.trainer import TrainConfig, Trainer, train

PHENOTWIN = [sys.executable, "-m", "phenotwin"]


def write_condition(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        tifffile.imwrite(folder / f"{i:03d}.tif", (np.clip(image, 0, 1) * 65535).astype(np.uint16))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from phenotwin.synthetic import make_pairs

    root = tmp_path_factory.mktemp("data")
    pairs = make_pairs(8, size=40, channels=2, seed=0)
    write_condition(root / "control", pairs.control)
    write_condition(root / "treated", pairs.treated)
    return root


def tiny(data: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(data=str(data), out=str(out), size=32, steps=4, batch_size=2, checkpoint_every=2, width=8,
                    warmup_steps=1, sample_steps=2, calibrate=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def translates(path: Path, classes=("control", "treated")) -> np.ndarray:
    translator = Translator(path, device="cpu")
    assert translator.classes == list(classes)
    image = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32) * 1000
    result = translator.translate(image, classes[0], classes[1], steps=3, channel_axis=0)
    assert result.image.shape == image.shape and np.isfinite(result.heatmap).all()
    return result.normalised


def test_scratch_training_writes_a_complete_run(data, tmp_path):
    events = []
    out = train(tiny(data, tmp_path / "m", command="phenotwin train ..."), progress=events.append)
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert [e.saved for e in events] == [False, True, False, True]
    assert all(np.isfinite(e.loss) for e in events)
    info = read_info(out)
    assert info.kind == "pixel" and info.channels == 2 and info.image_size == 32
    assert info.provenance["steps"] == 4 and info.provenance["data_fingerprint"].startswith("sha256:")
    assert info.provenance["command"] == "phenotwin train ..."
    assert info.normalization["mode"] == "fixed" and info.normalization["high"][0] > 1000  # 16-bit units
    # a scratch model inverts with one refinement by default (MODEL_DEFAULTS are older models' without it)
    assert info.defaults["inversion_refinements"] == 1 and info.defaults["solver"] == "ddim"
    assert Translator(out, device="cpu").defaults.inversion_refinements == 1
    log = (out / "training" / "log.csv").read_text().splitlines()
    assert log[0] == "step,loss,learning_rate,seconds" and len(log) == 5
    assert sorted(p.name for p in (out / "training" / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    translates(out)


def test_latent_model_from_scratch_on_a_frozen_vae(data, tmp_path):
    from phenotwin.testing import make_tiny_checkpoint

    donor = make_tiny_checkpoint(tmp_path / "donor", kind="latent", channels=2, size=32)
    out = train(tiny(data, tmp_path / "latent", vae=str(donor), steps=2))
    info = read_info(out)
    assert info.kind == "latent" and (out / "vae").is_dir()
    translator = Translator(out, device="cpu")
    assert translator.denoiser.sample_shape() == (4, 16, 16)
    translates(out)


def test_same_data_gives_the_same_fingerprint_and_different_data_another(data, tmp_path):
    from phenotwin.train.data import load_condition_folders

    first = load_condition_folders(data, 32).fingerprint
    assert load_condition_folders(data, 32).fingerprint == first
    copy = tmp_path / "copy"
    write_condition(copy / "control", np.random.default_rng(1).random((2, 40, 40)))
    write_condition(copy / "treated", np.random.default_rng(2).random((2, 40, 40)))
    assert load_condition_folders(copy, 32).fingerprint != first


@pytest.fixture(scope="module")
def pixel_base(tmp_path_factory):
    from phenotwin.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("base") / "pixel", kind="pixel", classes=("a", "b", "c"))


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory):
    from phenotwin.testing import make_tiny_sd_base

    return make_tiny_sd_base(tmp_path_factory.mktemp("base") / "sd", channels=3)


@pytest.mark.parametrize("method", ["full", "lora", "svdiff"])
def test_fine_tuning_a_phenotwin_checkpoint_with_new_conditions(data, tmp_path, pixel_base, method):
    out = train(tiny(data, tmp_path / method, method=method, base=str(pixel_base), steps=2))
    info = read_info(out)
    assert info.kind == "pixel" and info.classes == ["control", "treated"]
    files = {p.relative_to(out).as_posix() for p in out.rglob("*.safetensors") if "training" not in p.parts}
    if method == "full":
        assert info.adapter is None and "unet/diffusion_pytorch_model.safetensors" in files
    else:
        assert info.adapter == method and Path(info.base) == pixel_base.resolve()
        assert not (out / "unet").exists()
    translates(out)


def test_fine_tuning_keeps_the_base_defaults_and_records_its_provenance(data, tmp_path, pixel_base):
    import shutil

    base = tmp_path / "tuned-base"
    shutil.copytree(pixel_base, base)
    info = json.loads((base / "phenotwin.json").read_text())
    info["defaults"].update(steps=100, strength=0.5)  # as the demo model's were set after training
    (base / "phenotwin.json").write_text(json.dumps(info))
    out = train(tiny(data, tmp_path / "full", method="full", base=str(base), steps=2))
    tuned = read_info(out)
    assert tuned.defaults["steps"] == 100 and tuned.defaults["strength"] == 0.5
    # and says how its base was made: the whole chain of commands
    assert tuned.provenance["base"] == {"path": str(base.resolve()), "provenance": info["provenance"]}
    # the weights' config does not carry the base's absolute path along (diffusers' _name_or_path)
    assert "_name_or_path" not in json.loads((out / "unet" / "config.json").read_text())


@pytest.mark.parametrize("method", ["full", "lora", "svdiff"])
def test_fine_tuning_a_stable_diffusion_folder(data, tmp_path, sd_base, method):
    out = train(tiny(data, tmp_path / method, method=method, base=str(sd_base), steps=2))
    info = read_info(out)
    assert info.kind == "stable-diffusion"
    assert (out / "class_embeddings.safetensors").is_file()
    base_size = sum(p.stat().st_size for p in (sd_base / "unet").glob("*.safetensors"))
    delta_size = sum(p.stat().st_size for p in out.rglob("*.safetensors") if "training" not in p.parts)
    if method != "full":
        assert delta_size < base_size / 2  # only the delta is stored
    translates(out)


def test_fine_tuning_changes_the_model(data, tmp_path, sd_base):
    lora = translates(train(tiny(data, tmp_path / "lora", method="lora", base=str(sd_base), steps=3,
                                 learning_rate=5e-2, ema_decay=0.0)))
    svd = translates(train(tiny(data, tmp_path / "svd", method="svdiff", base=str(sd_base), steps=3,
                                learning_rate=5e-2, ema_decay=0.0)))
    assert np.abs(lora - svd).mean() > 1e-4


def test_existing_output_is_protected(data, tmp_path):
    from phenotwin.train.config import OutputFolderInUse

    out = train(tiny(data, tmp_path / "m", steps=2))
    with pytest.raises(OutputFolderInUse, match="already holds a model. Nothing was changed: choose another output") as err:
        Trainer(tiny(data, out, steps=2))
    assert "--" not in str(err.value)  # words the Train widget can show too; the command line adds its flags:
    assert "pass --resume to continue that run, or --overwrite to replace it" in err.value.describe("--resume", "--overwrite")
    Trainer(tiny(data, out, steps=2, overwrite=True))
    with pytest.raises(PhenotwinError, match="nothing to resume"):
        Trainer(tiny(data, tmp_path / "new", resume=True))


def logged_steps(out: Path) -> int:
    log = out / "training" / "log.csv"
    return max(0, len(log.read_text().splitlines()) - 1) if log.is_file() else 0


def saved_step(out: Path) -> int:
    progress = out / "training" / "state" / "progress.json"
    return json.loads(progress.read_text())["step"] if progress.is_file() else 0


def run_until(args, reached, sig: int) -> subprocess.CompletedProcess:
    """Start `phenotwin train`, wait until `reached()` holds, then send `sig`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model; threads would only fight the test process
    # A shell that started us in the background may have left SIGINT ignored, and children
    # inherit that; give the trainer the default disposition, as in a terminal.
    process = subprocess.Popen([*PHENOTWIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not reached():
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_resume_after_kill_reaches_the_same_final_step(data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--size", "32", "--steps", "40", "--batch-size", "2",
            "--checkpoint-every", "4", "--width", "8"]
    killed = run_until(args, lambda: saved_step(out) >= 4, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    saved = json.loads((out / "training" / "state" / "progress.json").read_text())["step"]
    assert 4 <= saved < 40
    resumed = subprocess.run([*PHENOTWIN, *args, "--resume"], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {saved} to 40" in resumed.stdout
    assert read_info(out).provenance["steps"] == 40
    steps_logged = [int(line.split(",")[0]) for line in (out / "training" / "log.csv").read_text().splitlines()[1:]]
    assert steps_logged[-1] == 40 and set(range(1, 41)) <= set(steps_logged)
    translates(out)


def test_interrupt_saves_and_exits_cleanly(data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--size", "32", "--steps", "100000", "--batch-size", "2",
            "--checkpoint-every", "100000", "--width", "8"]
    stopped = run_until(args, lambda: logged_steps(out) >= 3, signal.SIGINT)  # no periodic save has happened
    assert stopped.returncode == 130, stopped.stderr
    assert "--resume" in stopped.stderr
    assert read_info(out).provenance["steps"] == saved_step(out) >= 3  # saved by the interrupt itself
    translates(out)


def image_set(root: Path, spec: dict[str, list[np.ndarray]]) -> Path:
    for name, images in spec.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            tifffile.imwrite(folder / f"{i}.tif", image)
    return root


GOOD = np.random.default_rng(0).integers(0, 4000, (2, 40, 40), dtype=np.uint16)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda root: root, "has no subfolders"),
        (lambda root: image_set(root, {"control": [GOOD]}), "one condition.*at least two"),
        (lambda root: image_set(root, {"control": [GOOD], "treated": []}), "treated has no images"),
        (lambda root: image_set(root, {"control": [GOOD], "treated": [GOOD[:1]]}), "different channel counts"),
        (lambda root: image_set(root, {"control": [GOOD], "treated": [GOOD[:, :20, :20]]}), "smaller than the 32x32 crop"),
        (lambda root: (image_set(root, {"control": [GOOD], "treated": [GOOD]}) / "treated" / "x.tif").write_bytes(b"junk")
         and root, "cannot read"),
        (lambda root: (image_set(root, {"control": [GOOD], "treated": [GOOD]}) / "treated" / "notes.txt").write_text("x")
         and root, "non-image file"),
    ],
)
def test_bad_data_is_rejected_before_training(tmp_path, build, message):
    root = build(tmp_path / "data")
    root.mkdir(exist_ok=True)
    with pytest.raises(PhenotwinError, match=message):
        Trainer(tiny(root, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_channels_last_images_are_read_like_channels_first(tmp_path):
    from phenotwin.train.data import load_condition_folders

    first = image_set(tmp_path / "first", {"control": [GOOD], "treated": [GOOD[::-1]]})
    last = image_set(tmp_path / "last", {"control": [np.moveaxis(GOOD, 0, -1)], "treated": [np.moveaxis(GOOD[::-1], 0, -1)]})
    expected = load_condition_folders(first, 32).images
    for channel_axis in (None, -1):  # guessed, then given
        loaded = load_condition_folders(last, 32, channel_axis=channel_axis).images
        assert all(np.array_equal(a, b) for a, b in zip(loaded, expected, strict=True))
    with pytest.raises(PhenotwinError, match="first \\(0\\) or last \\(-1\\)"):
        load_condition_folders(last, 32, channel_axis=1)


def test_the_train_flags_are_the_config_fields():
    from phenotwin.cli import build_parser
    from phenotwin.train.commands import config_from

    def parsed(*flags: str) -> TrainConfig:
        return config_from(build_parser().parse_args(["train", "--data", "d/", "--out", "m", *flags]), command="c")

    # No flag: every default is the dataclass's own; the paths as pathlib writes them.
    assert parsed() == TrainConfig(data="d", out="m", command="c")
    assert parsed("--no-zero-snr", "--channel-names", "a", "b", "--learning-rate", "0.01", "--channel-axis", "-1",
                  "--method", "lora", "--base", "x", "--resume") == TrainConfig(
        data="d", out="m", zero_snr=False, channel_names=["a", "b"], learning_rate=0.01, channel_axis=-1,
        method="lora", base="x", resume=True, command="c")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "m", "--channel-axis", "1"])


def test_bad_settings_are_rejected(data, tmp_path):
    with pytest.raises(PhenotwinError, match="give --base"):
        Trainer(tiny(data, tmp_path / "o", method="lora"))
    with pytest.raises(PhenotwinError, match="unknown method"):
        Trainer(tiny(data, tmp_path / "o", method="dreambooth"))
    with pytest.raises(PhenotwinError, match="multiple of 8"):
        Trainer(tiny(data, tmp_path / "o", size=30))
    with pytest.raises(PhenotwinError, match="neither a phenotwin checkpoint"):
        Trainer(tiny(data, tmp_path / "o", method="full", base=str(tmp_path)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(processes: int, target: list[str]) -> list[str]:
    # On a machine without CUDA, --multi_gpu is what starts several processes (torchrun);
    # --cpu would start one. Each run takes its own port so parallel runs do not collide.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", *target]


def finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Wait for a launch started in its own session; on timeout (a hang) kill its trainers too."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def launch(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
def test_accelerate_launch_with_two_processes(data, tmp_path):
    out = tmp_path / "ddp"

    def args(steps: int, *more: str) -> list[str]:
        return ["train", "--data", str(data), "--out", str(out), "--size", "32", "--steps", str(steps),
                "--batch-size", "2", "--checkpoint-every", "2", "--width", "8", *more]

    result = finish(launch(accelerate_launch(2, ["-m", "phenotwin", *args(4)])))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("training scratch") == 1  # only the main process talks
    assert "2 process(es)" in result.stdout
    info = read_info(out)
    assert info.provenance["steps"] == 4 and info.provenance["processes"] == 2
    state = out / "training" / "state"
    # accelerate saved each process's random streams, so a resumed run continues each one.
    assert {p.name for p in state.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert logged_steps(out) == 4
    translates(out)

    resumed = finish(launch(accelerate_launch(2, ["-m", "phenotwin", *args(6, "--resume")])))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 4 to 6" in resumed.stdout
    assert read_info(out).provenance["steps"] == 6 and logged_steps(out) == 6


RANKS_AGREE = """
import sys, torch
from phenotwin.train.trainer import TrainConfig, Trainer

trainer = Trainer(TrainConfig(data=sys.argv[1], out=sys.argv[2], size=32, steps=3, batch_size=2, checkpoint_every=3,
                              width=8, warmup_steps=1, sample_steps=2))
accelerator = trainer.accelerator
noise = torch.randn(4)  # drawn like the training noise, from the process's own generator
batches = []
draw = trainer.crops.batch
trainer.crops.batch = lambda size: batches.append(draw(size)) or batches[-1]
for _ in trainer.steps():
    pass
crops = torch.from_numpy(batches[0][0]).flatten()

def flat(tensors):
    return torch.cat([t.detach().flatten() for t in tensors])

gathered = {name: accelerator.gather(value[None]) for name, value in
            [("weights", flat(trainer.trainable)), ("ema", flat(trainer.ema.shadow_params)), ("noise", noise),
             ("crops", crops)]}
if accelerator.is_main_process:
    print("processes", accelerator.num_processes)
    print({name: torch.equal(value[0], value[1]) for name, value in gathered.items()})
accelerator.wait_for_everyone()  # as Trainer.save does: nobody leaves the group while another still works
accelerator.end_training()
"""


@pytest.mark.slow
def test_two_processes_draw_different_batches_and_keep_the_same_weights(data, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_AGREE)
    result = finish(launch(accelerate_launch(2, [str(script), str(data), str(tmp_path / "out")])))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes 2" in result.stdout
    # Gradients are averaged, so weights and their moving average stay identical; the data and the
    # noise must not be, or the second process would only repeat the first one's work.
    assert "{'weights': True, 'ema': True, 'noise': False, 'crops': False}" in result.stdout


@pytest.mark.slow
def test_interrupting_one_of_two_processes_stops_both_at_the_same_step_and_saves(data, tmp_path):
    import psutil

    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--size", "32", "--steps", "100000", "--batch-size", "2",
            "--checkpoint-every", "100000", "--width", "8"]
    process = launch(accelerate_launch(2, ["-m", "phenotwin", *args]))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and logged_steps(out) < 3:
        time.sleep(0.05)
    # The signal reaches the second process alone, in the middle of any step: the main process
    # must learn of it and both must stop after the same step, or their collectives would hang.
    second = next(child for child in psutil.Process(process.pid).children(recursive=True)
                  if child.environ().get("RANK") == "1")
    second.send_signal(signal.SIGINT)
    stopped = finish(process, timeout=120)
    assert stopped.stderr.count("interrupted: saved at step") == 1, stopped.stderr[-3000:]
    info = read_info(out)
    assert info.provenance["processes"] == 2
    assert info.provenance["steps"] == saved_step(out) >= 3  # saved by the interrupt itself
    assert {p.name for p in (out / "training" / "state").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    translates(out)


# -- overwrite replaces only what phenotwin wrote --------------------------------------------


def listing(*folders: Path) -> dict[str, str]:
    """Every file under `folders` with a hash of its content: what a refused call must leave alone."""
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for folder in folders for p in sorted(folder.rglob("*"))}


def test_overwrite_refuses_a_folder_with_files_phenotwin_did_not_write(data, tmp_path):
    import shutil

    from phenotwin.train.config import OutputFolderInUse

    out = train(tiny(data, tmp_path / "m", steps=2))
    assert json.loads((out / ".phenotwin-manifest.json").read_text())["entries"] == [
        ".phenotwin-manifest.json", "phenotwin.json", "scheduler", "training", "unet"]
    (out / "notes.txt").write_text("my notes")
    shutil.copytree(data, out / "images")
    (out / "training" / "plot.png").write_bytes(b"mine")
    before = listing(out)
    with pytest.raises(OutputFolderInUse, match="holds files phenotwin did not write: images/, notes.txt, "
                       "training/plot.png. Replacing a model replaces only phenotwin's own files, so nothing was"):
        Trainer(tiny(data, out, steps=2, overwrite=True))
    assert listing(out) == before
    (out / "training" / "plot.png").unlink()
    shutil.rmtree(out / "images")
    (out / "notes.txt").unlink()
    train(tiny(data, out, steps=2, seed=1, overwrite=True))
    assert read_info(out).provenance["seed"] == 1


def test_a_file_dropped_into_the_model_folder_during_training_survives_the_next_save(data, tmp_path):
    out = tmp_path / "m"
    trainer = Trainer(tiny(data, out, steps=4))
    for event in trainer.steps():
        if event.step == 2:
            (out / "notes.txt").write_text("written while it trained")
            (out / "results").mkdir()
            (out / "results" / "table.csv").write_text("a,b\n")
    assert (out / "notes.txt").read_text() == "written while it trained"
    assert (out / "results" / "table.csv").read_text() == "a,b\n"
    assert read_info(out).provenance["steps"] == 4
    assert "notes.txt" not in json.loads((out / ".phenotwin-manifest.json").read_text())["entries"]


def test_overwrite_of_an_old_run_removes_only_the_trainers_own_entries(data, tmp_path):
    out = train(tiny(data, tmp_path / "m", steps=2))
    (out / "training" / ".log.csv.abcd.tmp").write_text("half")  # a killed run's temporary file
    train(tiny(data, out, steps=2, checkpoint_every=1, overwrite=True))
    assert sorted(p.name for p in (out / "training").iterdir()) == ["candidates", "log.csv", "samples", "state"]
    assert sorted(p.name for p in (out / "training" / "samples").iterdir()) == ["step_000001.png", "step_000002.png"]
    assert sorted(p.name for p in (out / "training" / "candidates").iterdir()) == ["step-000001.safetensors",
                                                                                  "step-000002.safetensors"]
    assert logged_steps(out) == 2


def test_mixed_bit_depth_is_trained_only_when_allowed(tmp_path):
    root = image_set(tmp_path / "data", {"control": [GOOD], "treated": [(GOOD // 16).astype(np.uint8)]})
    with pytest.raises(PhenotwinError, match="differ in type or bit depth.*control: uint16.*treated: uint8"):
        Trainer(tiny(root, tmp_path / "out"))
    trainer = Trainer(tiny(root, tmp_path / "out", allow_mixed_bit_depth=True))
    assert trainer.data.counts() == {"control": 1, "treated": 1}


# -- an interrupted run resumes to the very weights of an uninterrupted one ----------------


def saved_tensors(out: Path) -> dict[str, np.ndarray]:
    """The model as saved (EMA weights) and the raw weights of the training state."""
    from safetensors.numpy import load_file

    tensors = {f"ema.{k}": v for k, v in load_file(out / "unet" / "diffusion_pytorch_model.safetensors").items()}
    tensors.update({f"raw.{k}": v for k, v in load_file(out / "training" / "state" / "model.safetensors").items()})
    return tensors


def log_rows(out: Path) -> list[list[str]]:
    """step, loss and learning rate of every logged row (not the wall time)."""
    return [row.split(",")[:3] for row in (out / "training" / "log.csv").read_text().splitlines()[1:]]


def same_run(out: Path, reference: Path) -> None:
    expected, got = saved_tensors(reference), saved_tensors(out)
    assert got.keys() == expected.keys()
    different = [name for name in expected if not np.array_equal(got[name], expected[name])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ, e.g. {different[:3]}"
    assert log_rows(out) == log_rows(reference)
    assert read_info(out).provenance["steps"] == 6


def resumable(data: Path, out: Path, **more) -> TrainConfig:
    return tiny(data, out, steps=6, checkpoint_every=2, **more)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    return train(resumable(data, tmp_path_factory.mktemp("reference") / "run"))


def test_stop_then_resume_gives_the_weights_of_an_uninterrupted_run(data, tmp_path, uninterrupted):
    out = tmp_path / "run"
    steps = Trainer(resumable(data, out)).steps()
    for event in steps:
        if event.step == 3:  # not a periodic save: the stop saves by itself
            steps.close()  # how the Train widget's Stop button ends a run
    assert saved_step(out) == 3
    train(resumable(data, out, resume=True))
    same_run(out, uninterrupted)


def test_ctrl_c_in_the_middle_of_a_step_stops_after_it_and_resumes_exactly(data, tmp_path, uninterrupted):
    out = tmp_path / "run"
    trainer = Trainer(resumable(data, out))
    update = trainer.ema.step
    updates = []

    def interrupted_midway(parameters):
        updates.append(1)
        if len(updates) == 3:  # the optimizer has stepped, the moving average and the step count not yet
            signal.raise_signal(signal.SIGINT)
        return update(parameters)

    trainer.ema.step = interrupted_midway
    with pytest.raises(KeyboardInterrupt):
        for _ in trainer.steps():
            pass
    assert saved_step(out) == 3 and read_info(out).provenance["steps"] == 3
    train(resumable(data, out, resume=True))
    same_run(out, uninterrupted)


KILLED = """
import os, signal, sys, tempfile
from pathlib import Path

import torch

import phenotwin.checkpoint as checkpoint
import phenotwin.io as io
from accelerate import Accelerator
from phenotwin.train.trainer import TrainConfig, train

data, out, point, threads = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)  # the reference ran with the test's threads: sums must add up alike
calls = []

def second(original, before):
    def hooked(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            before(*args)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return hooked

def between_renames(staging, target):
    os.replace(target, target.with_name(f".{target.name}.old-{os.getpid()}"))

def half_written(path, write):
    if str(path).endswith(".png"):
        tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=Path(path).parent)

if point == "swap":  # the new model staged, the training state carried into it, not yet in place
    checkpoint._swap_into_place = second(checkpoint._swap_into_place, lambda *a: None)
elif point == "between":  # the old model moved aside, the new one not yet in its place
    checkpoint._swap_into_place = second(checkpoint._swap_into_place, between_renames)
elif point == "state":  # the state written into its staging folder, not yet swapped in
    save_state = Accelerator.save_state
    Accelerator.save_state = second(save_state, lambda self, folder: save_state(self, folder))
elif point == "sample":  # a sample grid half written
    io.write_atomically = second(io.write_atomically, half_written)
config = TrainConfig(data=data, out=str(out), size=32, steps=6, batch_size=2, checkpoint_every=2, width=8,
                     warmup_steps=1, sample_steps=2)
train(config, progress=lambda event: point == "log" and event.step == 5 and os.kill(os.getpid(), signal.SIGKILL))
"""


@pytest.mark.parametrize("point", ["swap", "between", "state", "sample", "log"])
def test_a_run_killed_anywhere_is_tidied_and_resumes_exactly(data, tmp_path, uninterrupted, point):
    import torch

    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    killed = subprocess.run([sys.executable, str(script), str(data), str(out), point, str(threads)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run."))
    trainer = Trainer(resumable(data, out, resume=True))
    assert bool(trainer.tidied) == (point != "log"), trainer.tidied  # a kill between saves leaves only log rows
    assert all(name.split("/")[-1].startswith(".") for name in trainer.tidied)
    for _ in trainer.steps():
        pass
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")) == [], left
    hidden = [p for p in out.rglob(".*") if p.name != ".phenotwin-manifest.json"]
    assert hidden == []
    steps = [int(row[0]) for row in log_rows(out)]
    assert steps == [1, 2, 3, 4, 5, 6]  # no row twice
    same_run(out, uninterrupted)


# -- the validation split, the calibration at the end, the save kept ------------------------------------------


def test_the_validation_split_is_recorded_and_never_trained_on(data, tmp_path):
    from phenotwin.input_fit import check_fit

    trainer = Trainer(tiny(data, tmp_path / "m"))
    held = set(trainer.split["files"])
    assert len(held) == 2 and {name.split("/")[0] for name in held} == {"control", "treated"}  # 1 of 8 each
    trained = {f.relative_to(data).as_posix() for f in trainer.data.files}
    assert trained.isdisjoint(held) and len(trained) == 14
    assert {f.relative_to(data).as_posix() for f in trainer.validation.files} == held
    assert Trainer(tiny(data, tmp_path / "again")).split == trainer.split  # the seed fixes it
    assert Trainer(tiny(data, tmp_path / "other", seed=3)).split["files"] != trainer.split["files"]
    assert Trainer(tiny(data, tmp_path / "none", validation_fraction=0)).split["files"] == []
    for _ in trainer.steps():
        pass
    info = read_info(trainer.out)
    assert info.provenance["validation"] == trainer.split and info.provenance["validation"]["fraction"] == 0.1
    assert info.provenance["validation"]["fingerprint"].startswith("sha256:")
    assert info.provenance["images_per_class"] == {"control": 7, "treated": 7}
    assert not (trainer.out / "training" / "calibration.csv").exists()  # calibrate=False
    assert trainer.calibration.notes[0].startswith("calibration skipped: --no-calibrate")
    # The input-fit check of every new model: a [0, 1] float image given to a 16-bit model does not fit.
    stats = info.intensity_statistics
    assert stats["images"] == 14 and stats["bit_depth"] == 16
    low, high = (np.asarray(info.normalization[k], float) for k in ("low", "high"))
    unit = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32)
    assert check_fit(unit, low, high, stats, "fixed", unit.dtype).level == "does-not-fit"
    own = tifffile.imread(data / "control" / "000.tif").astype(np.float32)
    assert check_fit(own, low, high, stats, "fixed", np.dtype(np.uint16)).level == "ok"
    # Resume holds out the same images: another fraction is refused.
    with pytest.raises(PhenotwinError, match="validation_fraction"):
        Trainer(tiny(data, trainer.out, resume=True, steps=6, validation_fraction=0.2))


def test_no_calibrate_flag():
    from phenotwin.cli import build_parser
    from phenotwin.train.commands import config_from

    args = build_parser().parse_args(["train", "--data", "d", "--out", "m", "--no-calibrate", "--calibration-images",
                                      "3", "--validation-fraction", "0.2", "--reconstruction-target", "38"])
    config = config_from(args)
    assert (config.calibrate, config.calibration_images, config.validation_fraction) == (False, 3, 0.2)
    assert config.reconstruction_target == 38.0
    for bad in ({"validation_fraction": 0.9}, {"calibration_images": 1}, {"reconstruction_target": 0},
                {"reconstruction_target": 120.0}):
        with pytest.raises(PhenotwinError):
            TrainConfig(data="d", out="m", **bad).check()


@pytest.fixture
def few_steps(monkeypatch):
    """Models whose default step count is 3: a calibration of a tiny model takes seconds."""
    from phenotwin.pipeline.settings import MODEL_DEFAULTS

    monkeypatch.setitem(MODEL_DEFAULTS, "steps", 3)


def test_calibration_at_the_end_of_training_writes_defaults_and_the_sweep(data, tmp_path, few_steps, monkeypatch):
    import phenotwin.calibration
    from phenotwin.train.state import foreign

    # A 4-step model's classifier is weak; the threshold that then keeps the defaults is tested in test_trust.py.
    monkeypatch.setattr(phenotwin.calibration, "MIN_CLASSIFIER_ACCURACY", 0.0)

    events = []
    out = train(tiny(data, tmp_path / "m", calibrate=True, calibration_images=2, reconstruction_target=99.0),
                progress=events.append)
    assert [e.step for e in events if e.stage == "training"] == [1, 2, 3, 4]
    stages = {e.stage for e in events} - {"training"}
    assert {"calibrating: classifier", "calibrating: sweep", "calibrating: candidate 2/2 (step 4)"} <= stages
    # one bar per candidate over all its images (an ETA), not one that starts again at every image
    scoring = [(e.step, e.total) for e in events if e.stage == "calibrating: candidate 2/2 (step 4)"]
    assert [step for step, _ in scoring] == sorted(step for step, _ in scoring)
    assert len({total for _, total in scoring}) == 1 and scoring[-1][0] == scoring[-1][1] > 6  # 4 images
    info = read_info(out)
    record = info.calibration
    assert record["data_fingerprint"] == info.provenance["validation"]["fingerprint"]
    assert {k: info.defaults[k] for k in ("strength", "guidance", "confine")} == {
        k: record["chosen"][k] for k in ("strength", "guidance", "confine")}
    # --reconstruction-target reaches the calibration: dearer settings searched, the miss recorded
    assert record["reconstruction_target"] == 99.0 and "reconstruction_target_missed" in record
    assert {(r["steps"], r["inversion_refinements"]) for r in record["cost_search"]} >= {(6, 0), (6, 1)}  # 3 + 1: its own
    assert [row["step"] for row in record["candidates"]["candidates"]] == [2, 4]
    assert info.provenance["selection"]["kept_step"] in (2, 4)
    training = out / "training"
    assert (training / "calibration.csv").read_text().startswith("strength,guidance,confine")
    assert (training / "calibration.png").is_file()
    assert (training / "candidates.csv").read_text().splitlines()[0] == "step,reconstruction_psnr,flip_rate,images,kept"
    assert sorted(p.name for p in (training / "candidates").iterdir()) == ["step-000002.safetensors",
                                                                          "step-000004.safetensors"]
    assert (training / "calibration-cost.csv").is_file()
    assert foreign(out) == []  # all phenotwin's: --overwrite may replace them, and a new run does
    train(tiny(data, out, overwrite=True, steps=2))
    assert not (training / "calibration.csv").exists() and not (training / "calibration-cost.csv").exists()
    assert sorted(p.name for p in (training / "candidates").iterdir()) == ["step-000002.safetensors"]
    translates(out)


def test_a_timed_calibration_measures_the_verdict_on_more_images_while_its_budget_lasts(data, tmp_path, few_steps,
                                                                                      monkeypatch):
    import phenotwin.calibration
    from phenotwin.train import selection

    monkeypatch.setattr(phenotwin.calibration, "MIN_CLASSIFIER_ACCURACY", 0.0)
    monkeypatch.setattr(selection, "CALIBRATION_SHARE", 1e5)  # a budget that holds everything
    monkeypatch.setattr(selection, "MOST_IMAGES", 2)  # the sweep on 2 a condition, the verdict on all 4
    trainer = Trainer(tiny(data, tmp_path / "m", calibrate=True, validation_fraction=0.5))
    for _ in trainer.steps():
        pass
    record = read_info(trainer.out).calibration
    assert record["images_per_condition"] == {"control": 2, "treated": 2}
    assert record["verdict_images_per_condition"] == {"control": 4, "treated": 4}
    [table] = record["reconstruction_psnr"].values()  # at the defaults' step count
    assert all(len(psnrs) == 8 for psnrs in table.values())
    assert not any(key in record for key in ("cost_search_stopped", "verdict_images_stopped"))
    assert "2 image(s) per condition, with the sweep" in record["budget"]["plan"]


def test_the_best_save_is_kept_not_the_last(data, tmp_path, few_steps, monkeypatch):
    from safetensors.torch import load_file

    from phenotwin.train import selection

    def score(translator, data, n, classifier, seed):  # the later the save, the worse it scores
        yield from ()
        return {"reconstruction_psnr": 40.0 - translator.denoiser.unet.kept_marker, "flip_rate": 1.0, "images": 2}

    real_load = Trainer.load_candidate

    def load(self, file):
        real_load(self, file)
        self.accelerator.unwrap_model(self.model).unet.kept_marker = int(file.name[5:11])

    monkeypatch.setattr(selection, "score_steps", score)
    monkeypatch.setattr(Trainer, "load_candidate", load)
    trainer = Trainer(tiny(data, tmp_path / "m", calibrate=True, calibration_images=2, steps=6))
    for _ in trainer.steps():
        pass
    out = trainer.out
    assert read_info(out).provenance["selection"]["kept_step"] == 2
    assert any("kept the save of step 2 of 6" in note for note in trainer.calibration.notes)
    kept = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    candidate = {k.removeprefix("unet."): v for k, v in
                 load_file(out / "training" / "candidates" / "step-000002.safetensors").items()}
    last = {k.removeprefix("unet."): v for k, v in
            load_file(out / "training" / "candidates" / "step-000006.safetensors").items()}
    shared = [k for k in candidate if k in kept]
    assert shared and all(np.array_equal(kept[k].numpy(), candidate[k].numpy()) for k in shared)
    assert not all(np.array_equal(kept[k].numpy(), last[k].numpy()) for k in shared)
    rows = (out / "training" / "candidates.csv").read_text().splitlines()[1:]
    assert [row.split(",")[-1] for row in rows] == ["True", "False", "False"]


def test_the_budget_chooses_images_and_the_sweep(tmp_path):
    from phenotwin.calibration import unet_calls
    from phenotwin.evaluate.translation import EvalSet
    from phenotwin.testing import make_tiny_checkpoint
    from phenotwin.train.selection import _score_calls, plan

    translator = Translator(make_tiny_checkpoint(tmp_path / "m"), device="cpu")
    images = {c: np.zeros((8, translator.channels, translator.image_size, translator.image_size), np.float32)
              for c in translator.classes}
    held_out = EvalSet(translator.classes, images)
    config = TrainConfig(data="d", out="m")
    generous = plan(config, translator, held_out, 6, 0.001, budget=1e6)
    assert (generous.images, generous.sweep) == (8, True)
    tight = plan(config, translator, held_out, 6, 0.001, budget=generous.seconds / 4)
    assert tight.seconds <= generous.seconds / 4 and (tight.images, tight.sweep) < (8, True)
    assert plan(config, translator, held_out, 6, 0.001, budget=0.001) is None
    forced = plan(TrainConfig(data="d", out="m", calibration_images=3), translator, held_out, 6, 0.001, budget=0)
    assert (forced.images, forced.sweep) == (3, True)
    assert generous.timed and not forced.timed  # a number asked for runs whatever it costs
    # A reconstruction target's dearer settings are not planned: they run while the budget lasts (test_trust).
    aiming = TrainConfig(data="d", out="m", reconstruction_target=38.0)
    assert plan(aiming, translator, held_out, 6, 0.001, budget=generous.seconds) == generous
    searched = 0.001 * (6 * _score_calls(translator, held_out, 8) +
                        unet_calls(translator, held_out, 8, reconstruction_target=38.0))
    assert searched > 1.5 * generous.seconds  # what planning with them as an upper bound gave up
