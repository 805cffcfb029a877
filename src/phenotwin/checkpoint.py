"""The on-disk checkpoint format: a folder with `phenotwin.json` and diffusers components.

```
my-model/
  phenotwin.json                 format version, kind, classes, size, channels, normalisation,
                                 default inference settings, provenance, base + adapter
  scheduler/scheduler_config.json
  unet/                          diffusers `save_pretrained` (safetensors)  -- or, for a delta:
  unet_lora/                     peft adapter (adapter_model.safetensors) over the base's UNet
  vae/                           latent and stable-diffusion kinds
  class_embeddings.safetensors   stable-diffusion kind: one learned context per class (+ null)
```

Only safetensors are ever loaded: a model folder shared between labs must not be able to
run code, and pickled weights (`.bin`, `.ckpt`, `.pt`, ...) can.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phenotwin.checkpoint_info import (  # noqa: F401  (part of this module's interface)
    ADAPTERS,
    FORMAT_VERSION,
    INFO_FILE,
    KINDS,
    CheckpointInfo,
    read_info,
)
from phenotwin.errors import CheckpointError
from phenotwin.io import shareable_mode

if TYPE_CHECKING:  # torch and diffusers are imported lazily, when a model is really loaded
    import torch

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CLASS_EMBEDDINGS_FILE = "class_embeddings.safetensors"
# Optimizer state, logs and sample grids of the run that wrote the model. Never loaded as
# part of the model (accelerate stores its optimizer state pickled), so not shipped either.
TRAINING_DIR = "training"
# Safetensors only. And no low_cpu_mem_usage: diffusers then builds the model inside accelerate's
# init_empty_weights, which patches torch.nn.Module for the whole process while it runs, so
# a model created meanwhile on another thread (napari loads models in workers) gets empty
# "meta" weights. Seen as "Cannot copy out of meta tensor" in a clean-clone test run.
SAFE_LOAD = {"use_safetensors": True, "low_cpu_mem_usage": False}


@dataclass
class Checkpoint:
    """A loaded model: its info and its torch modules (on CPU, float32, until moved)."""

    info: CheckpointInfo
    unet: torch.nn.Module
    scheduler_config: dict[str, Any]
    vae: torch.nn.Module | None = None
    class_embeddings: torch.Tensor | None = None
    path: Path | None = None
    id: str = "unsaved"


def refuse_pickles(folder: Path, subfolders: tuple[str, ...] | None = None) -> None:
    roots = [folder] if subfolders is None else [folder / s for s in subfolders]
    for root in roots:
        if not root.exists():
            continue
        for file in sorted(root.rglob("*")):
            if TRAINING_DIR in file.relative_to(folder).parts[:1]:
                continue
            if file.suffix.lower() in PICKLE_SUFFIXES and file.is_file():
                raise CheckpointError(
                    f"refusing to load {file}: pickled weight files can run arbitrary code when loaded. "
                    "phenotwin loads only safetensors. Convert it where you trust its origin "
                    "(load it there and call save_pretrained(..., safe_serialization=True)), then delete it."
                )


def require_weights(component: Path, what: str, config: str | None = "config.json") -> None:
    """Check the files are there before diffusers looks: for a missing file it would try the
    model hub and say it "couldn't connect", which is not the problem."""
    if not component.is_dir():
        raise CheckpointError(f"missing {what} folder {component}. The checkpoint is incomplete: copy it again.")
    if config is not None and not (component / config).is_file():
        raise CheckpointError(f"missing {component / config} ({what} configuration). The checkpoint is incomplete: "
                              "copy it again.")
    if not any(component.glob("*.safetensors")):
        raise CheckpointError(
            f"missing {what} weights: {component} has no .safetensors file. The checkpoint is incomplete: copy it again."
        )


@contextmanager
def _loading(what: str, path: Path):
    """Any failure to decode a component (truncated safetensors, a broken config) is a damaged
    copy to the user, whatever library raised it."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"cannot load the {what} from {path}: {err}. The file is damaged or incomplete: "
                              "copy the checkpoint folder again.") from err


def _resolve_base(folder: Path, info: CheckpointInfo) -> Path:
    base = Path(info.base).expanduser()
    if not base.is_absolute():
        base = (folder / base).resolve()
    if not base.is_dir():
        raise CheckpointError(
            f"this {info.adapter} checkpoint adapts the base model {info.base!r}, which is not at {base}. "
            "Put the base model there, or edit 'base' in phenotwin.json to point at it."
        )
    return base


