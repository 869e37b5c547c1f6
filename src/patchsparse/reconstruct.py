"""Weight reconstruction once a mask is chosen: the kept weights change so each layer's output
moves as little as possible from the dense layer's on calibration inputs.

Three ways, all sequential (each decoder layer calibrated on the outputs of the already-reconstructed
ones, as the one-shot pruners are):

* `repick` (default): the dense tiles stay where the mask has them; inside the sparse tiles
  SparseGPT chooses the 2:4 groups again on the weights as it updates them, and spreads each
  pruning error onto the weights not yet visited. Learned dense-tile allocations keep what
  learning found (where density goes); the 2:4 patterns are redone, so a learned 2:4 choice is lost.
* `fixed`: the whole mask is held fixed and every row's kept weights are the exact least-squares
  solution min ‖X(w' − w)‖² s.t. w'_j = 0 where pruned (`masked_least_squares`). SparseGPT with a
  fixed mask only approximates this: it never revisits a column once it has passed it.
* `block`: the whole mask is held fixed and each decoder block's kept weights are trained together
  (Adam, a few steps per block) so that the block, fed what the reconstructed blocks before it
  give, reproduces what the *dense* block gives on the dense model's own activations
  (`reconstruct_blocks`). Unlike the two layer-wise ways, the target is the dense model's, not the
  dense layer applied to the sparse model's inputs, so each block also undoes the error the blocks
  before it left, and the linears of a block (attention and MLP) adjust to each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from patchsparse.errors import PatchsparseError
from patchsparse.masks.spec import HybridMaskSpec
from patchsparse.models.layers import LayerSelection, decoder_layers
from patchsparse.prior.layerwise import (LayerInputs, calibrate_layer_by_layer, capture_layer_inputs,
                                         linears_by_block, relative_block_error)
from patchsparse.prior.oneshot import prune_model
from patchsparse.prior.pruners import SparseGPTOptions
from patchsparse.prior.stats import HessianStat
from patchsparse.utils import progress

MODES = ("repick", "fixed", "block")


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


@dataclass(frozen=True)
class BlockFit:
    """How `block` reconstruction trains each decoder block's kept weights."""

    steps: int = 64            # Adam steps per block
    windows_per_step: int = 2  # calibration windows in one step's batch
    lr: float = 3e-3           # peak learning rate (cosine decay to a tenth over each block's steps)
    seed: int = 0              # order of the windows

    def check(self) -> None:
        if self.steps < 1 or self.windows_per_step < 1:
            raise PatchsparseError("block reconstruction needs at least one step and one window per step")
        if not self.lr > 0:
            raise PatchsparseError(f"block reconstruction needs a positive learning rate, got {self.lr}")


def reconstruct_blocks(model: nn.Module, spec: HybridMaskSpec, calib_windows: torch.Tensor,
                       fit: BlockFit = BlockFit(), start: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Train the kept weights of `spec`'s layers IN PLACE, block by block, under the fixed mask.

    Block b's kept weights minimise relative_block_error(f_b(X̂_b), f_b^dense(X_b), X_b), where X_b is
    what the dense model gives block b and X̂_b what the already reconstructed blocks give it. The
    model must hold its dense weights (the targets); the fit starts from `start`'s weights where given
    (e.g. the layer-wise least-squares ones or a one-shot pruner's update), else from the dense ones.
    Every pruned weight is zero afterwards. Returns, per block that holds masked layers, the
    relative error on its first step's batch and on all windows after its fit.
    """
    fit.check()
    linears = spec.check_matches(model)
    path, layers = decoder_layers(model, selection_of(spec).decoder_path)
    grouped = linears_by_block(linears, path, len(layers))
    device = next(model.parameters()).device
    inputs = capture_layer_inputs(model, calib_windows.to(device), layers, fit.windows_per_step)
    dense_x = inputs.hidden
    sparse_x = dense_x.clone()
    generator = torch.Generator().manual_seed(fit.seed)
    metrics = []
    last = max(grouped)
    for index in progress(range(last + 1), desc="reconstruct blocks", unit="block"):
        layer, block = layers[index], grouped.get(index, {})
        target = inputs.outputs(layer, index, dense_x)  # the dense block, on the dense model's activations
        if block:
            keep = {name: spec.layers[name].keep_mask().to(device) for name in block}
            with torch.no_grad():
                for name, linear in block.items():
                    if start is not None and name in start:
                        linear.weight.copy_(start[name].to(linear.weight.device, linear.weight.dtype))
                    linear.weight.mul_(keep[name].to(linear.weight.dtype))
            first = _fit_block(layer, index, inputs, block, keep, sparse_x, target, dense_x, fit, generator)
            sparse_x = inputs.outputs(layer, index, sparse_x)
            metrics.append({"block": index, "first_step_error": first,
                            "relative_error": float(relative_block_error(sparse_x, target, dense_x))})
        else:
            sparse_x = inputs.outputs(layer, index, sparse_x)
        dense_x = target
    return metrics


def _fit_block(layer: nn.Module, index: int, inputs: LayerInputs, block: dict[str, nn.Linear],
               keep: dict[str, torch.Tensor], sparse_x: torch.Tensor, target: torch.Tensor, dense_x: torch.Tensor,
               fit: BlockFit, generator: torch.Generator) -> float:
    """Adam on float32 copies of the block's kept weights (so half-precision models train too); the
    gradient is masked, so pruned weights, zero from the start, stay zero. -> the first step's error"""
    masters = {name: linear.weight.detach().float().clone().requires_grad_(True) for name, linear in block.items()}
    optimizer = torch.optim.Adam(list(masters.values()), lr=fit.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=fit.steps, eta_min=0.1 * fit.lr)
    batches = list(inputs.batches())
    flags = {param: param.requires_grad for param in layer.parameters()}
    first = float("nan")
    try:
        layer.requires_grad_(False)
        for linear in block.values():
            linear.weight.requires_grad_(True)
        with torch.enable_grad():
            order: list[int] = []
            for step in range(fit.steps):
                if not order:
                    order = torch.randperm(len(batches), generator=generator).tolist()
                rows = batches[order.pop()]
                loss = relative_block_error(inputs.output(layer, index, sparse_x[rows]), target[rows], dense_x[rows])
                if step == 0:
                    first = float(loss.detach())
                loss.backward()
                for name, linear in block.items():
                    masters[name].grad = linear.weight.grad.float() * keep[name]
                    linear.weight.grad = None
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for name, linear in block.items():
                        linear.weight.copy_(masters[name].to(linear.weight.dtype))
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)
    return first


def reconstruct_model(model: nn.Module, spec: HybridMaskSpec, calib_windows: torch.Tensor, mode: str = "repick", *,
                      options: SparseGPTOptions = SparseGPTOptions(), batch_size: int = 1,
                      block_fit: BlockFit = BlockFit(), start: dict[str, torch.Tensor] | None = None) -> HybridMaskSpec:
    """Reconstruct the weights of `spec`'s layers IN PLACE (the model must hold its dense weights).

    Returns the masks the new weights belong to (`repick` chooses new 2:4 groups; `fixed` and
    `block` return `spec`'s masks). Every pruned weight is zero afterwards. `block` starts its fit
    from `start`'s weights where given (e.g. a one-shot pruner's update); the layer-wise modes always
    start from the dense weights.
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

    if mode == "block":
        reconstruct_blocks(model, spec, calib_windows, block_fit, start=start)
        return HybridMaskSpec(dict(spec.layers), {**metadata, "reconstruction_steps_per_block": block_fit.steps,
                                                  "reconstruction_lr": block_fit.lr})

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

