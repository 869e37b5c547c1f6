"""Learnable masks attached to `nn.Linear.weight` as parametrizations.

Each selected linear keeps being an `nn.Linear`; `torch.nn.utils.parametrize` makes `weight` the
output of a `HybridMask` module that holds the layer's mask logits (fp32, whatever the model's
dtype). The training step builds every layer's soft weight once per micro-batch, before the
forward (`soft_weights_built_once`), so activation checkpointing does not build it a second time
in its recompute; with `TrainConfig.cache_soft_weights` off it is built inside the layer's own
forward instead, freed after it and rebuilt during backward (less memory, more time). Removing
the parametrization with `leave_parametrized=False` restores the original weight; the hard masks
go through `extract_masks` into a `HybridMaskSpec`.

All masks of one model share a `MaskSampler`, the per-step sampling state (temperatures, logit
scales, noise stream) that the training loop sets before each step.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from patchsparse.errors import PatchsparseError
from patchsparse.learn.config import LearnConfig, MaskConfig
from patchsparse.learn.fused import fused_available, fused_hybrid_weight
from patchsparse.learn.init import init_pattern_logits, init_tile_logits
from patchsparse.learn.noise import NoiseTable, splitmix64, table_length_for
from patchsparse.learn.schedules import weight_reg_decay
from patchsparse.learn.soft_masks import (
    flush_subnormal,
    hard_pattern_index,
    hybrid_soft_weight,
    soft_kept,
    soft_nm_mask,
    soft_tile_values,
)
from patchsparse.masks.learned import LearnedMask, find_masks
from patchsparse.masks.patterns import mask_from_pattern_index
from patchsparse.masks.tiles import TileGrid
from patchsparse.models.layers import block_index, select_linears
from patchsparse.prior.allocation import edge_dense_blocks, sparse_block_count
from patchsparse.prior.types import PriorMasks

SAMPLE, EXPECTED, HARD, OFF = "sample", "expected", "hard", "off"


class MaskSampler:
    """Sampling state shared by the masks of one model.

    mode: `sample` (Gumbel noise, training), `expected` (no noise: the soft masks at the current
    τ, κ), `hard` (arg-max patterns, tiles dense where ℓ > 0: the threshold-extracted model) or
    `off` (no mask at all: the dense model, the distillation teacher).
    """

    def __init__(self, noise: NoiseTable | None) -> None:
        self.noise = noise
        self.mode = SAMPLE
        self.step = 0
        self.tau_nm = self.kappa_nm = self.tau_tile = self.kappa_tile = 1.0
        self.hard_nm = self.hard_tile = False
        # ∂L/∂‖W_l ⊙ M̃_l‖_F for every layer: −λ_w·(1 − t/T) / (Σ_l ‖W_l‖_F · micro-batches); 0 turns R_w off.
        self.weight_reg_grad = 0.0
        self.layer_norms: dict[int, torch.Tensor] = {}  # last ‖W_l ⊙ M̃_l‖_F seen, for logging

    def set_step(self, step: int, config: LearnConfig, weight_norm_total: float) -> None:
        total = config.train.steps
        s = config.sampling
        self.step = step
        self.tau_nm, self.kappa_nm = s.tau_nm.at(step, total), s.kappa_nm.at(step, total)
        self.tau_tile, self.kappa_tile = s.tau_tile.at(step, total), s.kappa_tile.at(step, total)
        self.hard_nm, self.hard_tile = config.mask.hard_nm, config.mask.hard_tile
        lam = config.objective.weight_reg
        self.weight_reg_grad = (-lam * weight_reg_decay(step, total) / (weight_norm_total * config.train.grad_accum)
                                if lam > 0 else 0.0)

    def pattern_noise(self, index: int, shape: torch.Size) -> torch.Tensor | None:
        if self.mode != SAMPLE or self.noise is None:
            return None
        return self.noise.window(self.step, 2 * index, math.prod(shape)).view(shape)

    def tile_noise(self, index: int, shape: torch.Size) -> torch.Tensor | None:
        if self.mode != SAMPLE or self.noise is None:
            return None
        return self.noise.logistic(self.step, 2 * index + 1, math.prod(shape)).view(shape)


class _AddToLoss(torch.autograd.Function):
    """Identity on `x`; in backward, gives `aux` the gradient `scale`, as if `scale·aux` were a
    term of the loss. Lets a layer add its own regulariser term from inside its forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class HybridMask(LearnedMask):
    """Parametrization W ↦ W ⊙ M̃ of one linear's weight.

    Holds (fp32) `pattern_logits` (out, in/4, 6) in maskllm / patch-joint mode, a frozen
    `sparse_keep` 2:4 mask in patch-tile mode, and `tile_logits` (R, C) in the patch modes.
    """

    def __init__(self, index: int, shape: tuple[int, int], sampler: MaskSampler,
                 pattern_logits: torch.Tensor | None, tile_logits: torch.Tensor | None,
                 sparse_keep: torch.Tensor | None, grid: TileGrid | None,
                 sparse_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.index = index
        self.shape = shape
        self.sampler = sampler
        self.grid = grid
        self.pattern_logits = None if pattern_logits is None else nn.Parameter(pattern_logits.float())
        self.tile_logits = None if tile_logits is None else nn.Parameter(tile_logits.float())
        self.register_buffer("sparse_keep", sparse_keep)
        # the weights the 2:4 part uses, when they are not the layer's own (fitted to the 2:4 mask)
        self.register_buffer("sparse_weight", sparse_weight, persistent=False)
        if grid is not None:
            numel = grid.tile_numel().to(torch.float32)
            if sparse_keep is None:
                density = torch.full(grid.shape, 0.5)  # learned 2:4: exactly half of every tile
            else:
                density = grid.reduce_sum(sparse_keep.to(torch.float32).cpu()) / numel
            device = (self.tile_logits if self.tile_logits is not None else pattern_logits).device
            self.register_buffer("tile_numel", numel.to(device), persistent=False)
            self.register_buffer("sparse_density", density.to(device), persistent=False)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    # ---- the two parts of the soft mask -------------------------------------------------------
    def sparse_mask(self) -> torch.Tensor:
        """The 2:4 part: soft sample, arg-max (hard mode) or the frozen prior. -> (out, in)"""
        s = self.sampler
        if self.pattern_logits is None:
            return self.sparse_keep
        if s.mode == HARD:
            return mask_from_pattern_index(hard_pattern_index(self.pattern_logits).cpu()).to(self.pattern_logits.device)
        noise = s.pattern_noise(self.index, self.pattern_logits.shape)
        return soft_nm_mask(self.pattern_logits, noise, s.kappa_nm, s.tau_nm, s.hard_nm)

    def tile_values(self) -> torch.Tensor | None:
        """Soft 'dense' value of every tile (1/0 in hard mode). -> (R, C) or None"""
        if self.tile_logits is None:
            return None
        s = self.sampler
        if s.mode == HARD:
            return (self.tile_logits > 0).to(torch.float32)
        noise = s.tile_noise(self.index, self.tile_logits.shape)
        return soft_tile_values(self.tile_logits, noise, s.kappa_tile, s.tau_tile, s.hard_tile)

    def soft_kept(self) -> torch.Tensor:
        """Σ M̃ over the layer (exact, from the tile values alone). -> scalar"""
        t = self.tile_values()
        if t is None:
            return torch.tensor(0.5 * self.numel)
        return soft_kept(t, self.sparse_density, self.tile_numel)

    # ---- the parametrization ------------------------------------------------------------------
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.sampler
        if s.mode == OFF:
            return weight
        wants_norm = bool(s.weight_reg_grad) and torch.is_grad_enabled() and s.mode != HARD
        # the fused kernel gives no gradient for W: weights that learn (block-wise) take the autograd path
        if (s.mode != HARD and not (s.hard_nm and self.pattern_logits is not None) and fused_available(weight)
                and not weight.requires_grad and self.sparse_weight is None):
            noise = None if self.pattern_logits is None else s.pattern_noise(self.index, self.pattern_logits.shape)
            masked, norm = fused_hybrid_weight(weight, self.pattern_logits, noise,
                                               self.sparse_keep if self.pattern_logits is None else None,
                                               self.tile_values(), s.kappa_nm, s.tau_nm, self.grid)
        else:
            masked = hybrid_soft_weight(weight, self.sparse_mask(), self.tile_values(), self.grid, self.sparse_weight)
            if masked.device.type == "cpu":  # GPUs run subnormals at full speed
                masked = flush_subnormal(masked)
            norm = masked.float().norm() if wants_norm else None
        if wants_norm:
            s.layer_norms[self.index] = norm.detach()
            masked = _AddToLoss.apply(masked, norm, s.weight_reg_grad)
        return masked.to(weight.dtype)


@dataclass
class MaskedModel:
    """The masks attached to one model, in layer order, with what the objective needs."""

    masks: dict[str, HybridMask]
    sampler: MaskSampler
    weight_norm_total: float  # Σ_l ‖W_l‖_F over the masked layers (R_w's denominator)

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.masks.values() for p in m.parameters()]

    def numel(self) -> int:
        return sum(m.numel for m in self.masks.values())

    def soft_density_terms(self) -> dict[str, torch.Tensor]:
        """Σ M̃ per layer (with gradient)."""
        return {name: m.soft_kept() for name, m in self.masks.items()}


