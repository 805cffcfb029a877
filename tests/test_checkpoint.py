"""The checkpoint folder format: round trips, LoRA deltas, ids, atomic saves and clear refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from phenotwin.checkpoint import (
    INFO_FILE,
    CheckpointInfo,
    checkpoint_id,
    load_checkpoint,
    read_info,
    save_checkpoint,
)
from phenotwin.errors import CheckpointError

BUILDS = {
    "pixel": {"kind": "pixel"},
    "latent": {"kind": "latent"},
    "stable-diffusion": {"kind": "stable-diffusion"},
    "stable-diffusion-lora": {"kind": "stable-diffusion", "lora": True},
}


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    yield


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every kind of tiny checkpoint, plus the in-memory `Checkpoint` exactly as it was saved."""
    import phenotwin.testing as testing

    root = tmp_path_factory.mktemp("built")
    real_save = testing.save_checkpoint
    captured = {}
    out = {}
    try:
        for name, kwargs in BUILDS.items():

            def capture(checkpoint, path, *args, _name=name, **kwargs):
                captured[_name] = checkpoint
                return real_save(checkpoint, path, *args, **kwargs)

            testing.save_checkpoint = capture
            folder = testing.make_tiny_checkpoint(root / name, **kwargs)
            out[name] = (folder, captured[name])
    finally:
        testing.save_checkpoint = real_save
    return out


@pytest.fixture
def copy_of(built, tmp_path):
    """A private copy of a built checkpoint folder, safe to damage."""

    def make(name: str) -> Path:
        destination = tmp_path / name
        shutil.copytree(built[name][0], destination)
        return destination

    return make


def _forward(unet, info: CheckpointInfo, class_embeddings=None, in_channels=None, sample_size=None):
    """One UNet forward pass on a fixed random input, two classes, two timesteps."""
    import torch

    in_channels = in_channels or unet.config.in_channels
    sample_size = sample_size or unet.config.sample_size
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, in_channels, sample_size, sample_size, generator=generator)
    t = torch.tensor([10, 600])
    labels = torch.tensor([0, 1])
    unet.eval()
    with torch.no_grad():
        if info.kind == "stable-diffusion":
            return unet(x, t, encoder_hidden_states=class_embeddings[labels]).sample
        return unet(x, t, class_labels=labels).sample


def _write_info(folder: Path, data) -> None:
    (folder / INFO_FILE).write_text(json.dumps(data), encoding="utf-8")


def _info_dict(folder: Path) -> dict:
    return json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))


def _assert_problem_and_fix(err: pytest.ExceptionInfo, problem: str, fix: str) -> None:
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert problem.lower() in message.lower(), message
    assert fix.lower() in message.lower(), message


