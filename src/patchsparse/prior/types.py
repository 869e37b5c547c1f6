"""What a one-shot pruner hands to mask learning."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerPrior:
    nm_keep: torch.Tensor                    # bool (out, in): the one-shot 2:4 mask
    tile_scores: torch.Tensor | None = None  # float (R, C): fraction of each tile's weights kept
                                             # when the layer is pruned unstructured at the target
    tile: tuple[int, int] | None = None      # tile size the scores were computed for


# Full module name (e.g. "model.layers.0.mlp.up_proj") -> prior of that layer.
PriorMasks = dict[str, LayerPrior]
