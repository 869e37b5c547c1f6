"""N:M and unstructured masks from importance scores, and the six 2:4 patterns.

All functions are pure: tensor in, tensor out. Ties are broken deterministically (the earlier
position wins), which matters for the default model: its weights come from a 4-bit file, and
about 15% of its groups of four hold an exact tie at the 2:4 boundary.
"""

from __future__ import annotations

import torch

from patchsparse.errors import PatchsparseError

# The six ways to keep 2 of 4, in MaskLLM/PATCH order: 1100, 1010, 1001, 0110, 0101, 0011.
PATTERNS_2_4 = torch.tensor(
    [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
    dtype=torch.float32,
)


def check_nm(n: int, m: int) -> None:
    if not (0 < n < m):
        raise PatchsparseError(f"invalid N:M pattern {n}:{m}: need 0 < N < M")


def nm_mask_from_scores(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the `n` highest scores of every `m` consecutive inputs. (out, in) -> bool (out, in)"""
    check_nm(n, m)
    out_f, in_f = scores.shape
    if in_f % m:
        raise PatchsparseError(f"input dimension {in_f} is not divisible by M={m}")
    groups = scores.reshape(out_f, in_f // m, m)  # (out, G, m)
    # stable descending sort: among equal scores the lower index ranks first, so it is kept
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.view(out_f, in_f)


def unstructured_mask_from_scores(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Prune the `sparsity` fraction of lowest scores, per layer or per output row. -> bool, same shape"""
    if not 0.0 <= sparsity < 1.0:
        raise PatchsparseError(f"unstructured sparsity must be in [0, 1), got {sparsity}")
    rows = scores if per_row else scores.reshape(1, -1)
    n_prune = int(round(sparsity * rows.shape[1]))
    keep = torch.ones_like(rows, dtype=torch.bool)
    if n_prune:
        # stable ascending sort: among equal scores the later index is pruned first
        order = torch.sort(rows.flip(-1), dim=-1, stable=True).indices
        pruned = rows.shape[1] - 1 - order[:, :n_prune]
        keep.scatter_(1, pruned, False)
    return keep.view_as(scores)


def pattern_index_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Index (0..5) of the 2:4 pattern of each group of four. bool (out, in) -> int8 (out, in/4)"""
    groups = mask.reshape(mask.shape[0], -1, 4).to(torch.float32)
    if not torch.all(groups.sum(-1) == 2):
        raise PatchsparseError("mask is not 2:4: some group of four does not keep exactly two")
    match = groups @ PATTERNS_2_4.T  # (out, G, 6): overlap with each pattern, 2 where equal
    return match.argmax(-1).to(torch.int8)


def mask_from_pattern_index(index: torch.Tensor) -> torch.Tensor:
    """int (out, in/4) -> bool (out, in)"""
    return PATTERNS_2_4.to(torch.bool)[index.long()].reshape(index.shape[0], -1)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive inputs keeps at most n (exactly n for a hard N:M mask)."""
    groups = mask.reshape(mask.shape[0], -1, m).sum(-1)
    return bool(torch.all(groups == n))
