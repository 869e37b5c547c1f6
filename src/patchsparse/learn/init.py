"""Initial mask logits: random, or pulled toward a one-shot prior (docs/METHOD.md §3)."""

from __future__ import annotations

import torch

from patchsparse.masks.patterns import PATTERNS_2_4
from patchsparse.masks.tiles import TileGrid, initial_dense_tiles


def pattern_overlap(keep: torch.Tensor) -> torch.Tensor:
    """How many kept positions each of the six patterns shares with a mask's groups. bool (out, in) -> (out, in/4, 6) in {0,1,2}"""
    groups = keep.reshape(keep.shape[0], -1, 4).to(torch.float32)  # (out, G, 4)
    return groups @ PATTERNS_2_4.T                                  # (out, G, 6)


def init_pattern_logits(shape: tuple[int, int], prior_keep: torch.Tensor | None, std: float, strength: float,
                        generator: torch.Generator) -> torch.Tensor:
    """2:4 logits Π. With a prior, PATCH's overwrite Π = (o − 1)·σ·α: the prior's own pattern gets
    +σα, the four patterns sharing one kept position 0, the complement −σα. Without a prior (or
    with α = 0), Π ~ N(0, σ²). -> fp32 (out, in/4, 6)"""
    out_f, in_f = shape
    if prior_keep is None or strength == 0:
        return torch.randn(out_f, in_f // 4, 6, generator=generator) * std
    return (pattern_overlap(prior_keep) - 1.0) * (std * strength)


def init_tile_logits(grid: TileGrid, scores: torch.Tensor | None, sparsity: float, std: float, strength: float,
                     generator: torch.Generator) -> torch.Tensor:
    """Tile logits ℓ ~ N(0, σ²), plus +σα on the tiles the prior starts dense and −σα on the others.

    The prior's dense tiles are the highest-scoring ones whose weights make the layer's density
    the target (`initial_dense_tiles`, counted by weights). -> fp32 (R, C)
    """
    logits = torch.randn(*grid.shape, generator=generator) * std
    if scores is None or strength == 0:
        return logits
    dense = initial_dense_tiles(scores, grid, sparsity)
    return logits + torch.where(dense, 1.0, -1.0) * (std * strength)
