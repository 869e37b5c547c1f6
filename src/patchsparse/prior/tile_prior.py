"""PATCH's tile prior: each layer starts with its highest-scoring tiles dense (docs/METHOD.md §3.3).

A layer whose dense tiles hold a fraction f of its weights has density 0.5 + 0.5·f, so a target
sparsity s needs f = 1 − 2s. Tiles are counted by their number of weights, which keeps ragged
edge tiles (e.g. 576 columns cut into 128-wide tiles) from being over- or under-counted.
"""

from __future__ import annotations

import torch

from patchsparse.errors import PatchsparseError
from patchsparse.masks.tiles import TileGrid


def check_hybrid_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 0.5:
        raise PatchsparseError(f"target sparsity {sparsity} is outside [0, 0.5], the range a dense/2:4 mix can reach")


def dense_fraction_for_sparsity(sparsity: float) -> float:
    check_hybrid_sparsity(sparsity)
    return 1.0 - 2.0 * sparsity


def initial_dense_tiles(scores: torch.Tensor, grid: TileGrid, sparsity: float) -> torch.Tensor:
    """Mark tiles dense in order of score until their weights best match the target. (R, C) -> bool (R, C)

    Ties in score go to the earlier tile (row-major), so the result is deterministic.
    """
    target_weights = dense_fraction_for_sparsity(sparsity) * grid.out_features * grid.in_features
    flat_scores = scores.reshape(-1).to(torch.float64)
    order = torch.sort(flat_scores, descending=True, stable=True).indices
    sizes = grid.tile_numel().reshape(-1)[order].to(torch.float64)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(sizes, 0)])
    count = int(torch.argmin((cumulative - target_weights).abs()))  # 0..n tiles, closest by weight
    dense = torch.zeros(flat_scores.numel(), dtype=torch.bool)
    dense[order[:count]] = True
    return dense.view(grid.shape)
