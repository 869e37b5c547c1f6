"""Calibration statistics of a linear layer's inputs, accumulated batch by batch.

Statistics are separate from selection (as in llm-compressor): make an empty statistic, feed it
every calibration batch that reaches the layer, then hand the result to a pruner.
"""

from __future__ import annotations

import torch


class InputNormStat:
    """Per-input-feature L2 norm over all calibration tokens, ‖x_j‖₂ (Wanda's activation statistic)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        # float64: a sum of squares over ~1e5 tokens should not lose the small features
        self.sum_squares = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def accumulate(self, x: torch.Tensor) -> None:
        """x (..., in)"""
        rows = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.sum_squares += rows.pow(2).sum(dim=0).double()
        self.tokens += rows.shape[0]

    def norms(self) -> torch.Tensor:
        """-> (in,) float32"""
        return self.sum_squares.sqrt().float()


class HessianStat:
    """H = 2/n · XᵀX over the n calibration tokens seen so far (SparseGPT's layer-wise Hessian).

    Kept as a running average, as SparseGPT does, so its magnitude does not grow with n; the
    pruner is invariant to the scale (damping is relative to the mean diagonal).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def accumulate(self, x: torch.Tensor) -> None:
        """x (..., in)"""
        rows = x.detach().reshape(-1, x.shape[-1]).float()  # (b, in)
        b = rows.shape[0]
        total = self.tokens + b
        self.hessian.mul_(self.tokens / total)
        self.hessian.addmm_(rows.T, rows, alpha=2.0 / total)  # += 2/total · XᵀX of this batch
        self.tokens = total
