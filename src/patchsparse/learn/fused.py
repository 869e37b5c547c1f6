"""Fused CPU kernel for the soft hybrid weight, with the pure-PyTorch code as oracle and fallback.

The PyTorch formulation (soft_masks.py) makes about ten passes over tensors six times the size of
the 2:4 logits per layer and per forward; the fused C++ kernel (csrc/soft_mask_cpu.cpp) makes one,
keeps nothing weight-sized for backward (it recomputes the 6-way softmax there), and returns the
layer's ‖W ⊙ M̃‖² for the weight-magnitude term on the way. It is compiled on first use with the
machine's C++ compiler by `patchsparse.native` (about a minute) into the patchsparse cache;
without a compiler, or with PATCHSPARSE_NO_KERNELS=1, the PyTorch path is used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from patchsparse.masks.tiles import TileGrid
from patchsparse.native import NativeKernel

KERNEL = NativeKernel("soft_mask_cpu", Path(__file__).resolve().parent / "csrc" / "soft_mask_cpu.cpp",
                      ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"],
                      label="fused soft-mask CPU")


def load_extension():
    """The compiled kernels, or None when they cannot be built here."""
    return KERNEL.load()


def reduce_tile_rows(row_values: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Sum per-row tile values over the rows of each tile. (out, C) -> (R, C)"""
    R, C = grid.shape
    pad = R * grid.rows - grid.out_features
    if pad:
        row_values = torch.nn.functional.pad(row_values, (0, 0, 0, pad))
    return row_values.view(R, grid.rows, C).sum(dim=1)


class FusedHybridWeight(torch.autograd.Function):
    """(W, Π or frozen keep, tile values) -> (W ⊙ M̃, ‖W ⊙ M̃‖_F), gradients for Π and the tile values."""

    @staticmethod
    def forward(ctx, weight, logits, tiles, noise, keep, kappa, tau, grid):
        ext = load_extension()
        # without tiles: one segment per row, so the kernel vectorises along the whole row
        tile_rows, tile_cols = (grid.rows, grid.cols) if grid is not None else tuple(weight.shape)
        out, row_sq = ext.forward(weight, logits, noise, keep, tiles, kappa, tau, tile_rows, tile_cols)
        norm = row_sq.sum().sqrt().to(torch.float32)
        ctx.save_for_backward(weight, logits, tiles, noise, keep, norm)
        ctx.settings = (kappa, tau, grid, tile_rows, tile_cols)
        return out, norm

    @staticmethod
    def backward(ctx, grad_out, grad_norm):
        weight, logits, tiles, noise, keep, norm = ctx.saved_tensors
        kappa, tau, grid, tile_rows, tile_cols = ctx.settings
        out_scale = 0.0
        if grad_norm is not None and float(norm) > 0:
            out_scale = float(grad_norm) / float(norm)
        if grad_out is None:
            grad_out = torch.zeros_like(weight)
        grad_logits, grad_rows = load_extension().backward(grad_out.contiguous(), weight, logits, noise, keep, tiles,
                                                           kappa, tau, tile_rows, tile_cols, out_scale)
        grad_tiles = reduce_tile_rows(grad_rows, grid) if tiles is not None else None
        return (None, grad_logits if logits is not None else None, grad_tiles, None, None, None, None, None)


def fused_available(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and load_extension() is not None


def fused_hybrid_weight(weight: torch.Tensor, logits: torch.Tensor | None, noise: torch.Tensor | None,
                        keep: torch.Tensor | None, tiles: torch.Tensor | None, kappa: float, tau: float,
                        grid: TileGrid | None) -> tuple[torch.Tensor, torch.Tensor]:
    """W ⊙ M̃ and its Frobenius norm through the fused kernel (CPU, fp32)."""
    return FusedHybridWeight.apply(weight.contiguous(), logits, None if tiles is None else tiles.contiguous(),
                                   None if noise is None else noise.contiguous(), keep, float(kappa), float(tau), grid)
