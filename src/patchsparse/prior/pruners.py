"""The selection step of the one-shot pruners: weights (+ statistic) in, keep-mask out. Pure functions.

- magnitude: score |W|; unstructured uses one threshold per layer.
- Wanda: score |W_ij|·‖x_j‖₂; unstructured prunes the same fraction in every output row.
- SparseGPT: optimal-brain-surgeon pruning with the Hessian 2/n·XᵀX, column by column, blocks
  of `blocksize` columns; unstructured selects per block, pooled over all rows; N:M selects per
  group of m on the weights as updated so far. Returns the mask and the updated weights.

Ties are broken by position (`nm_mask_from_scores`, `unstructured_mask_from_scores`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from patchsparse.errors import PatchsparseError
from patchsparse.prior.pattern import PrunePattern


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) -> (out, in)"""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖x_j‖₂. weight (out, in), input_norms (in,) -> (out, in)"""
    return weight.detach().float().abs() * input_norms.to(weight.device, torch.float32)[None, :]


def magnitude_mask(weight: torch.Tensor, pattern: PrunePattern) -> torch.Tensor:
    return pattern.select(magnitude_scores(weight), per_row=False)


def wanda_mask(weight: torch.Tensor, input_norms: torch.Tensor, pattern: PrunePattern) -> torch.Tensor:
    return pattern.select(wanda_scores(weight, input_norms), per_row=True)


@dataclass(frozen=True)
class SparseGPTOptions:
    damp: float = 0.01      # added to H's diagonal, relative to its mean
    blocksize: int = 128    # columns processed (and, unstructured, selected) together

    def check(self, pattern: PrunePattern) -> None:
        if not self.damp >= 0.0:
            raise PatchsparseError(f"SparseGPT damping must be >= 0, got {self.damp}")
        if self.blocksize < 1:
            raise PatchsparseError(f"SparseGPT block size must be positive, got {self.blocksize}")
        if pattern.is_nm and self.blocksize % pattern.m:
            raise PatchsparseError(
                f"SparseGPT block size {self.blocksize} must be a multiple of M={pattern.m} for {pattern.label}")


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU), λ = damp · mean(diag H). (in, in)"""
    H = hessian.clone().double()
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        lower = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).float()
    except torch.linalg.LinAlgError:
        raise PatchsparseError(
            f"SparseGPT: the Hessian is not positive definite with damping {damp}; raise --damp") from None


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """SparseGPT is thousands of small ops on matrices of a few thousand columns at most: on a
    shared CPU, intra-op threads spend their time waiting for each other (measured 10-20x slower)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: PrunePattern,
                    options: SparseGPTOptions = SparseGPTOptions(),
                    force_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one linear. -> (keep bool (out, in), updated weight float32 (out, in))

    `keep` is the pattern's selection everywhere (a valid N:M mask when the pattern is N:M);
    weights under `force_keep` (e.g. dense tiles of a hybrid mask) are never pruned, so their
    errors are not propagated either. The updated weight is zero wherever a weight was pruned.
    """
    options.check(pattern)
    with _one_cpu_thread(weight.device):
        return _sparsegpt(weight, hessian, pattern, options, force_keep)


def _sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, pattern: PrunePattern, options: SparseGPTOptions,
               force_keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    # Work on Wᵀ (in, out): one input column of W is then a contiguous row.
    Wt = weight.detach().float().T.contiguous()  # (in, out)
    H = hessian.detach().clone().float()
    in_f, out_f = Wt.shape
    dead = H.diagonal() == 0  # inputs that were always zero: nothing to reconstruct, prune them first
    H[dead, dead] = 1.0
    Wt[dead] = 0.0
    Hinv = inverse_hessian_factor(H, options.damp)  # (in, in), upper triangular
    keep_t = torch.zeros_like(Wt, dtype=torch.bool)  # (in, out)
    protect_t = (torch.zeros_like(keep_t) if force_keep is None
                 else force_keep.to(Wt.device, torch.bool).T.contiguous())
    for i1 in range(0, in_f, options.blocksize):
        i2 = min(i1 + options.blocksize, in_f)
        W1 = Wt[i1:i2]                     # (b, out), a view: updated in place
        Hinv1 = Hinv[i1:i2, i1:i2]         # (b, b)
        d = Hinv1.diagonal()               # (b,)
        Err1 = torch.zeros_like(W1)        # (b, out)
        if not pattern.is_nm:
            # unstructured: one selection for the whole block, pooled over rows
            keep_t[i1:i2] = pattern.select((W1.pow(2) / d.pow(2)[:, None]).T, per_row=False).T
        for i in range(i2 - i1):
            col = i1 + i
            if pattern.is_nm and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                scores = W1[group].pow(2) / d[group].pow(2)[:, None]  # (m, out)
                keep_t[col: col + pattern.m] = pattern.select(scores.T).T
            w = W1[i].clone()
            q = w * (keep_t[col] | protect_t[col])
            err = (w - q) / d[i]
            # spread the pruning error onto the block's remaining columns
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)
            W1[i] = q
            Err1[i] = err
        Wt[i2:] -= Hinv[i1:i2, i2:].T @ Err1  # and onto every later column
    return keep_t.T.contiguous(), Wt.T.contiguous()