# -- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDS))
def test_save_load_round_trip_keeps_info_and_outputs(built, name):
    import torch

    folder, saved = built[name]
    loaded = load_checkpoint(folder)

    assert asdict(loaded.info) == asdict(saved.info)
    assert loaded.info.classes == ["control", "treated"]
    assert (loaded.info.image_size, loaded.info.channels) == (32, 2)
    assert loaded.info.normalization == {"mode": "fixed", "low": [0.0, 0.0], "high": [1.0, 1.0]}
    assert loaded.info.provenance == {"method": "random", "seed": 0, "note": "tiny random model for tests"}
    assert loaded.path == folder and loaded.id.startswith(f"{folder.name}@")

    config = loaded.unet.config
    before = _forward(saved.unet, saved.info, saved.class_embeddings, config.in_channels, config.sample_size)
    after = _forward(loaded.unet, loaded.info, loaded.class_embeddings)
    assert before.abs().mean() > 0
    if loaded.info.adapter == "lora":
        # saved: base + unmerged adapter; loaded: merged once. Same function up to float rounding.
        assert (after - before).abs().max() < 1e-6
    else:
        assert torch.equal(after, before)

    if saved.class_embeddings is not None:
        assert torch.equal(loaded.class_embeddings, saved.class_embeddings)
    if saved.vae is not None:
        image = torch.rand(1, 2, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
        with torch.no_grad():
            saved.vae.eval()
            assert torch.equal(loaded.vae.encode(image).latent_dist.mean, saved.vae.encode(image).latent_dist.mean)
    if name == "pixel":
        assert loaded.vae is None and loaded.class_embeddings is None
    else:
        assert loaded.vae is not None  # the LoRA checkpoint takes its VAE from the base


def test_lora_checkpoint_stores_only_the_delta(built):
    folder, _ = built["stable-diffusion-lora"]
    assert not (folder / "unet").exists()
    assert not (folder / "vae").exists()
    adapter = folder / "unet_lora" / "adapter_model.safetensors"
    assert adapter.is_file()
    info = _info_dict(folder)
    assert info["adapter"] == "lora"
    assert not Path(info["base"]).is_absolute()
    base = (folder / info["base"]).resolve()
    base_weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    assert base_weights.is_file()
    assert adapter.stat().st_size * 5 < base_weights.stat().st_size
    assert not list(folder.rglob("diffusion_pytorch_model.safetensors"))


def test_lora_merged_unet_differs_from_its_base(built):
    from diffusers import UNet2DConditionModel

    folder, _ = built["stable-diffusion-lora"]
    loaded = load_checkpoint(folder)
    base = UNet2DConditionModel.from_pretrained(
        (folder / loaded.info.base).resolve() / "unet", use_safetensors=True
    )
    merged = _forward(loaded.unet, loaded.info, loaded.class_embeddings)
    plain = _forward(base, loaded.info, loaded.class_embeddings)
    assert (merged - plain).abs().mean() > 1e-3 * plain.abs().mean()


@pytest.mark.parametrize("name", list(BUILDS))
def test_loaded_checkpoint_saves_elsewhere_and_loads_the_same(built, tmp_path, name):
    """load -> save in another folder -> load: a merged LoRA becomes a full checkpoint."""
    import torch

    first = load_checkpoint(built[name][0])
    again = load_checkpoint(save_checkpoint(first, tmp_path / "elsewhere" / "copy"))
    assert again.info.classes == first.info.classes and again.info.normalization == first.info.normalization
    assert again.info.adapter is None and again.info.base is None
    if name == "stable-diffusion-lora":
        assert (tmp_path / "elsewhere" / "copy" / "unet").is_dir()
        assert again.info.provenance["merged_from"]["adapter"] == "lora"
    else:
        assert again.info == first.info
    assert torch.equal(_forward(again.unet, again.info, again.class_embeddings),
                       _forward(first.unet, first.info, first.class_embeddings))


def test_saving_a_delta_elsewhere_keeps_finding_its_base(built, tmp_path):
    import torch

    folder, saved = built["stable-diffusion-lora"]
    delta = replace(saved, path=folder)  # as if it had been read from `folder`, still unmerged
    moved = save_checkpoint(delta, tmp_path / "a" / "b" / "moved")
    assert (moved / "unet_lora" / "adapter_model.safetensors").is_file() and not (moved / "unet").exists()
    info = _info_dict(moved)
    assert not Path(info["base"]).is_absolute()
    assert (moved / info["base"]).resolve() == (folder / saved.info.base).resolve()
    original, copy = load_checkpoint(folder), load_checkpoint(moved)
    assert torch.equal(_forward(copy.unet, copy.info, copy.class_embeddings),
                       _forward(original.unet, original.info, original.class_embeddings))


def test_read_info_accepts_the_json_file_itself(built):
    folder, saved = built["pixel"]
    assert read_info(folder / INFO_FILE) == saved.info


# -- checkpoint ids ----------------------------------------------------------------------


def test_checkpoint_id_is_stable_and_follows_the_description(copy_of):
    folder = copy_of("pixel")
    first, second = load_checkpoint(folder).id, load_checkpoint(folder).id
    assert first == second == checkpoint_id(folder)
    data = _info_dict(folder)
    data["provenance"]["note"] = "retrained"
    _write_info(folder, data)
    changed = load_checkpoint(folder).id
    assert changed != first
    assert changed.split("@")[0] == first.split("@")[0] == folder.name


def _same_size_other_weights(folder: Path) -> None:
    """Change the last weight bytes in place: same size, still a valid file, other weights."""
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)
    weights.write_bytes(bytes(data))


