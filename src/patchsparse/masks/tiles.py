"""Tile grids over a weight matrix, including ragged edges, and the choice of dense tiles.

A weight (out, in) is cut into tiles of (rows, cols); when a dimension is not a multiple of the
tile size the last tile row/column is smaller. Densities are always counted in weights, so a
small edge tile weighs less than a full one.

A layer whose dense tiles hold a fraction f of its weights has density 0.5 + 0.5·f, so a target
sparsity s needs f = 1 − 2s (docs/METHOD.md §3.3). One greedy rule, `choose_dense_tiles`, picks
dense tiles both for PATCH's tile prior (`initial_dense_tiles`, one layer) and for extraction
(`patchsparse.extract.exact_tiles`, all layers at once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from patchsparse.errors import PatchsparseError


def check_tile_size(rows: int, cols: int) -> None:
    if rows < 1 or cols < 4 or cols % 4:
        raise PatchsparseError(f"tile size {rows}x{cols} is invalid: rows >= 1 and columns a multiple of 4")


@dataclass(frozen=True)
class TileGrid:
    out_features: int
    in_features: int
    rows: int  # tile height (along out_features)
    cols: int  # tile width (along in_features)

    def __post_init__(self) -> None:
        check_tile_size(self.rows, self.cols)

    @classmethod
    def for_weight(cls, weight: torch.Tensor, tile: tuple[int, int]) -> "TileGrid":
        """Tile sizes larger than the weight are clipped to it (a single tile)."""
        out_f, in_f = weight.shape
        return cls(out_f, in_f, min(tile[0], out_f), min(tile[1], in_f) if in_f % 4 == 0 else tile[1])

    @property
    def shape(self) -> tuple[int, int]:
        """(R, C): number of tile rows and tile columns."""
        return math.ceil(self.out_features / self.rows), math.ceil(self.in_features / self.cols)

    @property
    def divides(self) -> bool:
        return self.out_features % self.rows == 0 and self.in_features % self.cols == 0

    def row_sizes(self) -> torch.Tensor:
        return _sizes(self.out_features, self.rows)

    def col_sizes(self) -> torch.Tensor:
        return _sizes(self.in_features, self.cols)

    def tile_numel(self) -> torch.Tensor:
        """Number of weights in each tile. -> (R, C) int64"""
        return self.row_sizes()[:, None] * self.col_sizes()[None, :]

    def expand(self, tile_values: torch.Tensor) -> torch.Tensor:
        """Tile values (R, C) -> weight-shaped (out, in). Materialises; for extraction and tests."""
        rows = tile_values.repeat_interleave(self.rows, dim=0)[: self.out_features]
        return rows.repeat_interleave(self.cols, dim=1)[:, : self.in_features]

    def reduce_sum(self, weight_shaped: torch.Tensor) -> torch.Tensor:
        """Sum a weight-shaped tensor within each tile. (out, in) -> (R, C)"""
        R, C = self.shape
        pad_r = R * self.rows - self.out_features
        pad_c = C * self.cols - self.in_features
        x = weight_shaped
        if pad_r or pad_c:
            x = torch.nn.functional.pad(x, (0, pad_c, 0, pad_r))
        return x.reshape(R, self.rows, C, self.cols).sum(dim=(1, 3))


def _sizes(total: int, step: int) -> torch.Tensor:
    sizes = torch.full((math.ceil(total / step),), step, dtype=torch.long)
    sizes[-1] = total - step * (sizes.numel() - 1)
    return sizes


def check_hybrid_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 0.5:
        raise PatchsparseError(f"target sparsity {sparsity} is outside [0, 0.5], the range a dense/2:4 mix can reach")


def dense_fraction_for_sparsity(sparsity: float) -> float:
    check_hybrid_sparsity(sparsity)
    return 1.0 - 2.0 * sparsity


def choose_dense_tiles(scores: torch.Tensor, weights: torch.Tensor, target: float) -> torch.Tensor:
    """Rank tiles by score, add up their weights, stop nearest the target. flat (n,), (n,) -> bool (n,)

    `weights[i]` is what tile i adds when made dense. Ties in score go to the earlier tile, so the
    result is deterministic; the count k of dense tiles (0..n) minimises |Σ_{first k} weights − target|.
    """
    flat_scores = scores.reshape(-1).to(torch.float64)
    order = torch.sort(flat_scores, descending=True, stable=True).indices
    sizes = weights.reshape(-1).to(torch.float64)[order]
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(sizes, 0)])
    count = int(torch.argmin((cumulative - target).abs()))
    dense = torch.zeros(flat_scores.numel(), dtype=torch.bool)
    dense[order[:count]] = True
    return dense


def initial_dense_tiles(scores: torch.Tensor, grid: TileGrid, sparsity: float) -> torch.Tensor:
    """Mark tiles dense in order of score until their weights best match the target. (R, C) -> bool (R, C)

    Ties in score go to the earlier tile (row-major), so the result is deterministic.
    """
    target_weights = dense_fraction_for_sparsity(sparsity) * grid.out_features * grid.in_features
    return choose_dense_tiles(scores, grid.tile_numel(), target_weights).view(grid.shape)


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