def _layer_seed(seed: int, index: int) -> int:
    return splitmix64((seed << 20) ^ index) & ((1 << 63) - 1)


def check_prior(linears: dict[str, nn.Linear], config: MaskConfig, prior: PriorMasks | None) -> None:
    """Everything the attachment needs from the prior, checked before the model changes."""
    if prior is None:
        if config.mode == "patch-tile":
            raise PatchsparseError("patch-tile mode needs a prior: its 2:4 mask is frozen from a one-shot pruner")
        return
    for name, linear in linears.items():
        layer = prior.get(name)
        if layer is None:
            raise PatchsparseError(f"the prior has no mask for layer '{name}'")
        if tuple(layer.nm_keep.shape) != tuple(linear.weight.shape):
            raise PatchsparseError(f"prior mask for '{name}' has shape {tuple(layer.nm_keep.shape)}, "
                                   f"the weight {tuple(linear.weight.shape)}")
        if config.learns_tiles and layer.tile_scores is not None:
            grid = TileGrid.for_weight(linear.weight, config.tile)
            if layer.tile is not None and tuple(layer.tile) != tuple(config.tile):
                raise PatchsparseError(f"prior tile scores were computed for tiles {tuple(layer.tile)}, "
                                       f"the masks use {tuple(config.tile)}")
            if tuple(layer.tile_scores.shape) != grid.shape:
                raise PatchsparseError(f"prior tile scores for '{name}' have shape {tuple(layer.tile_scores.shape)}, "
                                       f"the tile grid {grid.shape}")