def checkpoint_id(folder: Path, base: Path | None = None) -> str:
    """The checkpoint's name plus a hash of the contents of every file that makes the model
    (phenotwin.json, configs, weights; the base's too for a delta; not training/ nor hidden files):
    other weights of the same size are another model. File hashes are cached (`hashing`)."""
    from phenotwin.hashing import file_digests

    digest = hashlib.sha256()
    for root in (folder, base) if base is not None else (folder,):
        for name, file_digest in file_digests(root, skip=(TRAINING_DIR,)).items():
            digest.update(f"{name}:{file_digest}\n".encode())
    return f"{folder.name}@{digest.hexdigest()[:10]}"


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a checkpoint folder (safetensors only) onto the CPU in float32."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel
    from safetensors.torch import load_file

    folder = Path(path)
    if folder.is_file() and folder.name == INFO_FILE:
        folder = folder.parent
    info = read_info(folder)
    refuse_pickles(folder)

    component_root = folder
    if info.adapter is not None:
        component_root = _resolve_base(folder, info)
        refuse_pickles(component_root, ("unet", "vae"))

    unet_class = UNet2DConditionModel if info.kind == "stable-diffusion" else UNet2DModel
    require_weights(component_root / "unet", "UNet")
    with _loading("UNet", component_root / "unet"):
        unet = unet_class.from_pretrained(component_root / "unet", **SAFE_LOAD)

    if info.adapter == "lora":
        from peft import PeftModel

        require_weights(folder / "unet_lora", "LoRA adapter", config="adapter_config.json")
        if info.kind != "stable-diffusion":
            from phenotwin.modeling.conditioning import resize_class_embedding

            resize_class_embedding(unet, len(info.classes) + 1)  # the adapter carries the trained rows
        # Merged once at load time: inference then costs exactly what the base model costs.
        with _loading("LoRA adapter", folder / "unet_lora"):
            unet = PeftModel.from_pretrained(unet, folder / "unet_lora").merge_and_unload()
    elif info.adapter == "svdiff":
        from phenotwin.modeling.svdiff import load_svdiff_into

        with _loading("SVDiff spectral shifts", folder / "unet_svdiff.safetensors"):
            load_svdiff_into(unet, folder / "unet_svdiff.safetensors")

    vae = None
    if info.kind in ("latent", "stable-diffusion"):
        vae_root = folder if (folder / "vae").is_dir() else component_root
        require_weights(vae_root / "vae", "VAE")
        with _loading("VAE", vae_root / "vae"):
            vae = AutoencoderKL.from_pretrained(vae_root / "vae", **SAFE_LOAD)

    class_embeddings = None
    if info.kind == "stable-diffusion":
        file = folder / CLASS_EMBEDDINGS_FILE
        if not file.is_file():
            raise CheckpointError(
                f"missing {file}: a stable-diffusion checkpoint needs one learned embedding per condition. "
                "The checkpoint is incomplete: copy it again."
            )
        with _loading("class embeddings", file):
            class_embeddings = load_file(file)["class_embeddings"].to(torch.float32)
        expected = info.label_count
        if class_embeddings.shape[0] != expected:
            raise CheckpointError(
                f"{file} holds {class_embeddings.shape[0]} class embeddings but phenotwin.json lists "
                f"{len(info.classes)} classes (+1 null" + (", per batch and unknown batch" if info.batches else "")
                + f" = {expected}). The files do not belong together: "
                "copy the whole checkpoint folder again."
            )

    scheduler_root = folder if (folder / "scheduler").is_dir() else component_root
    schedule_file = scheduler_root / "scheduler" / "scheduler_config.json"
    if not schedule_file.is_file():
        raise CheckpointError(f"missing {schedule_file} (the noise schedule). The checkpoint is incomplete: "
                              "copy it again.")
    with _loading("noise schedule", schedule_file):
        scheduler_config = dict(DDIMScheduler.load_config(scheduler_root / "scheduler"))

    _check_shapes(info, unet, vae)
    unet.eval()
    if vae is not None:
        vae.eval()
    return Checkpoint(
        info=info,
        unet=unet,
        scheduler_config=scheduler_config,
        vae=vae,
        class_embeddings=class_embeddings,
        path=folder,
        id=checkpoint_id(folder, component_root if info.adapter is not None else None),
    )


