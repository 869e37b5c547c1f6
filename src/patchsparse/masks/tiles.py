"""Tile grids over a weight matrix, including ragged edges.

A weight (out, in) is cut into tiles of (rows, cols); when a dimension is not a multiple of the
tile size the last tile row/column is smaller. Densities are always counted in weights, so a
small edge tile weighs less than a full one.
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
