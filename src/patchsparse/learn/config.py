"""Frozen configuration of a mask-learning run, one dataclass per concern.

`LearnConfig` bundles them; `LearnConfig.to_dict()` / `from_dict()` round-trip through JSON so a
checkpoint can prove it belongs to the same run. Defaults follow the published PATCH-Joint 45%
recipe (docs/METHOD.md §7); `presets.py` holds the named variants.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from patchsparse.errors import PatchsparseError
from patchsparse.masks.tiles import check_hybrid_sparsity
from patchsparse.models.layers import LayerSelection

MODES = ("maskllm", "patch-tile", "patch-joint")
DENSITY_SCOPES = ("global", "layer", "block")
INIT_ALLOCATIONS = (None, "edges")   # where the tile prior starts the dense share (MaskConfig.init_allocation)
SPARSE_WEIGHTS = ("dense", "fitted")  # what the 2:4 part of a mask multiplies (MaskConfig.sparse_weights)


@dataclass(frozen=True)
class LinearSchedule:
    """A value that moves linearly from `start` (step 0) to `end` (the last step)."""

    start: float
    end: float

    def at(self, step: int, total_steps: int) -> float:
        from patchsparse.learn.schedules import linear_value

        return linear_value(self.start, self.end, step, total_steps)


@dataclass(frozen=True)
class MaskConfig:
    """What is learned and where it starts."""

    mode: str = "patch-joint"
    sparsity: float = 0.45                  # target; maskllm is always 0.5
    tile: tuple[int, int] = (128, 128)      # (rows along out_features, cols along in_features)
    selection: LayerSelection = LayerSelection()
    init_std: float = 0.014                 # σ of the random logit init and unit of the priors
    prior_strength_nm: float = 3.0          # α of the 2:4 prior (overwrite: (o − 1)·σ·α)
    prior_strength_tile: float = 3.0        # α of the tile prior (added: ±σ·α)
    hard_nm: bool = False                   # straight-through hard 2:4 samples
    hard_tile: bool = False                 # straight-through hard tile samples
    # where the tile prior puts the dense share: None = the same share in every layer (the
    # published prior); "edges" = whole blocks, the first and last ones dense, the others 2:4 (the
    # strongest one-shot baseline's allocation), which learning then refines tile by tile
    init_allocation: str | None = None
    # what the 2:4 part of every mask multiplies while learning: "dense" = the dense weights (the
    # published method); "fitted" = the prior's all-2:4 masks' weights after block reconstruction
    # (`pipeline.fitted_sparse_weights`), so that tiles are weighed against compensated 2:4 weights
    sparse_weights: str = "dense"

    @property
    def learns_patterns(self) -> bool:
        return self.mode in ("maskllm", "patch-joint")

    @property
    def learns_tiles(self) -> bool:
        return self.mode in ("patch-tile", "patch-joint")

    def check(self) -> None:
        if self.mode not in MODES:
            raise PatchsparseError(f"unknown mask mode '{self.mode}' (choose {', '.join(MODES)})")
        check_hybrid_sparsity(self.sparsity)
        if self.mode == "maskllm" and self.sparsity != 0.5:
            raise PatchsparseError(f"maskllm mode learns 2:4 masks only, so its sparsity is 0.5, not {self.sparsity}")
        if self.init_allocation not in INIT_ALLOCATIONS:
            raise PatchsparseError(f"unknown initial allocation '{self.init_allocation}' "
                                   f"(choose {', '.join(str(a) for a in INIT_ALLOCATIONS if a)})")
        if self.sparse_weights not in SPARSE_WEIGHTS:
            raise PatchsparseError(f"unknown sparse weights '{self.sparse_weights}' (choose {', '.join(SPARSE_WEIGHTS)})")
        rows, cols = self.tile
        if rows < 1 or cols < 4 or cols % 4:
            raise PatchsparseError(f"tile size {rows}x{cols} is invalid: rows >= 1 and columns a multiple of 4")
        if self.init_std <= 0:
            raise PatchsparseError(f"init_std must be positive, got {self.init_std}")


@dataclass(frozen=True)
class SamplingConfig:
    """Gumbel-softmax temperature τ and logit scale κ, separately for the 2:4 and the tile logits."""

    tau_nm: LinearSchedule = LinearSchedule(4.0, 0.05)
    kappa_nm: LinearSchedule = LinearSchedule(100.0, 500.0)
    tau_tile: LinearSchedule = LinearSchedule(4.0, 0.05)
    kappa_tile: LinearSchedule = LinearSchedule(25.0, 350.0)

    def check(self) -> None:
        for name in ("tau_nm", "tau_tile"):
            s = getattr(self, name)
            if s.start <= 0 or s.end <= 0:
                raise PatchsparseError(f"temperature {name} must stay positive, got {s.start} -> {s.end}")
        for name in ("kappa_nm", "kappa_tile"):
            s = getattr(self, name)
            if s.start <= 0 or s.end <= 0:
                raise PatchsparseError(f"logit scale {name} must stay positive, got {s.start} -> {s.end}")


@dataclass(frozen=True)
class ObjectiveConfig:
    """L = L_LM + λ_s·R_s − λ_w·(1 − t/T)·R_w (docs/METHOD.md §4)."""

    sparse_reg: float = 7.0        # λ_s; unused in maskllm mode (density is always 0.5)
    weight_reg: float = 10.0       # λ_w, decays linearly to 0
    density_scope: str = "global"  # global | layer | block
    # Distillation from the dense model (the same weights with the masks off): the task term is
    # (1 − α)·L_LM + α·T²·KL(p_dense^T ‖ p_masked^T) over every position; α = 0 is the published L_LM.
    distill: float = 0.0           # α
    distill_temperature: float = 1.0  # T

    def check(self) -> None:
        if self.density_scope not in DENSITY_SCOPES:
            raise PatchsparseError(f"unknown density scope '{self.density_scope}' (choose {', '.join(DENSITY_SCOPES)})")
        if self.sparse_reg < 0 or self.weight_reg < 0:
            raise PatchsparseError("regulariser weights must be non-negative")
        if not 0.0 <= self.distill <= 1.0:
            raise PatchsparseError(f"the distillation share must be in [0, 1], got {self.distill}")
        if not self.distill_temperature > 0:
            raise PatchsparseError(f"the distillation temperature must be positive, got {self.distill_temperature}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW on the mask logits (fp32), cosine learning rate after a linear warm-up."""

    lr: float = 1e-3
    nm_lr_scale: float = 1.0       # the 2:4 logits train at lr·nm_lr_scale (the tile logits at lr)
    warmup_steps: int = 5
    min_lr_ratio: float = 0.0      # the cosine ends at lr·min_lr_ratio
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0         # max global gradient norm; 0 disables clipping

    def check(self) -> None:
        if self.lr <= 0 or self.nm_lr_scale <= 0:
            raise PatchsparseError(f"learning rates must be positive, got {self.lr} (2:4 scale {self.nm_lr_scale})")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise PatchsparseError("warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    """How long, on what batches, and how the run is made restartable."""

    steps: int = 2000
    batch_size: int = 1            # windows per micro-batch
    grad_accum: int = 256          # micro-batches per optimizer step
    seqlen: int = 4096
    seed: int = 0
    checkpoint_every: int = 500    # optimizer steps between checkpoints; 0 disables them
    activation_checkpointing: bool = True
    # keep each layer's soft weight from its forward to its backward rather than rebuilding it in
    # the checkpointed recompute: faster, at one weight-sized tensor per layer until the backward
    cache_soft_weights: bool = True

    @property
    def windows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise PatchsparseError("steps, batch size and gradient accumulation must be at least 1")
        if self.seqlen < 2:
            raise PatchsparseError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.checkpoint_every < 0:
            raise PatchsparseError("checkpoint_every must be >= 0")


@dataclass(frozen=True)
class LearnConfig:
    mask: MaskConfig = field(default_factory=MaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self) -> None:
        """Every check runs before a model is touched."""
        self.mask.check()
        self.sampling.check()
        self.objective.check()
        self.optim.check()
        self.train.check()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LearnConfig":
        mask = dict(data["mask"])
        mask["tile"] = tuple(mask["tile"])
        sel = mask["selection"]
        mask["selection"] = LayerSelection(tuple(sel["include"]), tuple(sel["exclude"]), sel.get("decoder_path"))
        sampling = {k: LinearSchedule(**v) for k, v in data["sampling"].items()}
        optim = dict(data["optim"])
        optim["betas"] = tuple(optim["betas"])
        return cls(MaskConfig(**mask), SamplingConfig(**sampling), ObjectiveConfig(**data["objective"]),
                   OptimConfig(**optim), TrainConfig(**data["train"]))


def with_overrides(config: Any, **changes: Any) -> Any:
    """`config` with the given changes, skipping `None` values (unset CLI options); unlike
    `dataclasses.replace`, which would set them."""
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})