def _check_shapes(info: CheckpointInfo, unet: Any, vae: Any) -> None:
    """phenotwin.json against the networks it describes: every image is padded to image_size, so
    a wrong one costs memory with its square (a 16 px UNet told 4096 pads to 4096² and fills the
    memory). Fine-tuning may change the size from the UNet's native one (its config's sample_size
    times the VAE factor): SD's 512 px UNet is fine-tuned at 128 px, or at 768 px, so up to twice
    the native size is accepted, and image_size must split into whole latent (and UNet) levels."""
    from phenotwin.modeling.conditioning import vae_downsampling

    factor = vae_downsampling(vae) if vae is not None else 1
    sample = unet.config.sample_size
    native = factor * (sample if isinstance(sample, int) else max(sample))
    # UNet2DModel needs whole levels; UNet2DConditionModel (stable-diffusion) pads odd sizes itself.
    multiple = factor * (2 ** (len(unet.config.block_out_channels) - 1) if info.kind != "stable-diffusion" else 1)
    if info.image_size > 2 * native or info.image_size % multiple:
        raise CheckpointError(
            f"phenotwin.json says image_size {info.image_size} but the UNet works on {native} px images "
            f"(sample_size {sample}" + (f" x {factor}, the VAE's factor" if factor > 1 else "") + "): every image "
            f"would be padded to {info.image_size}x{info.image_size}. Set image_size to the size the model was "
            f"trained at (a multiple of {multiple}, at most {2 * native}; {native} for this UNet), or copy the "
            "checkpoint folder again."
        )
    if info.kind == "pixel":
        if unet.config.in_channels != info.channels:
            raise CheckpointError(
                f"phenotwin.json says {info.channels} channels but the UNet takes {unet.config.in_channels}."
            )
        if (unet.config.num_class_embeds or 0) < info.label_count:
            raise CheckpointError(
                f"the UNet has {unet.config.num_class_embeds} class embeddings; {len(info.classes)} classes + null"
                + (f", for each of {len(info.batches)} batches and an unknown one," if info.batches else "")
                + f" need {info.label_count}."
            )
    elif vae is not None and vae.config.latent_channels != unet.config.in_channels:
        raise CheckpointError(
            f"the VAE makes {vae.config.latent_channels}-channel latents but the UNet takes {unet.config.in_channels}."
        )