def test_checkpoint_id_follows_the_weights_contents_not_their_size(built, tmp_path):
    one, two = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(built["pixel"][0], one)
    shutil.copytree(built["pixel"][0], two)
    assert checkpoint_id(one) == checkpoint_id(two)  # the same model in two places
    _same_size_other_weights(two)
    assert checkpoint_id(one) != checkpoint_id(two)
    assert load_checkpoint(two).id == checkpoint_id(two)


def test_the_delta_id_follows_its_base_weights(copy_of, built):
    folder = copy_of("stable-diffusion-lora")
    base = Path(built["stable-diffusion-lora"][0]).parent / f"{folder.name}-base"
    shutil.copytree(base, folder.parent / base.name)
    first = load_checkpoint(folder).id
    _same_size_other_weights(folder.parent / base.name)
    assert load_checkpoint(folder).id != first


def test_file_hashes_are_cached_against_size_and_mtime(copy_of, tmp_path, monkeypatch):
    import phenotwin.hashing

    monkeypatch.setenv("PHENOTWIN_CACHE_DIR", str(tmp_path / "cache"))
    hashed = []
    real = phenotwin.hashing._sha256
    monkeypatch.setattr(phenotwin.hashing, "_sha256", lambda file: hashed.append(file.name) or real(file))
    folder = copy_of("pixel")
    first = checkpoint_id(folder)
    assert "diffusion_pytorch_model.safetensors" in hashed and INFO_FILE in hashed
    hashed.clear()
    assert checkpoint_id(folder) == first and hashed == []  # a large model opens without reading its weights
    _same_size_other_weights(folder)
    assert checkpoint_id(folder) != first and hashed == ["diffusion_pytorch_model.safetensors"]
    assert not any("hash" in p.name for p in folder.rglob("*"))  # the cache is not kept in the model folder


def test_an_unwritable_hash_cache_only_costs_time(copy_of, tmp_path, monkeypatch):
    folder = copy_of("pixel")
    expected = checkpoint_id(folder)
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("PHENOTWIN_CACHE_DIR", str(tmp_path / "not-a-folder"))
    assert checkpoint_id(folder) == expected
    (tmp_path / "cache" / "file-hashes").mkdir(parents=True)
    monkeypatch.setenv("PHENOTWIN_CACHE_DIR", str(tmp_path / "cache"))
    checkpoint_id(folder)
    for cached in (tmp_path / "cache" / "file-hashes").iterdir():
        cached.write_text("{corrupt")
    assert checkpoint_id(folder) == expected


def test_a_read_only_model_folder_loads(copy_of):
    folder = copy_of("pixel")
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
    for path in modes:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        assert load_checkpoint(folder).id == checkpoint_id(folder)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def test_image_size_is_checked_against_the_unet_and_the_vae(copy_of):
    for name, size, phrase in (("pixel", 4096, "sample_size 32"), ("latent", 128, "x 2, the VAE's factor")):
        folder = copy_of(name)
        data = _info_dict(folder)
        data["image_size"] = size
        _write_info(folder, data)
        with pytest.raises(CheckpointError, match=f"image_size {size}") as err:
            load_checkpoint(folder)
        assert phrase in str(err.value) and "Set image_size" in str(err.value)


# -- refusals with a message that names the problem and the fix ------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "nowhere")
    _assert_problem_and_fix(err, "does not exist", "check the path")


def test_a_file_instead_of_a_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(file)
    _assert_problem_and_fix(err, "is a file", "select the folder")


def test_missing_json(copy_of):
    folder = copy_of("pixel")
    (folder / INFO_FILE).unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    _assert_problem_and_fix(err, f"has no {INFO_FILE}", "select the folder written by")


def test_corrupt_json(copy_of):
    folder = copy_of("pixel")
    (folder / INFO_FILE).write_text('{"kind": "pixel", "classes": [', encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        read_info(folder)
    _assert_problem_and_fix(err, "corrupt", "restore it")


def test_binary_garbage_json(copy_of):
    folder = copy_of("pixel")
    (folder / INFO_FILE).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError) as err:
        read_info(folder)
    _assert_problem_and_fix(err, "corrupt", "restore it")


