"""Where mask learning gets its prior from.

`build_prior` calls the one-shot pruners (`patchsparse.prior.oneshot.compute_prior`);
`magnitude_prior` is the registry's magnitude pruner without the calibration loop it does not
need (2:4 by |W|, tile scores = fraction of each tile kept by unstructured magnitude pruning at
the target, one threshold per layer), for benchmarks and tests without calibration data.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from patchsparse.masks.tiles import TileGrid
from patchsparse.models.layers import LayerSelection, select_linears
from patchsparse.prior.methods import get_pruner
from patchsparse.prior.oneshot import compute_prior, tile_scores_from_mask
from patchsparse.prior.pattern import PrunePattern
from patchsparse.prior.pruners import SparseGPTOptions
from patchsparse.prior.types import LayerPrior, PriorMasks


@torch.no_grad()
def magnitude_prior(model: nn.Module, sparsity: float, tile: tuple[int, int],
                    selection: LayerSelection = LayerSelection()) -> PriorMasks:
    magnitude, options = get_pruner("magnitude"), SparseGPTOptions()
    prior: PriorMasks = {}
    for name, linear in select_linears(model, selection).items():
        weight = linear.weight.detach().cpu()
        grid = TileGrid.for_weight(weight, tile)
        kept, _ = magnitude.mask(weight, None, PrunePattern.unstructured(sparsity), options)  # one threshold per layer
        nm_keep, _ = magnitude.mask(weight, None, PrunePattern.nm(2, 4), options)
        prior[name] = LayerPrior(nm_keep, tile_scores_from_mask(kept, grid), tuple(tile))  # (R, C) fraction kept
    return prior


def build_prior(model: nn.Module, calib_windows: torch.Tensor | None, method: str, sparsity: float,
                tile: tuple[int, int] | None, selection: LayerSelection = LayerSelection()) -> PriorMasks:
    """2:4 masks, and with `tile` also tile scores, from a one-shot pruner."""
    get_pruner(method)  # an unknown name is refused first
    return compute_prior(model, calib_windows, method, sparsity, tile, selection)