def save_checkpoint(
    checkpoint: Checkpoint, path: str | os.PathLike, overwrite: bool = False, keep: tuple[str, ...] = ()
) -> Path:
    """Write a checkpoint folder atomically: a reader sees the old folder or the new one, never half.

    Entries of an existing folder named in `keep` (e.g. the training state) are carried over,
    and so is everything phenotwin did not write (see `foreign_entries`): overwriting replaces
    only phenotwin's own files, listed in the folder's manifest.
    """
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    target = Path(path)
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target} already exists. Choose another folder or pass overwrite=True.")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file, not a folder; a checkpoint is a folder. Choose another path.")
    foreign = [name for name in foreign_entries(target) if name not in keep]
    clashes = [name for name in foreign if name in MODEL_ENTRIES]
    if clashes:
        raise CheckpointError(
            f"{target} holds {', '.join(clashes)}, which phenotwin did not write but a checkpoint would. "
            "Nothing was changed: choose another folder, or move those out of it first."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    info = _info_to_write(checkpoint, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{STAGING_MARK}", dir=target.parent))
    staging.chmod(shareable_mode(directory=True))  # mkdtemp's 0700 would hide the model from the lab
    carried = [name for name in (*keep, *foreign) if (target / name).exists() or (target / name).is_symlink()]
    try:
        (staging / INFO_FILE).write_text(info.to_json(), encoding="utf-8")
        DDIMScheduler.from_config(checkpoint.scheduler_config).save_pretrained(staging / "scheduler")
        if info.adapter == "lora":
            checkpoint.unet.save_pretrained(staging / "unet_lora", safe_serialization=True)
        elif info.adapter == "svdiff":
            from phenotwin.modeling.svdiff import save_svdiff

            save_svdiff(checkpoint.unet, staging / "unet_svdiff.safetensors")
        else:
            _save_model(checkpoint.unet, staging / "unet")
        if checkpoint.vae is not None and info.adapter is None:
            _save_model(checkpoint.vae, staging / "vae")
        if checkpoint.class_embeddings is not None:
            save_file(
                {"class_embeddings": checkpoint.class_embeddings.detach().float().cpu().contiguous()},
                staging / CLASS_EMBEDDINGS_FILE,
            )
        written = sorted(p.name for p in staging.iterdir())
        _write_manifest(staging, [*written, *(name for name in keep if name in carried)])
        for name in carried:
            os.replace(target / name, staging / name)
        _swap_into_place(staging, target)
    except BaseException:
        for name in carried:  # carried-over entries go back to the old folder, not into the bin
            if (staging / name).exists() and target.is_dir() and not (target / name).exists():
                os.replace(staging / name, target / name)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _save_model(model, folder: Path) -> None:
    """`save_pretrained`, without the `_name_or_path` diffusers copies from the folder the model
    was loaded from: an absolute path of the machine that trained it, which says nothing to
    the next reader (the base is named in phenotwin.json's provenance)."""
    model.save_pretrained(folder, safe_serialization=True)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.pop("_name_or_path", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _info_to_write(checkpoint: Checkpoint, target: Path) -> CheckpointInfo:
    """The info as it must read at `target`.

    A LoRA or SVDiff checkpoint comes out of `load_checkpoint` merged into its base UNet: it
    no longer holds a delta (saving "the delta" would write the whole UNet, or nothing), so
    it is written as a full checkpoint (unet/, vae/) that needs no base.
    A delta keeps naming its base; a relative `base` is re-expressed from the new folder.
    """
    info = checkpoint.info
    if info.adapter is not None and not _holds_delta(checkpoint.unet, info.adapter):
        provenance = {**info.provenance, "merged_from": {"adapter": info.adapter, "base": info.base}}
        return replace(info, adapter=None, base=None, provenance=provenance)
    if info.base and checkpoint.path is not None and not Path(info.base).expanduser().is_absolute():
        base = (Path(checkpoint.path) / info.base).resolve()
        return replace(info, base=os.path.relpath(base, target.resolve()))
    return info


def _holds_delta(unet: Any, adapter: str) -> bool:
    """Whether `unet` still carries its adapter as separate weights (not merged into the base)."""
    if adapter == "lora":
        return hasattr(unet, "peft_config")
    from torch.nn.utils import parametrize

    return any(parametrize.is_parametrized(module, "weight") for module in unet.modules())


def _swap_into_place(staging: Path, target: Path) -> None:
    """Replace `target` by `staging` with renames only, so a crash never leaves a half-written model.

    The old folder holds only phenotwin's files by now (save_checkpoint carried the rest into
    `staging`); a kill between the renames is undone by `recover_interrupted_save`."""
    if not target.exists():
        os.replace(staging, target)
        return
    retired = target.with_name(f".{target.name}.{RETIRED_MARK}{os.getpid()}")
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired, target)  # put the old checkpoint back
        raise
    shutil.rmtree(retired, ignore_errors=True)


# -- what phenotwin wrote into a model folder ----------------------------------------------

MANIFEST_FILE = ".phenotwin-manifest.json"
# Everything save_checkpoint may write at the top of a checkpoint folder.
MODEL_ENTRIES = frozenset({INFO_FILE, "scheduler", "unet", "unet_lora", "unet_svdiff.safetensors", "vae",
                           CLASS_EMBEDDINGS_FILE, MANIFEST_FILE})
STAGING_MARK = "staging-"
RETIRED_MARK = "old-"


def _write_manifest(folder: Path, entries: list[str]) -> None:
    """The top-level entries phenotwin wrote into `folder`: the only ones an overwrite may replace."""
    manifest = {"written_by": "phenotwin", "entries": sorted(set(entries) | {MANIFEST_FILE})}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def owned_entries(folder: str | os.PathLike) -> set[str]:
    """Top-level entries of `folder` that phenotwin wrote: its manifest's list, or for a checkpoint
    saved before manifests existed, the names a checkpoint has; nothing in any other folder."""
    folder = Path(folder)
    try:
        listed = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))["entries"]
        if isinstance(listed, list) and all(isinstance(name, str) for name in listed):
            return set(listed) | {MANIFEST_FILE}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return set(MODEL_ENTRIES) if (folder / INFO_FILE).is_file() else set()


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """Top-level entries of `folder` that phenotwin did not write (notes, data, results): never replaced."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    owned = owned_entries(folder)
    return sorted(p.name for p in folder.iterdir() if p.name not in owned)


def recover_interrupted_save(target: str | os.PathLike) -> list[str]:
    """Undo what a save killed midway (SIGKILL, power cut) left beside `target`; return what was tidied.

    The old folder is put back if the kill came between the two renames; entries carried into a
    staging folder (the training state, the user's files) go back into `target`; then the staging
    folder, which holds only phenotwin's half-written model, and the retired folder are removed."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    tidied = []
    retired = sorted(parent.glob(f".{target.name}.{RETIRED_MARK}*"))
    if retired and not target.exists():
        os.replace(retired.pop(), target)
    for folder in sorted(parent.glob(f".{target.name}.{STAGING_MARK}*")):
        for entry in folder.iterdir():
            if entry.name not in MODEL_ENTRIES and target.is_dir() and not (target / entry.name).exists():
                os.replace(entry, target / entry.name)
        if any(entry.name not in MODEL_ENTRIES for entry in folder.iterdir()):
            continue  # something carried that target already has again: leave it for the user to judge
        shutil.rmtree(folder)
        tidied.append(folder.name)
    for folder in retired:
        shutil.rmtree(folder)
        tidied.append(folder.name)
    return tidied
