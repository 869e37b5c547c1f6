"""Block-wise (local) mask learning: each decoder block's mask logits are trained to reproduce the
dense block's output on calibration activations, one block at a time (as BESA does for per-row
sparsity), instead of the whole model's language-model loss.

For block b, with X̂_b its inputs in the masked model and X_b those of the dense model:
  L_b = ‖f_b(X̂_b; W ⊙ M̃) − f_b(X_b; W)‖² / ‖f_b(X_b; W) − X_b‖²  +  λ_s·R_s(block b's masks)
The target is the dense model's own block output, as in block reconstruction
(`patchsparse.reconstruct.reconstruct_blocks`), so every block learns to undo what the blocks
before it lost. The denominator is the block's own contribution to the residual stream, so the loss
is a relative error whatever the stream's scale. τ and κ anneal over each block's steps as they do
over a whole run. After its steps a block's hard masks (threshold) produce the next block's inputs.
The masks stay attached: extraction (`exact` by default) then ranks all tiles of all blocks
together, which keeps the global target.

With `weight_lr > 0` the block's weights learn together with its masks (masks chosen for weights
that compensate, not for the frozen dense ones): a pattern that looks costly with frozen weights
may cost little once the kept weights move, and the frozen-weight choice cannot see that. The
learned weights are returned (the model gets its dense weights back) to start block
reconstruction under the extracted masks.

Why: a step touches one block and no LM head, so hundreds of steps per block cost about what a
few dozen end-to-end steps do, and the target (a whole hidden state per token) carries far more
signal than one next-token label.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from patchsparse.errors import PatchsparseError
from patchsparse.learn.config import LearnConfig
from patchsparse.learn.masked import HARD, OFF, SAMPLE, MaskedModel, attach_masks
from patchsparse.learn.objective import sparsity_regulariser
from patchsparse.learn.schedules import cosine_lr
from patchsparse.models.layers import block_index, decoder_layers
from patchsparse.prior.layerwise import LayerInputs, capture_layer_inputs, relative_block_error
from patchsparse.prior.types import PriorMasks
from patchsparse.utils import progress


@dataclass(frozen=True)
class BlockwiseConfig:
    steps: int = 64           # optimizer steps per block
    windows_per_step: int = 2  # calibration windows in one step's batch
    weight_lr: float = 0.0    # > 0: the block's weights learn with its masks, at this peak rate

    def check(self) -> None:
        if self.steps < 1 or self.windows_per_step < 1:
            raise PatchsparseError("block-wise learning needs at least one step and one window per step")
        if not self.weight_lr >= 0:
            raise PatchsparseError(f"block-wise weight learning rate must be >= 0, got {self.weight_lr}")


@dataclass
class BlockwiseResult:
    masked: MaskedModel
    # the learned weights (CPU, under soft masks: extract the hard masks before using them), when
    # the weights learned; the model itself holds its dense weights again
    weights: dict[str, torch.Tensor] | None = None


def learn_blockwise(model: nn.Module, calib_windows: torch.Tensor, config: LearnConfig, prior: PriorMasks | None,
                    blockwise: BlockwiseConfig = BlockwiseConfig(),
                    on_block_end: Callable[[int, dict], None] | None = None) -> BlockwiseResult:
    """Attach masks to `model` and learn them block by block on `calib_windows` (n, seqlen).

    Returns with the masks attached (extract, then remove, as after `learn_masks`). Uses the
    config's mask, sampling, sparsity regulariser and optimizer settings; `blockwise.steps` replaces
    the number of steps (per block), and R_w is not used (the reconstruction target already keeps
    the weights that matter).
    """
    config.check()
    blockwise.check()
    if calib_windows.dim() != 2 or calib_windows.shape[0] < 1:
        raise PatchsparseError(f"block-wise learning needs calibration windows (n, seqlen), got {tuple(calib_windows.shape)}")
    local = dataclasses.replace(
        config, train=dataclasses.replace(config.train, steps=blockwise.steps, grad_accum=1),
        objective=dataclasses.replace(config.objective, weight_reg=0.0))
    masked = attach_masks(model, local, prior)
    sampler, mc = masked.sampler, local.mask
    _, layers = decoder_layers(model, mc.selection.decoder_path)
    blocks: dict[int, list[str]] = {}
    for name in masked.masks:
        blocks.setdefault(block_index(name), []).append(name)
    device = masked.parameters()[0].device
    sampler.mode = OFF
    inputs = capture_layer_inputs(model, calib_windows.to(device), layers, blockwise.windows_per_step)
    dense_x = inputs.hidden
    sparse_x = dense_x.clone()
    batches = list(inputs.batches())
    generator = torch.Generator().manual_seed(config.train.seed)
    learned: dict[str, torch.Tensor] | None = {} if blockwise.weight_lr > 0 else None
    training: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}  # the current block's weights and dense copies
    try:
        for index in progress(range(max(blocks) + 1), desc=f"learn {mc.mode} block-wise", unit="block"):
            layer = layers[index]
            sampler.mode = OFF
            target = inputs.outputs(layer, index, dense_x)  # the dense block on the dense model's activations
            if index in blocks:
                if learned is not None:
                    training = {name: (weight, weight.detach().clone())
                                for name, weight in ((n, _original_weight(model, n)) for n in blocks[index])}
                metrics = _learn_block(layer, index, inputs, sparse_x, target, dense_x, masked, blocks[index], local,
                                       batches, generator, {name: w for name, (w, _) in training.items()},
                                       blockwise.weight_lr)
                if on_block_end is not None:
                    on_block_end(index, metrics)
            sampler.mode = HARD  # the next block learns on what this one will really give it
            sparse_x = inputs.outputs(layer, index, sparse_x)
            for name, (weight, _) in training.items():
                learned[name] = weight.detach().cpu().clone()
            _restore(training)
            training = {}
            dense_x = target
    finally:
        _restore(training)  # later targets and the caller need the dense model, even after a failure
        sampler.mode = HARD
    return BlockwiseResult(masked, learned)


def _original_weight(model: nn.Module, name: str) -> nn.Parameter:
    """The weight under a layer's mask parametrization (what W ⊙ M̃ is built from)."""
    return model.get_submodule(name).parametrizations.weight.original


