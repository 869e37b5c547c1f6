"""Soft (differentiable) masks: pure functions, tensor in, tensor out (docs/METHOD.md §2).

Shapes: a weight is (out, in); its 2:4 logits are (out, in/4, 6), one 6-way vector per group of
four consecutive inputs; its tile logits are (R, C) over a `TileGrid` whose edge tiles may be
smaller. Tile values are broadcast over a tile *view* of the weight, never repeated to full size.
"""

from __future__ import annotations

import torch

from patchsparse.masks.patterns import PATTERNS_2_4
from patchsparse.masks.tiles import TileGrid


def soft_pattern_weights(logits: torch.Tensor, noise: torch.Tensor | None, kappa: float, tau: float,
                         hard: bool = False) -> torch.Tensor:
    """Gumbel-softmax over the six 2:4 patterns: softmax((κ·Π + g)/τ). (..., 6) -> (..., 6)

    With `hard`, the forward value is the one-hot arg-max and the gradient is the soft one's
    (straight-through estimator).
    """
    z = logits * kappa
    if noise is not None:
        z = z + noise
    y = torch.softmax(z / tau, dim=-1)
    if hard:
        one_hot = torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
        y = one_hot + (y - y.detach())
    return y


def soft_nm_mask(logits: torch.Tensor, noise: torch.Tensor | None, kappa: float, tau: float,
                 hard: bool = False) -> torch.Tensor:
    """Soft 2:4 mask m = y·C, a convex mix of the six patterns. (out, G, 6) -> (out, 4·G)

    Every group of four sums to exactly 2 (each pattern keeps two), so the density is 0.5 however
    soft the sample is.
    """
    y = soft_pattern_weights(logits, noise, kappa, tau, hard)   # (out, G, 6)
    m = y @ PATTERNS_2_4.to(device=y.device, dtype=y.dtype)     # (out, G, 4)
    return m.reshape(logits.shape[0], -1)


def hard_pattern_index(logits: torch.Tensor) -> torch.Tensor:
    """Inference choice: the arg-max pattern of each group (ties to the first). (out, G, 6) -> (out, G)"""
    return logits.argmax(dim=-1)


def soft_tile_values(logits: torch.Tensor, noise: torch.Tensor | None, kappa: float, tau: float,
                     hard: bool = False) -> torch.Tensor:
    """Binary Gumbel-softmax of the tile logits: σ((κ·ℓ + g₁ − g₀)/τ), the probability of 'dense'.

    `noise` is the logistic difference g₁ − g₀ (the closed form of a 2-class Gumbel-softmax over
    the logits [0, κℓ]). (R, C) -> (R, C) in [0, 1]
    """
    z = logits * kappa
    if noise is not None:
        z = z + noise
    t = torch.sigmoid(z / tau)
    if hard:
        t = (z > 0).to(t.dtype) + (t - t.detach())
    return t


def expand_tile_rows(tile_values: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Repeat tile values along rows only (cheap: `cols` times smaller than the weight). (R, C) -> (out, C)"""
    return tile_values.repeat_interleave(grid.rows, dim=0)[: grid.out_features]


def tile_lerp(start: torch.Tensor, end: torch.Tensor, tile_values: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """start + t·(end − start), with t constant on each tile. (out, in), (out, in), (R, C) -> (out, in)

    The full-width column tiles are handled as a (out, C_full, cols) view broadcast against the
    row-expanded tile values; a ragged last column of tiles is a second, narrower view.
    """
    out_f, in_f = start.shape
    t_rows = expand_tile_rows(tile_values, grid).to(start.dtype)  # (out, C)
    full_cols = in_f // grid.cols
    split = full_cols * grid.cols
    parts = []
    if full_cols:
        a = start[:, :split].reshape(out_f, full_cols, grid.cols)    # (out, Cf, c)
        b = end[:, :split].reshape(out_f, full_cols, grid.cols)
        parts.append(torch.lerp(a, b, t_rows[:, :full_cols, None]).reshape(out_f, split))
    if split < in_f:  # ragged edge: one narrower tile column
        parts.append(torch.lerp(start[:, split:], end[:, split:], t_rows[:, full_cols:full_cols + 1]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def hybrid_soft_weight(weight: torch.Tensor, sparse_mask: torch.Tensor, tile_values: torch.Tensor | None,
                       grid: TileGrid | None, sparse_weight: torch.Tensor | None = None) -> torch.Tensor:
    """W ⊙ M̃ with M̃ = T̃ + (1 − T̃)·M̃₂:₄, i.e. lerp(W ⊙ M̃₂:₄, W, T̃) per tile. -> (out, in)

    A dense tile (T̃ = 1) keeps every weight; a sparse tile (T̃ = 0) keeps the 2:4 choice, of
    `sparse_weight` where given (weights fitted for the 2:4 mask) instead of W:
    lerp(W_s ⊙ M̃₂:₄, W, T̃).
    """
    sparse_part = (weight if sparse_weight is None else sparse_weight.to(weight.dtype)) * sparse_mask
    if tile_values is None:
        return sparse_part
    return tile_lerp(sparse_part, weight.to(sparse_part.dtype), tile_values, grid)


def flush_subnormal(x: torch.Tensor) -> torch.Tensor:
    """Values below the smallest normal float set to zero (gradient zero there too).

    Late in training (large κ/τ) soft masks reach subnormal values; on x86 CPUs every operation on
    them, above all the matmul that consumes W ⊙ M̃, is about a hundred times slower.
    """
    return x.masked_fill(x.abs() < torch.finfo(x.dtype).tiny, 0.0)


def soft_kept(tile_values: torch.Tensor, sparse_density: torch.Tensor, tile_numel: torch.Tensor) -> torch.Tensor:
    """Expected number of kept weights: Σ_tiles n·(s + (1 − s)·t), exact for the soft mask.

    Within a tile, ΣM̃ = n·t + (1 − t)·ΣM̃₂:₄ and ΣM̃₂:₄ = n·s (s = 0.5 for learned 2:4, soft or
    hard, because tiles hold whole groups of four). So the density needs no weight-sized tensor.
    (R, C), (R, C), (R, C) -> scalar
    """
    return (tile_numel * (sparse_density + (1.0 - sparse_density) * tile_values)).sum()
