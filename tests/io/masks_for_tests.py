"""Hybrid mask specs built by hand for the tiny model (no learning involved)."""

from __future__ import annotations

import torch
import torch.nn as nn

from patchsparse.masks import HybridMaskSpec, LayerMask, TileGrid, nm_mask_from_scores
from patchsparse.models import select_linears


def hybrid_spec(model: nn.Module, tile: tuple[int, int] = (24, 20), dense_fraction: float = 0.3,
                seed: int = 0, metadata: dict | None = None) -> HybridMaskSpec:
    """2:4 by magnitude in every decoder linear, a random `dense_fraction` of tiles kept dense.

    The default tile does not divide the tiny model's 64/128 dimensions, so edge tiles are ragged.
    """
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, linear in select_linears(model).items():
        weight = linear.weight.detach()
        grid = TileGrid(*weight.shape, *tile)
        dense = torch.rand(grid.shape, generator=generator) < dense_fraction
        layers[name] = LayerMask(sparse_keep=nm_mask_from_scores(weight.abs()), pattern="2:4",
                                 tile=tile, dense_tiles=dense)
    return HybridMaskSpec(layers=layers, metadata=dict(metadata or {}))