@torch.no_grad()
def _restore(training: dict[str, tuple[nn.Parameter, torch.Tensor]]) -> None:
    for weight, dense in training.values():
        weight.copy_(dense)


def _learn_block(layer: nn.Module, index: int, inputs: LayerInputs, x: torch.Tensor, target: torch.Tensor,
                 dense_x: torch.Tensor, masked: MaskedModel, names: list[str], config: LearnConfig,
                 batches: list[slice], generator: torch.Generator, weights: dict[str, nn.Parameter],
                 weight_lr: float) -> dict:
    mc, oc, steps = config.mask, config.optim, config.train.steps
    sampler = masked.sampler
    block = MaskedModel({n: masked.masks[n] for n in names}, sampler, 1.0)
    params = block.parameters()
    tile_params = [masked.masks[n].tile_logits for n in names if masked.masks[n].tile_logits is not None]
    nm_params = [masked.masks[n].pattern_logits for n in names if masked.masks[n].pattern_logits is not None]
    groups = [g for g in ({"params": tile_params, "lr_scale": 1.0},
                          {"params": nm_params, "lr_scale": oc.nm_lr_scale}) if g["params"]]
    if weights:
        groups.append({"params": list(weights.values()), "lr_scale": weight_lr / oc.lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=oc.lr, betas=oc.betas, eps=oc.eps, weight_decay=oc.weight_decay)
    order = torch.randperm(len(batches), generator=generator).tolist()
    error = reg_value = 0.0
    try:
        for weight in weights.values():
            weight.requires_grad_(True)
        with torch.enable_grad():
            for step in range(steps):
                sampler.mode = SAMPLE
                sampler.set_step(step, config, 1.0)
                lr = cosine_lr(step, steps, oc.lr, oc.warmup_steps, oc.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                rows = batches[order[step % len(order)]]
                loss = relative_block_error(inputs.output(layer, index, x[rows]), target[rows], dense_x[rows])
                error = float(loss.detach())
                if mc.learns_tiles and config.objective.sparse_reg > 0:
                    reg, _ = sparsity_regulariser(block, mc.sparsity, "global")
                    loss = loss + config.objective.sparse_reg * reg
                    reg_value = float(reg.detach())
                loss.backward()
                if oc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, oc.grad_clip)  # the masks' logits, as end to end
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        for weight in weights.values():
            weight.requires_grad_(False)
    return {"block": index, "relative_error": error, "sparse_reg": reg_value}
