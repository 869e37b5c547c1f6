"""Synthetic hybrid masks for kernels, tests and benchmarks: random dense tiles + magnitude 2:4.

Kernel speed depends only on where the dense tiles are, not on which tiles a trained mask would
pick, so random tiles at the target sparsity measure the same thing as a learned mask.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from patchsparse.masks import HybridMaskSpec, LayerMask, TileGrid, nm_mask_from_scores
from patchsparse.masks.tiles import initial_dense_tiles


def synthetic_layer_mask(weight: torch.Tensor, sparsity: float, tile: tuple[int, int] = (128, 128),
                         seed: int = 0) -> LayerMask:
    """2:4 by magnitude everywhere, plus random dense tiles holding a 1 − 2s share of the weights."""
    grid = TileGrid.for_weight(weight, tile)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(grid.shape, generator=generator)
    dense_tiles = initial_dense_tiles(scores, grid, sparsity)
    keep = nm_mask_from_scores(weight.detach().abs().float().cpu(), 2, 4)
    return LayerMask(sparse_keep=keep, pattern="2:4", tile=(grid.rows, grid.cols), dense_tiles=dense_tiles)


def synthetic_spec(linears: dict[str, nn.Linear], sparsity: float, tile: tuple[int, int] = (128, 128),
                   seed: int = 0) -> HybridMaskSpec:
    """A synthetic mask for every named linear (e.g. from `models.select_linears`)."""
    layers = {name: synthetic_layer_mask(module.weight, sparsity, tile, seed + i)
              for i, (name, module) in enumerate(linears.items())}
    return HybridMaskSpec(layers=layers, metadata={"source": "synthetic", "sparsity_target": sparsity,
                                                   "tile": list(tile), "seed": seed})
