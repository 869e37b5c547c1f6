"""Mask math (pure functions) and the mask handoff types."""

from patchsparse.masks.patterns import (
    PATTERNS_2_4,
    mask_from_pattern_index,
    nm_mask_from_scores,
    pattern_index_from_mask,
    unstructured_mask_from_scores,
)
from patchsparse.masks.spec import HybridMaskSpec, LayerMask
from patchsparse.masks.tiles import TileGrid

__all__ = [
    "PATTERNS_2_4",
    "HybridMaskSpec",
    "LayerMask",
    "TileGrid",
    "mask_from_pattern_index",
    "nm_mask_from_scores",
    "pattern_index_from_mask",
    "unstructured_mask_from_scores",
]
