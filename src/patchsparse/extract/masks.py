"""Hard masks from learned logits, as a `HybridMaskSpec` (docs/METHOD.md §8).

The 2:4 part of each layer is the arg-max pattern of its logits (maskllm / patch-joint) or its
frozen prior (patch-tile). Which tiles are dense is decided by a policy:

* `threshold` (as published): a tile is dense when its logit is > 0. The achieved sparsity is
  whatever the training left; report it.
* `exact` (default): all tiles of all layers are ranked by logit, highest first, and taken dense
  in that order while that brings the kept weights closer to the target (each tile counted by the
  weights it adds: its size minus what its 2:4 part already keeps). The achieved global sparsity
  is the target to within one tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from patchsparse.errors import PatchsparseError
from patchsparse.masks.learned import LearnedMask, find_masks
from patchsparse.masks.patterns import mask_from_pattern_index
from patchsparse.masks.spec import HybridMaskSpec, LayerMask
from patchsparse.masks.tiles import check_hybrid_sparsity, choose_dense_tiles

POLICIES = ("exact", "threshold")


def sparse_keep_of(mask: LearnedMask) -> torch.Tensor:
    """The hard 2:4 part of one layer. -> bool (out, in), on CPU"""
    if mask.pattern_logits is None:
        return mask.sparse_keep.detach().cpu().bool()
    return mask_from_pattern_index(mask.pattern_logits.detach().argmax(dim=-1).cpu())


def threshold_tiles(tile_logits: torch.Tensor) -> torch.Tensor:
    """Dense where ℓ > 0 (a logit of exactly 0 is sparse). (R, C) -> bool (R, C)"""
    return tile_logits > 0


def exact_tiles(logits: list[torch.Tensor], gains: list[torch.Tensor], target_extra: float) -> list[torch.Tensor]:
    """Choose dense tiles globally by logit so their added weights best match `target_extra`.

    logits[i], gains[i]: (R_i, C_i) per layer (gain = weights a tile adds when made dense).
    Ranked by logit, highest first (ties: earlier layer, then row-major); the count k of dense
    tiles minimises |Σ_{first k} gain − target_extra|. -> bool (R_i, C_i) per layer
    """
    dense = choose_dense_tiles(torch.cat([l.reshape(-1).to(torch.float64) for l in logits]),
                               torch.cat([g.reshape(-1).to(torch.float64) for g in gains]), target_extra)
    out, offset = [], 0
    for l in logits:
        out.append(dense[offset: offset + l.numel()].view(l.shape))
        offset += l.numel()
    return out


@dataclass(frozen=True)
class ExtractionReport:
    policy: str
    target_sparsity: float
    sparsity: float
    per_layer: dict[str, float]
    per_projection: dict[str, float]
    per_block: dict[int, float]

    def as_dict(self) -> dict:
        return {"policy": self.policy, "target_sparsity": self.target_sparsity, "sparsity": self.sparsity,
                "per_projection": self.per_projection, "per_block": {str(k): v for k, v in self.per_block.items()},
                "per_layer": self.per_layer}


def extract_masks(model: nn.Module, policy: str = "exact", target_sparsity: float | None = None,
                  mode: str | None = None, metadata: dict | None = None) -> HybridMaskSpec:
    """Hard masks of every learned mask attached to `model` (the masks stay attached).

    `target_sparsity` is needed by the `exact` policy when tiles are learned. The spec's metadata
    records the policy, the target and the achieved sparsity.
    """
    if policy not in POLICIES:
        raise PatchsparseError(f"unknown extraction policy '{policy}' (choose {', '.join(POLICIES)})")
    masks = find_masks(model)
    if not masks:
        raise PatchsparseError("the model has no learnable masks attached")
    tiled = {name: m for name, m in masks.items() if m.tile_logits is not None}
    if tiled and len(tiled) != len(masks):
        raise PatchsparseError("either every masked layer has tile logits or none has")
    keeps = {name: sparse_keep_of(m) for name, m in masks.items()}

    dense: dict[str, torch.Tensor] = {}
    if tiled and policy == "threshold":
        dense = {name: threshold_tiles(m.tile_logits.detach().cpu()) for name, m in tiled.items()}
    elif tiled:
        if target_sparsity is None:
            raise PatchsparseError("the exact extraction policy needs the target sparsity")
        check_hybrid_sparsity(target_sparsity)
        names = list(tiled)
        total = sum(masks[n].numel for n in names)
        base_kept = sum(int(keeps[n].sum()) for n in names)
        gains = [masks[n].grid.tile_numel() - masks[n].grid.reduce_sum(keeps[n].to(torch.float64)).round().long()
                 for n in names]
        target_extra = (1.0 - target_sparsity) * total - base_kept
        chosen = exact_tiles([masks[n].tile_logits.detach().cpu() for n in names], gains, target_extra)
        dense = dict(zip(names, chosen))

    layers = {}
    for name, m in masks.items():
        if name in dense:
            layers[name] = LayerMask(keeps[name], "2:4", (m.grid.rows, m.grid.cols), dense[name])
        else:
            layers[name] = LayerMask(keeps[name], "2:4")
    spec = HybridMaskSpec(layers, dict(metadata or {}))
    spec.metadata.update({"policy": policy if tiled else "argmax", "target_sparsity": target_sparsity,
                          "sparsity": spec.sparsity()})
    if mode is not None:
        spec.metadata["mode"] = mode
    return spec


def extraction_report(spec: HybridMaskSpec) -> ExtractionReport:
    return ExtractionReport(policy=spec.metadata.get("policy", "?"),
                            target_sparsity=spec.metadata.get("target_sparsity"),
                            sparsity=spec.sparsity(), per_layer=spec.per_layer_sparsity(),
                            per_projection=spec.per_projection_sparsity(), per_block=spec.per_block_sparsity())
