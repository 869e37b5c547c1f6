"""How much memory mask learning needs: training state per masked weight and capacity plans.

Pure arithmetic over layer shapes, so the plan for a 70B model needs no 70B tensors;
`benchmarks/memory.py` checks the state part against the tensors of an attached model.

Per masked weight (tile r×c, one logit per group of four inputs per pattern):
- maskllm     6 pattern logits per 4 weights = 1.5 logits
- patch-tile  1 tile logit per r·c weights (1/16384 at 128×128) + the frozen 2:4 mask (a buffer)
- patch-joint both sets of logits

Each logit costs, per `Precision`: the value the forward reads, its accumulated gradient, an
optional fp32 master copy, and the optimizer's two Adam moments. `Sharding` says which of these
are split across data-parallel ranks (ZeRO-1: optimizer state; ZeRO-2: + gradients; FSDP: + logits
and the frozen weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

MODES = ("maskllm", "patch-tile", "patch-joint")
GIB = 1024 ** 3


def mask_logit_counts(shape: tuple[int, int], mode: str, tile: tuple[int, int]) -> tuple[int, int]:
    """(2:4 pattern logits, tile logits) of one (out, in) weight; edge tiles may be ragged."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    out_f, in_f = shape
    patterns = out_f * (in_f // 4) * 6 if mode in ("maskllm", "patch-joint") else 0
    tiles = math.ceil(out_f / tile[0]) * math.ceil(in_f / tile[1]) if mode in ("patch-tile", "patch-joint") else 0
    return patterns, tiles


# Bytes per weight of the frozen 2:4 mask patch-tile keeps: a bool tensor, one pattern index per
# group of four (uint8), or bit-packed.
FROZEN_MASK_BYTES = {"bool": 1.0, "index": 0.25, "packed": 0.125}


@dataclass(frozen=True)
class Precision:
    """Bytes per logit of each piece of training state; `host` pieces live in CPU memory."""

    name: str
    logits: float          # what the forward reads, on the accelerator
    grads: float           # the gradient accumulated over micro-batches
    master: float          # fp32 master copy kept apart from `logits` (0: the logits are their own master)
    optim: float           # Adam's first and second moments together
    host: tuple[str, ...] = ()  # pieces held in host memory ("master", "optim")
    note: str = ""


PRECISIONS = {
    p.name: p for p in (
        Precision("fp32", 4, 4, 0, 8, note="fp32 logits, gradients and AdamW moments (patchsparse's trainer)"),
        Precision("bf16", 2, 2, 0, 4, note="everything bf16 (the published PATCH code; small updates round away)"),
        Precision("bf16-offload", 2, 4, 4, 8, host=("master", "optim"),
                  note="bf16 logits + fp32 gradients on the GPU; fp32 master and AdamW moments in host memory"),
        Precision("bf16-host", 2, 4, 4, 8, host=("grads", "master", "optim"),
                  note="bf16 logits on the GPU; fp32 gradients (accumulated per micro-batch), master and AdamW "
                       "moments in host memory"),
        Precision("bf16-8bit", 2, 2, 0, 2,
                  note="bf16 logits (stochastic rounding) + bf16 gradients, block-wise 8-bit Adam moments"),
    )
}

# Which pieces each sharding splits across the ranks.
SHARDINGS = {
    "none": (),
    "zero1": ("optim", "master"),
    "zero2": ("optim", "master", "grads"),
    "fsdp": ("optim", "master", "grads", "logits", "weights", "frozen_mask"),
}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a model: its masked weights and its sizes."""

    name: str
    linears: Mapping[str, tuple[int, int]]   # masked decoder linears: name -> (out, in)
    other_params: int                        # embeddings, norms, untied lm_head (frozen, not masked)
    hidden: int
    intermediate: int
    layers: int
    vocab: int

    @property
    def masked_weights(self) -> int:
        return sum(o * i for o, i in self.linears.values())

    def largest_block_weights(self) -> int:
        """Masked weights of the largest decoder block (the unit of activation checkpointing)."""
        from patchsparse.models.layers import block_index

        per_block: dict[int, int] = {}
        for name, (o, i) in self.linears.items():
            per_block[block_index(name)] = per_block.get(block_index(name), 0) + o * i
        return max(per_block.values())


def model_shape_of(model, name: str) -> ModelShape:
    """ModelShape of a loaded (or meta-device) HF causal LM."""
    from patchsparse.models.layers import select_linears

    linears = select_linears(model)
    masked_ids = {id(m.weight) for m in linears.values()}
    seen, other = set(), 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in masked_ids:
            other += p.numel()
        seen.add(id(p))
    c = model.config
    return ModelShape(name, {n: tuple(m.weight.shape) for n, m in linears.items()}, other,
                      c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size)


@dataclass(frozen=True)
class StateBytes:
    """Training state of the masks of a whole model, in bytes, before sharding."""

    pattern_logits: int
    tile_logits: int
    pieces: dict[str, float]  # logits, grads, master, optim, frozen_mask
    masked_weights: int

    @property
    def logits(self) -> int:
        return self.pattern_logits + self.tile_logits

    @property
    def total(self) -> float:
        return sum(self.pieces.values())

    @property
    def per_weight(self) -> float:
        return self.total / self.masked_weights


def state_bytes(linears: Iterable[tuple[int, int]], mode: str, tile: tuple[int, int], precision: Precision,
                frozen_mask: str = "bool") -> StateBytes:
    """Bytes of logits, gradients, master copy, optimizer state and frozen 2:4 mask."""
    shapes = list(linears)
    counts = [mask_logit_counts(s, mode, tile) for s in shapes]
    patterns, tiles = sum(c[0] for c in counts), sum(c[1] for c in counts)
    weights = sum(o * i for o, i in shapes)
    n = patterns + tiles
    pieces = {"logits": n * precision.logits, "grads": n * precision.grads, "master": n * precision.master,
              "optim": n * precision.optim,
              "frozen_mask": weights * FROZEN_MASK_BYTES[frozen_mask] if mode == "patch-tile" else 0.0}
    return StateBytes(patterns, tiles, pieces, weights)


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation memory of one step with every decoder block checkpointed (bf16 compute).

    checkpoints: each block's input, B·T·h·2 bytes, for every block;
    block:       one block being recomputed in backward, B·T·(8h + 4i)·2 bytes (attention with a
                 fused kernel, so no T² term);
    loss:        the logits in bf16, their fp32 upcast and its gradient, B·T·V·10 bytes;
    masks:       the soft masks of one block, alive while it is recomputed: its masked weights ×
                 `mask_bytes_per_weight` (set from a measurement; see docs/SCALE.md).
    """

    batch: int
    seqlen: int
    mask_bytes_per_weight: float

    def pieces(self, shape: ModelShape) -> dict[str, float]:
        tokens = self.batch * self.seqlen
        return {"checkpoints": shape.layers * tokens * shape.hidden * 2,
                "block": tokens * (8 * shape.hidden + 4 * shape.intermediate) * 2,
                "loss": tokens * shape.vocab * 10,
                "masks": shape.largest_block_weights() * self.mask_bytes_per_weight}


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    mode: str
    precision: str
    sharding: str
    ranks: int
    device: dict[str, float] = field(default_factory=dict)  # bytes per accelerator, by piece
    host: dict[str, float] = field(default_factory=dict)    # bytes of host memory per rank, by piece

    @property
    def device_total(self) -> float:
        return sum(self.device.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())

    def fits(self, device_bytes: float) -> bool:
        return self.device_total <= device_bytes


def plan_memory(shape: ModelShape, mode: str, precision: Precision, sharding: str = "none", ranks: int = 1,
                tile: tuple[int, int] = (128, 128), weight_bytes: float = 2, frozen_mask: str = "bool",
                activations: ActivationEstimate | None = None) -> MemoryPlan:
    """Bytes per accelerator (and host memory per rank) of a mask-learning step."""
    if sharding not in SHARDINGS:
        raise ValueError(f"unknown sharding {sharding!r}")
    split = SHARDINGS[sharding]
    state = state_bytes(shape.linears.values(), mode, tile, precision, frozen_mask)
    pieces = {"weights": (shape.masked_weights + shape.other_params) * weight_bytes, **state.pieces}
    device: dict[str, float] = {}
    host: dict[str, float] = {}
    for piece, size in pieces.items():
        if size == 0:
            continue
        share = size / ranks if piece in split else size
        (host if piece in precision.host else device)[piece] = share
    if activations is not None:
        device.update({f"act_{k}": v for k, v in activations.pieces(shape).items()})
    if sharding == "fsdp" and ranks > 1:
        # FSDP gathers one block's weights and logits to compute it, and prefetches the next.
        block = shape.largest_block_weights()
        logits_per_weight = state.logits / state.masked_weights
        device["gathered_blocks"] = 2 * block * (weight_bytes + logits_per_weight * precision.logits)
    return MemoryPlan(shape.name, mode, precision.name, sharding, ranks, device, host)
