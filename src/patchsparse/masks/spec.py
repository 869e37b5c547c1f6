"""The handoff type after pruning or learning: which weights each masked layer keeps.

A `LayerMask` has a tile grid that marks each tile dense or sparse, and the keep-mask that sparse
tiles use (2:4, N:M or unstructured). A one-shot 2:4 mask is the special case "no dense tile".
Everything downstream — evaluation, mask files, export, reports, kernels — consumes a
`HybridMaskSpec`; nothing infers a mask from zeros in a weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from patchsparse.errors import PatchsparseError
from patchsparse.masks.tiles import TileGrid


@dataclass(frozen=True)
class LayerMask:
    sparse_keep: torch.Tensor          # bool (out, in): weights kept inside sparse tiles
    pattern: str                       # "2:4", "N:M" such as "4:8", or "unstructured"
    tile: tuple[int, int] | None = None
    dense_tiles: torch.Tensor | None = None  # bool (R, C): True = tile kept whole

    def __post_init__(self) -> None:
        if self.sparse_keep.dtype != torch.bool or self.sparse_keep.dim() != 2:
            raise PatchsparseError("LayerMask.sparse_keep must be a 2-D bool tensor")
        if (self.tile is None) != (self.dense_tiles is None):
            raise PatchsparseError("LayerMask needs both tile and dense_tiles, or neither")
        if self.dense_tiles is not None and tuple(self.dense_tiles.shape) != self.grid.shape:
            raise PatchsparseError(
                f"tile grid {tuple(self.dense_tiles.shape)} does not fit weight {self.shape} with tile {self.tile}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.sparse_keep.shape)  # type: ignore[return-value]

    @property
    def grid(self) -> TileGrid:
        if self.tile is None:
            raise PatchsparseError("this mask has no tile structure")
        return TileGrid(self.shape[0], self.shape[1], *self.tile)

    def keep_mask(self) -> torch.Tensor:
        """The full keep-mask. -> bool (out, in)"""
        if self.dense_tiles is None:
            return self.sparse_keep
        return self.sparse_keep | self.grid.expand(self.dense_tiles)

    def kept(self) -> int:
        return int(self.keep_mask().sum())

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def sparsity(self) -> float:
        return 1.0 - self.kept() / self.numel()

    def dense_tile_fraction(self) -> float:
        """Fraction of weights that lie in dense tiles."""
        if self.dense_tiles is None:
            return 0.0
        return float((self.grid.tile_numel() * self.dense_tiles).sum()) / self.numel()


def grouped_sparsity(kept: dict[str, int], numel: dict[str, int], key: Callable[[str], Any]) -> dict[Any, float]:
    """Sparsity of groups of layers (weighted by size); `key` maps a layer name to its group."""
    totals: dict[Any, list[int]] = {}
    for name in kept:
        group = totals.setdefault(key(name), [0, 0])
        group[0] += kept[name]
        group[1] += numel[name]
    return {g: 1.0 - k / t for g, (k, t) in totals.items()}


@dataclass
class HybridMaskSpec:
    layers: dict[str, LayerMask]
    metadata: dict[str, Any] = field(default_factory=dict)

    def kept_and_total(self, names: Iterable[str] | None = None) -> tuple[int, int]:
        names = list(self.layers) if names is None else list(names)
        kept = sum(self.layers[n].kept() for n in names)
        total = sum(self.layers[n].numel() for n in names)
        return kept, total

    def sparsity(self) -> float:
        """Global sparsity over all masked weights (weighted by parameter count)."""
        kept, total = self.kept_and_total()
        return 1.0 - kept / total

    def sparsity_over(self, total_weights: int) -> float:
        """Sparsity over `total_weights` weights, those outside the masked layers dense (for example a
        mask of some blocks measured over all decoder linears)."""
        kept, total = self.kept_and_total()
        if total_weights < total:
            raise PatchsparseError(f"{total_weights} weights cannot hold the {total} this mask covers")
        return (total - kept) / total_weights

    def per_layer_sparsity(self) -> dict[str, float]:
        return {name: mask.sparsity() for name, mask in self.layers.items()}

    def per_projection_sparsity(self) -> dict[str, float]:
        from patchsparse.models.layers import projection_type

        return grouped_sparsity(*self._kept_and_numel(), projection_type)

    def per_block_sparsity(self) -> dict[int, float]:
        from patchsparse.models.layers import block_index

        return dict(sorted(grouped_sparsity(*self._kept_and_numel(), block_index).items()))

    def _kept_and_numel(self) -> tuple[dict[str, int], dict[str, int]]:
        return ({name: mask.kept() for name, mask in self.layers.items()},
                {name: mask.numel() for name, mask in self.layers.items()})

    def check_matches(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The model's linears named by this spec, after checking that every one exists with the right shape."""
        modules = dict(model.named_modules())
        found: dict[str, nn.Linear] = {}
        for name, mask in self.layers.items():
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                raise PatchsparseError(f"mask names layer '{name}', which this model does not have")
            if tuple(module.weight.shape) != mask.shape:
                raise PatchsparseError(
                    f"mask for '{name}' has shape {mask.shape}, the model's weight {tuple(module.weight.shape)}")
            found[name] = module
        return found

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Zero every pruned weight in place (all shapes are checked before anything changes)."""
        found = self.check_matches(model)
        for name, module in found.items():
            keep = self.layers[name].keep_mask().to(module.weight.device)
            module.weight.mul_(keep.to(module.weight.dtype))