def test_json_that_is_a_list(copy_of):
    folder = copy_of("pixel")
    _write_info(folder, [_info_dict(folder)])
    with pytest.raises(CheckpointError) as err:
        read_info(folder)
    _assert_problem_and_fix(err, "expected a JSON object", "restore it")


@pytest.mark.parametrize(
    ("change", "problem", "fix"),
    [
        ({"kind": "gan"}, "kind 'gan'", "pixel, latent, stable-diffusion"),
        ({"classes": ["control"]}, "at least two classes", "list every condition"),
        ({"format_version": 99}, "format version 99 is newer", "upgrade napari-phenotwin"),
    ],
)
def test_invalid_description(copy_of, change, problem, fix):
    folder = copy_of("pixel")
    _write_info(folder, {**_info_dict(folder), **change})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    _assert_problem_and_fix(err, problem, fix)


def test_missing_required_field(copy_of):
    folder = copy_of("pixel")
    data = _info_dict(folder)
    del data["classes"]
    _write_info(folder, data)
    with pytest.raises(CheckpointError, match="missing classes"):
        read_info(folder)


@pytest.mark.parametrize("name", ["Treated", "mutant", 2, -1, True])
def test_unknown_class(built, name):
    info = built["pixel"][1].info
    with pytest.raises(CheckpointError) as err:
        info.class_index(name)
    _assert_problem_and_fix(err, f"unknown condition {name!r}", "pick one of those")
    assert "'control', 'treated'" in str(err.value)


def test_known_classes_by_name_and_index(built):
    info = built["pixel"][1].info
    assert [info.class_index("control"), info.class_index("treated"), info.class_index(1)] == [0, 1, 1]


def test_missing_unet_folder(copy_of):
    folder = copy_of("pixel")
    shutil.rmtree(folder / "unet")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    _assert_problem_and_fix(err, "missing UNet folder", "copy it again")


def test_unet_folder_without_safetensors(copy_of):
    folder = copy_of("pixel")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    _assert_problem_and_fix(err, "no .safetensors file", "copy it again")


