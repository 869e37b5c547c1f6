"""Weights of pruned linears that a mask alone cannot reproduce (SparseGPT's reconstructed weights).

A mask file plus the original model reproduces magnitude, Wanda and SparseGPT-without-update
pruning. SparseGPT's weight update changes the kept weights too, so its pruned model is the
original model with these weights loaded over the masked linears.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save

from patchsparse.errors import PatchsparseError
from patchsparse.io.atomic import atomic_write_bytes

PRUNED_WEIGHTS_FILE = "pruned_weights.safetensors"


def save_pruned_weights(model: nn.Module, names: list[str], path: Path,
                        metadata: dict[str, str] | None = None) -> None:
    """Write `{name}.weight` of each named linear (in the model's dtype) to a safetensors file."""
    modules = dict(model.named_modules())
    tensors = {f"{name}.weight": modules[name].weight.detach().cpu().contiguous() for name in names}
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


@torch.no_grad()
def load_pruned_weights(model: nn.Module, path: Path) -> list[str]:
    """Copy the saved weights into the model's linears (all shapes checked first). -> names loaded"""
    path = Path(path)
    if not path.is_file():
        raise PatchsparseError(f"pruned weights file '{path}' not found")
    tensors = load_file(str(path))
    modules = dict(model.named_modules())
    targets = {}
    for key, tensor in tensors.items():
        name = key.removesuffix(".weight")
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise PatchsparseError(f"{path.name} holds weights for '{name}', which this model does not have")
        if tuple(module.weight.shape) != tuple(tensor.shape):
            raise PatchsparseError(f"{path.name}: '{name}' has shape {tuple(tensor.shape)}, "
                                   f"the model's {tuple(module.weight.shape)}")
        targets[name] = (module, tensor)
    for module, tensor in targets.values():
        module.weight.copy_(tensor.to(module.weight.device, module.weight.dtype))
    return list(targets)