def initial_layer_sparsity(names: list[str], config: MaskConfig) -> dict[str, float]:
    """The sparsity each layer's tile prior starts at: the target everywhere, or with the `edges`
    allocation 0 in the first and last blocks and 0.5 (all 2:4) in the others, as many of them as
    make the target over equal-sized blocks (`prior.allocation`)."""
    if config.init_allocation is None:
        return {name: config.sparsity for name in names}
    blocks = sorted({block_index(name) for name in names})
    sparse = {blocks[i] for i in edge_dense_blocks(len(blocks), sparse_block_count(len(blocks), config.sparsity))}
    return {name: 0.5 if block_index(name) in sparse else 0.0 for name in names}


def attach_masks(model: nn.Module, config: LearnConfig, prior: PriorMasks | None,
                 sparse_weights: dict[str, torch.Tensor] | None = None) -> MaskedModel:
    """Attach a learnable mask to every selected decoder linear (checks first, then changes).

    sparse_weights: per layer, the weights the 2:4 part of the mask keeps (e.g. fitted to the prior's
    2:4 masks by block reconstruction); the dense tiles keep the layer's own. Default: its own.
    """
    mc = config.mask
    mc.check()
    linears = select_linears(model, mc.selection)
    for name, linear in linears.items():
        if parametrize.is_parametrized(linear, "weight"):
            raise PatchsparseError(f"layer '{name}' already has a parametrization on its weight")
        out_f, in_f = linear.weight.shape
        if in_f % 4:
            raise PatchsparseError(f"layer '{name}' has {in_f} inputs, not a multiple of 4: no 2:4 mask fits")
        if sparse_weights is not None and (name not in sparse_weights
                                           or tuple(sparse_weights[name].shape) != (out_f, in_f)):
            raise PatchsparseError(f"no sparse-part weights of shape {(out_f, in_f)} for layer '{name}'")
    check_prior(linears, mc, prior)

    max_window = 0
    for linear in linears.values():
        out_f, in_f = linear.weight.shape
        max_window = max(max_window, out_f * in_f // 4 * 6, 2 * math.prod(TileGrid.for_weight(linear.weight, mc.tile).shape))
    device = next(iter(linears.values())).weight.device
    sampler = MaskSampler(NoiseTable(table_length_for(max_window), config.train.seed, device))

    layer_sparsity = initial_layer_sparsity(list(linears), mc)
    masks: dict[str, HybridMask] = {}
    norm_total = 0.0
    for index, (name, linear) in enumerate(linears.items()):
        weight = linear.weight
        shape = tuple(weight.shape)
        generator = torch.Generator().manual_seed(_layer_seed(config.train.seed, index))
        layer_prior = prior.get(name) if prior is not None else None
        prior_keep = layer_prior.nm_keep.cpu() if layer_prior is not None else None
        grid = TileGrid.for_weight(weight, mc.tile) if mc.learns_tiles else None
        pattern_logits = tile_logits = sparse_keep = None
        if mc.learns_patterns:
            pattern_logits = init_pattern_logits(shape, prior_keep, mc.init_std, mc.prior_strength_nm, generator).to(device)
        else:
            sparse_keep = prior_keep.to(device)
        if mc.learns_tiles:
            scores = layer_prior.tile_scores if layer_prior is not None else None
            tile_logits = init_tile_logits(grid, None if scores is None else scores.cpu(), layer_sparsity[name],
                                           mc.init_std, mc.prior_strength_tile, generator).to(device)
        sparse_weight = None if sparse_weights is None else sparse_weights[name].to(device, weight.dtype)
        masks[name] = HybridMask(index, shape, sampler, pattern_logits, tile_logits, sparse_keep, grid, sparse_weight)
        norm_total += float(weight.detach().float().norm())

    for name, linear in linears.items():
        linear.weight.requires_grad_(False)
        parametrize.register_parametrization(linear, "weight", masks[name], unsafe=True)
    return MaskedModel(masks, sampler, norm_total)


@contextlib.contextmanager
def soft_weights_built_once(model: nn.Module, masked: MaskedModel) -> Iterator[None]:
    """Inside: every masked layer's W ⊙ M̃ is built once, up front, and reused by each access.

    Under activation checkpointing a layer's forward runs twice (once more in backward), and on
    the CPU building the soft weight is about a third of a step; built outside the checkpointed
    layers, it is built once and both runs save the same tensors. The price: one weight-sized
    tensor per layer held from the forward to the layer's backward (as without checkpointing).
    """
    with parametrize.cached():
        for name in masked.masks:
            model.get_submodule(name).weight  # noqa: B018 - the access fills the cache
        yield


def remove_masks(model: nn.Module) -> int:
    """Take every HybridMask off; each layer is a plain nn.Linear with its original weight again."""
    count = 0
    for name, module in list(model.named_modules()):
        if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, HybridMask) for p in module.parametrizations.weight):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight.requires_grad_(False)
            count += 1
    return count


def group_kept(masked: MaskedModel, scope: str) -> list[tuple[torch.Tensor, int]]:
    """(Σ M̃, numel) per density group: one global group, one per layer, or one per block."""
    terms = masked.soft_density_terms()
    if scope == "layer":
        return [(terms[n], masked.masks[n].numel) for n in terms]
    groups: dict[object, list[str]] = defaultdict(list)
    for name in terms:
        groups["all" if scope == "global" else block_index(name)].append(name)
    return [(torch.stack([terms[n] for n in names]).sum(), sum(masked.masks[n].numel for n in names))
            for names in groups.values()]
