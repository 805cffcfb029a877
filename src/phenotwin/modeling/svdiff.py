"""SVDiff fine-tuning: train only shifts of the singular values of each weight matrix.

W = U diag(S) V^T is decomposed once; training learns a shift d with W' = U diag(relu(S + d)) V^T.
The delta is one number per singular value (a few thousand numbers for a compact UNet), which is
why Phen-LDiff found it resists memorising small data sets. peft has no SVDiff, so this small
module is written here; it uses torch's own parametrization machinery.
"""

from __future__ import annotations

import os

import torch
from torch.nn.utils import parametrize

DELTA_SUFFIX = ".spectral_shift"
CLASS_EMBEDDING_KEY = "class_embedding.weight"


class SpectralShift(torch.nn.Module):
    """Parametrization of a Linear/Conv2d weight by a shift of its singular values."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        u, s, vh = torch.linalg.svd(weight.detach().float().reshape(weight.shape[0], -1), full_matrices=False)
        self.register_buffer("u", u)
        self.register_buffer("s", s)
        self.register_buffer("vh", vh)
        self.shape = tuple(weight.shape)
        self.delta = torch.nn.Parameter(torch.zeros_like(s))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        shifted = torch.relu(self.s + self.delta)
        return ((self.u * shifted) @ self.vh).reshape(self.shape).to(weight.dtype)


def _targets(unet: torch.nn.Module):
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and min(module.weight.shape[0], module.weight[0].numel()) > 1:
            yield name, module


def add_spectral_shifts(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze nothing, add a trainable spectral shift to every Linear and Conv2d weight; return the shifts."""
    shifts = []
    for _, module in list(_targets(unet)):
        parametrize.register_parametrization(module, "weight", SpectralShift(module.weight))
        shifts.append(module.parametrizations.weight[0].delta)
    return shifts


def spectral_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The delta only: shifts per weight, plus the class embedding when it was trained."""
    state = {}
    for name, module in unet.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            state[name + DELTA_SUFFIX] = module.parametrizations.weight[0].delta.detach().float().cpu().contiguous()
    embedding = getattr(unet, "class_embedding", None)
    if isinstance(embedding, torch.nn.Embedding):
        state[CLASS_EMBEDDING_KEY] = embedding.weight.detach().float().cpu().contiguous()
    return state


def save_svdiff(unet: torch.nn.Module, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    save_file(spectral_state(unet), str(path))


def load_svdiff_into(unet: torch.nn.Module, path: str | os.PathLike) -> None:
    """Apply saved shifts to a base UNet in place (merged: inference costs what the base costs)."""
    from safetensors.torch import load_file

    from phenotwin.errors import CheckpointError
    from phenotwin.modeling.conditioning import resize_class_embedding

    if not os.path.isfile(path):
        raise CheckpointError(f"missing SVDiff weights {path}. The checkpoint is incomplete: copy it again.")
    state = load_file(str(path))
    if CLASS_EMBEDDING_KEY in state:
        resize_class_embedding(unet, state[CLASS_EMBEDDING_KEY].shape[0])
        with torch.no_grad():
            unet.class_embedding.weight.copy_(state.pop(CLASS_EMBEDDING_KEY))
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for key, delta in state.items():
            name = key[: -len(DELTA_SUFFIX)]
            module = modules.get(name)
            if module is None or not key.endswith(DELTA_SUFFIX):
                raise CheckpointError(f"{path} holds {key!r}, which does not match the base model. Wrong base?")
            shift = SpectralShift(module.weight)
            if shift.delta.shape != delta.shape:
                raise CheckpointError(f"{path}: shift for {name} has shape {tuple(delta.shape)}, the base needs "
                                      f"{tuple(shift.delta.shape)}. Wrong base model?")
            shift.delta.copy_(delta)
            module.weight.copy_(shift(module.weight))
