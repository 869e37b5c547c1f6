"""The learned masks attached to a model, as extraction sees them.

Mask learning (`patchsparse.learn`) attaches one `LearnedMask` per linear as a parametrization of
its weight; extraction (`patchsparse.extract`) turns them into a `HybridMaskSpec`. This base class
and `find_masks` are what the two share, so that extraction need not import the learning code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from patchsparse.masks.tiles import TileGrid


class LearnedMask(nn.Module):
    """A linear's learnable mask: what extraction reads (the learning code subclasses it).

    `pattern_logits` (out, in/4, 6) in maskllm / patch-joint mode, else a frozen `sparse_keep`
    2:4 mask (out, in); `tile_logits` (R, C) over `grid` in the patch modes, else None.
    """

    grid: TileGrid | None
    pattern_logits: nn.Parameter | None
    tile_logits: nn.Parameter | None
    sparse_keep: torch.Tensor | None

    @property
    def numel(self) -> int:
        raise NotImplementedError


def find_masks(model: nn.Module) -> dict[str, LearnedMask]:
    """Every LearnedMask attached to the model, by the full name of its linear."""
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, LearnedMask):
                    found[name] = p
    return found