class _Trap:
    """Unpickling this creates a marker file: proof that the pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_trap_is_armed(tmp_path):
    """Guard for the next test: loading this pickle really runs code."""
    import torch

    marker = tmp_path / "ran"
    torch.save({"weight": _Trap(marker)}, tmp_path / "w.pt")
    torch.load(tmp_path / "w.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "where",
    ["pytorch_model.bin", "unet/diffusion_pytorch_model.bin", "model.ckpt", "vae/deeper/weights.pt", "unet/extra.PT"],
)
def test_pickled_weights_are_refused_and_never_unpickled(copy_of, tmp_path, where):
    import torch

    folder = copy_of("latent")
    marker = tmp_path / "pickle-was-executed"
    file = folder / where
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": _Trap(marker)}, file)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    _assert_problem_and_fix(err, f"refusing to load {file}", "convert it")
    assert "safetensors" in str(err.value)
    assert not marker.exists()


def test_pickle_in_the_lora_base_is_refused(copy_of, built, tmp_path):
    import torch

    folder = copy_of("stable-diffusion-lora")
    base = tmp_path / "base"
    shutil.copytree((built["stable-diffusion-lora"][0] / _info_dict(folder)["base"]).resolve(), base)
    _write_info(folder, {**_info_dict(folder), "base": str(base)})
    marker = tmp_path / "pickle-was-executed"
    torch.save({"weight": _Trap(marker)}, base / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load .*diffusion_pytorch_model.bin"):
        load_checkpoint(folder)
    assert not marker.exists()


def test_lora_base_missing(copy_of):
    folder = copy_of("stable-diffusion-lora")  # copied without its base beside it
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    _assert_problem_and_fix(err, "adapts the base model", "put the base model there")
    assert "edit 'base'" in str(err.value)


def test_stable_diffusion_class_embeddings_must_match_the_classes(copy_of):
    import torch
    from safetensors.torch import save_file

    folder = copy_of("stable-diffusion")
    save_file({"class_embeddings": torch.zeros(5, 4, 32)}, folder / "class_embeddings.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    _assert_problem_and_fix(err, "holds 5 class embeddings", "copy")
    assert "2 classes" in str(err.value)


# -- saving ---------------------------------------------------------------------------


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_save_refuses_an_existing_folder_without_overwrite(built, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(built["pixel"][1], target)
    _assert_problem_and_fix(err, "already exists", "overwrite=True")
    assert (target / "keep.txt").read_text() == "mine"
    assert _leftovers(tmp_path, "model") == []


def test_save_with_overwrite_replaces_the_model_and_keeps_the_users_files(built, tmp_path):
    target = save_checkpoint(built["pixel"][1], tmp_path / "model")
    (target / "notes.txt").write_text("mine")
    other = built["latent"][1]
    save_checkpoint(other, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"  # phenotwin replaces only what it wrote
    assert read_info(target).kind == "latent"
    assert load_checkpoint(target).vae is not None
    assert _leftovers(tmp_path, "model") == []


def test_failed_save_leaves_nothing_behind(built, tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    # class embeddings are written after the scheduler, UNet and VAE: a failure midway
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(built["stable-diffusion"][1], tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(built, tmp_path, monkeypatch):
    import safetensors.torch

    target = save_checkpoint(built["pixel"][1], tmp_path / "model")
    before = _info_dict(target)
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(built["stable-diffusion"][1], target, overwrite=True)
    assert _info_dict(target) == before
    load_checkpoint(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failed_swap_restores_the_old_checkpoint(built, tmp_path, monkeypatch):
    """The last rename failing must not lose the checkpoint that was there."""
    import phenotwin.checkpoint as module

    target = save_checkpoint(built["pixel"][1], tmp_path / "model")
    before = _info_dict(target)
    real_replace = os.replace

    def flaky(src, dst):
        if Path(src).name.startswith(".model.") and Path(dst) == target and ".old-" not in Path(src).name:
            raise OSError("rename failed")
        return real_replace(src, dst)

    (target / "training").mkdir()
    (target / "training" / "state.txt").write_text("step 500")
    monkeypatch.setattr(module.os, "replace", flaky)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(built["latent"][1], target, overwrite=True, keep=("training",))
    monkeypatch.undo()
    assert _info_dict(target) == before
    assert (target / "training" / "state.txt").read_text() == "step 500"  # kept entries are not lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_overwrite_carries_kept_entries_over(built, tmp_path):
    target = save_checkpoint(built["pixel"][1], tmp_path / "model")
    (target / "training").mkdir()
    (target / "training" / "state.txt").write_text("step 500")
    (target / "stale.txt").write_text("old")
    save_checkpoint(built["latent"][1], target, overwrite=True, keep=("training", "absent"))
    assert (target / "training" / "state.txt").read_text() == "step 500"
    assert (target / "stale.txt").read_text() == "old" and read_info(target).kind == "latent"  # not phenotwin's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# -- laziness ---------------------------------------------------------------------------


def test_read_info_does_not_import_torch(built):
    folder = built["stable-diffusion-lora"][0]
    code = (
        "import sys\n"
        "from phenotwin.checkpoint import read_info\n"
        f"info = read_info({str(folder)!r})\n"
        "assert info.adapter == 'lora', info\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'peft', 'safetensors.torch') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""




def test_saved_models_and_results_follow_the_umask_not_tempfiles_private_mode(built, tmp_path):
    """Atomic writes go through tempfile (0600/0700); the lab must still be able to read the results."""
    import numpy as np

    from phenotwin.io import write_tiff

    old = os.umask(0o022)
    try:
        model = save_checkpoint(load_checkpoint(built["pixel"][0]), tmp_path / "shared-model")
        image = write_tiff(tmp_path / "result.ome.tif", np.zeros((2, 8, 8), np.uint16), axes="CYX")
    finally:
        os.umask(old)
    assert model.stat().st_mode & 0o777 == 0o755
    assert (model / INFO_FILE).stat().st_mode & 0o777 == 0o644
    assert image.stat().st_mode & 0o777 == 0o644
