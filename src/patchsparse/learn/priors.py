"""Where mask learning gets its prior from.

`build_prior` calls the one-shot pruners (`patchsparse.prior.oneshot.compute_prior`);
`magnitude_prior` is the pure-magnitude prior (2:4 by |W|, tile scores = fraction
of each tile kept by unstructured magnitude pruning at the target, one threshold per layer).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from patchsparse.errors import PatchsparseError
from patchsparse.masks.patterns import nm_mask_from_scores, unstructured_mask_from_scores
from patchsparse.masks.tiles import TileGrid
from patchsparse.models.layers import LayerSelection, select_linears
from patchsparse.prior.types import LayerPrior, PriorMasks

PRIOR_METHODS = ("magnitude", "wanda", "sparsegpt")


@torch.no_grad()
def magnitude_prior(model: nn.Module, sparsity: float, tile: tuple[int, int],
                    selection: LayerSelection = LayerSelection()) -> PriorMasks:
    prior: PriorMasks = {}
    for name, linear in select_linears(model, selection).items():
        scores = linear.weight.detach().float().abs().cpu()           # (out, in)
        grid = TileGrid.for_weight(scores, tile)
        kept = unstructured_mask_from_scores(scores, sparsity).float()  # one threshold per layer
        tile_scores = grid.reduce_sum(kept) / grid.tile_numel()        # (R, C) fraction kept
        prior[name] = LayerPrior(nm_mask_from_scores(scores), tile_scores, tuple(tile))
    return prior


def build_prior(model: nn.Module, calib_windows: torch.Tensor | None, method: str, sparsity: float,
                tile: tuple[int, int] | None, selection: LayerSelection = LayerSelection()) -> PriorMasks:
    """2:4 masks, and with `tile` also tile scores, from a one-shot pruner."""
    if method not in PRIOR_METHODS:
        raise PatchsparseError(f"unknown prior '{method}' (choose {', '.join(PRIOR_METHODS)})")
    from patchsparse.prior.oneshot import compute_prior

    return compute_prior(model, calib_windows, method, sparsity, tile, selection)
