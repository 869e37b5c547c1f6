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


# How far a one-shot hybrid prior may land from its target sparsity before it is refused.
TILE_TARGET_TOLERANCE = 0.01


def reachable_hybrid_sparsity(shapes: list[tuple[int, int]], tile: tuple[int, int], sparsity: float) -> float:
    """The sparsity whole dense tiles of `tile` reach when each layer takes its closest count (ties row-major).

    Layer by layer the dense share is rounded to whole tiles; a tile as large as the layer rounds
    it to all-dense or all-2:4, which can land far from the target.
    """
    kept = total = 0.0
    for out_features, in_features in shapes:
        grid = TileGrid(out_features, in_features, *tile)  # as the one-shot prior cuts it
        dense = initial_dense_tiles(torch.zeros(grid.shape), grid, sparsity)
        dense_weights = float(grid.tile_numel()[dense].sum())
        numel = out_features * in_features
        kept += dense_weights + 0.5 * (numel - dense_weights)
        total += numel
    return 1.0 - kept / total


def check_tile_reaches_target(shapes: list[tuple[int, int]], tile: tuple[int, int], sparsity: float) -> None:
    """Refuse a tile size too coarse for these layers to reach `sparsity` (before any pruning work)."""
    reached = reachable_hybrid_sparsity(shapes, tile, sparsity)
    if abs(reached - sparsity) > TILE_TARGET_TOLERANCE:
        smallest = min(shapes, key=lambda s: s[0] * s[1])
        raise PatchsparseError(
            f"tile {tile[0]}x{tile[1]} is too coarse for these layers (the smallest is {smallest[0]}x{smallest[1]}): "
            f"whole dense tiles reach {reached:.1%} sparsity, not the target {sparsity:.1%}; use a smaller --tile")
