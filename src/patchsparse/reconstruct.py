"""Weight reconstruction once a mask is chosen: the kept weights change so each layer's output
moves as little as possible from the dense layer's on calibration inputs.

Two ways, both layer by layer and sequential (each decoder layer calibrated on the outputs of the
already-reconstructed ones, as the one-shot pruners are):

* `repick` (default): the dense tiles stay where the mask has them; inside the sparse tiles
  SparseGPT chooses the 2:4 groups again on the weights as it updates them, and spreads each
  pruning error onto the weights not yet visited. Learned dense-tile allocations keep what
  learning found (where density goes); the 2:4 patterns are redone, so a learned 2:4 choice is lost.
* `fixed`: the whole mask is held fixed and every row's kept weights are the exact least-squares
  solution min ‖X(w' − w)‖² s.t. w'_j = 0 where pruned (`masked_least_squares`). SparseGPT with a
  fixed mask only approximates this: it never revisits a column once it has passed it.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

from patchsparse.errors import PatchsparseError
from patchsparse.masks.spec import HybridMaskSpec
from patchsparse.models.layers import LayerSelection
from patchsparse.prior.layerwise import calibrate_layer_by_layer
from patchsparse.prior.oneshot import prune_model
from patchsparse.prior.pruners import SparseGPTOptions
from patchsparse.prior.stats import HessianStat

MODES = ("repick", "fixed")


def selection_of(spec: HybridMaskSpec) -> LayerSelection:
    """A layer selection matching exactly the layers of `spec`."""
    return LayerSelection(include=tuple(f"^{re.escape(name)}$" for name in spec.layers))


@torch.no_grad()
def masked_least_squares(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, damp: float = 0.01,
                         iterations: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """Per row r: argmin_{w'} (w' − w_r)ᵀ (H + λI) (w' − w_r) with w'_j = 0 where ¬keep_rj.

    weight (out, in), hessian (in, in) ∝ XᵀX, keep bool (out, in) -> float32 (out, in), zero where pruned.
    λ = damp · mean(diag H), as SparseGPT damps. Solved by conjugate gradients restricted to each
    row's kept coordinates (all rows at once, each with its own step sizes): exact in at most
    (kept per row) iterations, and far fewer in practice since H's spectrum is clustered.
    """
    W = weight.detach().double()
    H = hessian.detach().double().clone()
    H.diagonal().add_(damp * H.diagonal().mean().clamp_min(1e-12))
    K = keep.to(W.device, torch.float64)
    # Unknowns d = w' − w on kept coordinates; w'_P = 0 fixes d_P = −w_P. Normal equations on the
    # kept set: (H d)_S = 0  ⇔  (H d_S)_S = −(H d_P)_S, with d_P = −w_P.
    fixed = -W * (1 - K)                                   # d on the pruned coordinates
    rhs = -(fixed @ H) * K                                 # (out, in), zero off the kept set
    x = torch.zeros_like(W)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(dim=1)
    scale = rs.max().clamp_min(1e-30)
    for _ in range(iterations):
        if float(rs.max()) <= tol * tol * float(scale):
            break
        Ap = (p @ H) * K
        alpha = rs / (p * Ap).sum(dim=1).clamp_min(1e-300)
        x += alpha[:, None] * p
        r -= alpha[:, None] * Ap
        rs_new = (r * r).sum(dim=1)
        p = r + (rs_new / rs.clamp_min(1e-300))[:, None] * p
        rs = rs_new
    return ((W + x + fixed) * K).float()


def _common_tile(spec: HybridMaskSpec) -> tuple[int, int] | None:
    tiles = {layer.tile for layer in spec.layers.values()}
    if len(tiles) != 1:
        raise PatchsparseError(f"the masks use several tile sizes ({sorted(map(str, tiles))}); repick needs one")
    return next(iter(tiles))


def reconstruct_model(model: nn.Module, spec: HybridMaskSpec, calib_windows: torch.Tensor, mode: str = "repick", *,
                      options: SparseGPTOptions = SparseGPTOptions(), batch_size: int = 1) -> HybridMaskSpec:
    """Reconstruct the weights of `spec`'s layers IN PLACE (the model must hold its dense weights).

    Returns the masks the new weights belong to (`repick` chooses new 2:4 groups; `fixed`
    returns `spec`'s masks). Every pruned weight is zero afterwards.
    """
    if mode not in MODES:
        raise PatchsparseError(f"unknown reconstruction '{mode}' (choose {', '.join(MODES)})")
    if calib_windows is None or calib_windows.shape[0] == 0:
        raise PatchsparseError("reconstruction needs calibration windows")
    spec.check_matches(model)
    metadata = {**spec.metadata, "reconstruction": mode,
                "reconstruction_windows": int(calib_windows.shape[0]),
                "reconstruction_seqlen": int(calib_windows.shape[1])}
    if mode == "repick":
        patterns = {layer.pattern for layer in spec.layers.values()}
        if patterns != {"2:4"}:
            raise PatchsparseError(f"repick redoes 2:4 groups; these masks use {sorted(patterns)} (use fixed)")
        tile = _common_tile(spec)
        dense = None if tile is None else {name: layer.dense_tiles for name, layer in spec.layers.items()}
        new = prune_model(model, calib_windows, "sparsegpt", "2:4", tile=tile, selection=selection_of(spec),
                          update_weights=True, options=options, batch_size=batch_size, dense_tiles=dense)
        new.metadata = {**metadata, **{k: v for k, v in new.metadata.items() if k.startswith("calibration")},
                        "sparsity": new.sparsity()}
        return new

    def solve_layer(index: int, block: dict[str, nn.Linear], stats: dict[str, Any]) -> None:
        for name, linear in block.items():
            keep = spec.layers[name].keep_mask().to(linear.weight.device)
            updated = masked_least_squares(linear.weight, stats[name].hessian, keep, options.damp)
            linear.weight.copy_(updated.to(linear.weight.dtype))

    calibrate_layer_by_layer(model, calib_windows, lambda linear: HessianStat(linear.in_features, linear.weight.device),
                             solve_layer, selection=selection_of(spec), batch_size=batch_size, desc="reconstruct")
    return HybridMaskSpec(dict(spec.layers), metadata)


def updated_weights(model: nn.Module, spec: HybridMaskSpec) -> dict[str, torch.Tensor]:
    """The reconstructed weights of `spec`'s layers, on CPU (to save beside the masks)."""
    return {name: module.weight.detach().cpu().clone() for name, module in spec.check_matches(model).items()}

