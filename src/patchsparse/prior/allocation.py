"""Which decoder blocks get 2:4 and which stay dense, for a target sparsity of the whole model.

A block is either dense (0%) or 2:4 (50%), so a target S takes round(2·S·L) of the L blocks.
Two ways to choose them (`prune --allocation`):

* `edges`: the first and last blocks stay dense (the usual sensitivity heuristic).
* `owl`: OWL (Yin et al. 2024) gives block l the sparsity S − (D̂_l − mean D̂), where D_l is the
  fraction of Wanda scores |W|·‖x‖ above M× the block mean on the dense model and D̂ is D
  min-max rescaled into [0, 2λ]. That continuous sparsity cannot be met with dense-or-2:4
  blocks; what carries over is its order: the blocks OWL would prune most (fewest outliers) get
  2:4, as many as the target needs.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch
import torch.nn as nn

from patchsparse.errors import PatchsparseError
from patchsparse.models.layers import LayerSelection, decoder_layers
from patchsparse.prior.layerwise import calibrate_layer_by_layer
from patchsparse.prior.methods import get_pruner
from patchsparse.prior.pruners import wanda_scores

ALLOCATIONS = ("edges", "owl")
OWL_M = 5.0               # OWL outlier threshold: a score is an outlier above M × its block's mean
OWL_LAMBDA = 0.08         # OWL bound: per-block sparsity within ±λ of the target (continuous form)


def check_allocation(allocation: str) -> None:
    if allocation not in ALLOCATIONS:
        raise PatchsparseError(f"unknown block allocation '{allocation}' (choose {', '.join(ALLOCATIONS)})")


def sparse_block_count(n_blocks: int, target: float) -> int:
    """How many equal-sized blocks at 50% (2:4) give the global sparsity closest to `target`."""
    return max(0, min(n_blocks, round(2 * target * n_blocks)))


def edge_dense_blocks(n_blocks: int, n_sparse: int) -> list[int]:
    """Blocks that get 2:4 when the first and last blocks stay dense (the usual sensitivity heuristic):
    the dense ones are the first ⌈d/2⌉ and the last ⌊d/2⌋, d = n_blocks − n_sparse. -> sorted sparse blocks"""
    d = n_blocks - n_sparse
    first = (d + 1) // 2
    return list(range(first, first + n_sparse))


def owl_outlier_ratio(scores: torch.Tensor, m: float = OWL_M) -> float:
    """OWL's layerwise outlier distribution: the fraction of Wanda scores above M × their mean."""
    flat = scores.reshape(-1).float()
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(ratios: torch.Tensor, target: float, lam: float = OWL_LAMBDA) -> torch.Tensor:
    """OWL's per-block sparsity: s_l = S − (D̂_l − mean D̂), D̂ = ratios min-max rescaled into [0, 2λ]."""
    span = ratios.max() - ratios.min()
    scaled = (ratios - ratios.min()) / span * 2 * lam if span > 0 else torch.zeros_like(ratios)
    return target - (scaled - scaled.mean())


def owl_sparse_blocks(ratios: torch.Tensor, target: float, lam: float = OWL_LAMBDA) -> list[int]:
    """OWL adapted to a 2:4-or-dense choice per block. -> sorted blocks that get 2:4

    Min-max rescaling is monotone, so λ does not change the choice.
    """
    wanted = owl_sparsities(ratios, target, lam)
    n = sparse_block_count(len(ratios), target)
    order = sorted(range(len(ratios)), key=lambda b: (-float(wanted[b]), b))
    return sorted(order[:n])


def owl_outlier_ratios(model: nn.Module, calib_windows: torch.Tensor, *, batch_size: int = 1) -> torch.Tensor:
    """OWL's outlier ratio of every decoder block, from Wanda scores |W|·‖x‖ on the (dense) model. -> (L,)"""
    ratios: dict[int, float] = {}

    def score_block(index: int, block: dict[str, nn.Linear], stats: dict[str, Any]) -> None:
        scores = torch.cat([wanda_scores(linear.weight, stats[name].norms()).reshape(-1)
                            for name, linear in block.items()])
        ratios[index] = owl_outlier_ratio(scores)

    calibrate_layer_by_layer(model, calib_windows, get_pruner("wanda").statistic, score_block,
                             batch_size=batch_size, desc="OWL outlier ratios")
    return torch.tensor([ratios[i] for i in sorted(ratios)])


def block_selection(prefix: str, blocks: Iterable[int]) -> LayerSelection:
    """The linears of these decoder blocks (`prefix` as `decoder_layers` names it)."""
    return LayerSelection(include=tuple(rf"^{re.escape(prefix)}\.{b}\." for b in blocks))


def allocate_blocks(model: nn.Module, allocation: str, sparsity: float, calib_windows: torch.Tensor | None = None,
                    *, batch_size: int = 1) -> tuple[LayerSelection, list[int], torch.Tensor | None]:
    """(selection of the blocks that get 2:4, those blocks, OWL's outlier ratios or None) for a target sparsity.

    `owl` needs calibration windows (it runs the dense model over them once).
    """
    check_allocation(allocation)
    prefix, layers = decoder_layers(model)
    n = len(layers)
    ratios = None
    if allocation == "owl":
        if calib_windows is None or calib_windows.shape[0] == 0:
            raise PatchsparseError("the owl allocation needs calibration windows; got none")
        ratios = owl_outlier_ratios(model, calib_windows, batch_size=batch_size)
        blocks = owl_sparse_blocks(ratios, sparsity)
    else:
        blocks = edge_dense_blocks(n, sparse_block_count(n, sparsity))
    return block_selection(prefix, blocks), blocks, ratios
