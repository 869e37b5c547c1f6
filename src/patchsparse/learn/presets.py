"""Named configurations.

* `paper`: the published hyper-parameters (docs/METHOD.md §7, PATCH's Table 16): 2000 steps × global
  batch 256 × 4096 tokens, 128×128 tiles, priors of strength 3, per-mode LR / τ / κ / λ.
* `cpu`: a scaled-down run for the default model (SmolLM2-135M) on a 2-core CPU in minutes:
  a few dozen steps of one 256-token window. Schedules are functions of the step fraction, so
  they compress with the step count; the learning rate is raised so that the logits still move.
  In softmax space a logit step is about lr·κ/τ: at the paper's lr 1e-3 and ~2000 steps a logit
  travels up to ~1 (far beyond the prior's ±0.042); with 40 steps it would travel ~0.03, less than
  the prior itself, and nothing would change (measured: 20 maskllm steps at lr 1e-3 flip no
  arg-max). The CPU presets therefore use lr 1e-2 for tile logits (~0.25 over the run) and 3e-3 for
  2:4 logits (~0.06, beyond the prior's margin of 0.042 where the gradient keeps its sign), a
  stronger density term (λ_s = 30, see below), and skip activation checkpointing (memory is ample
  at this size; recomputation costs a third of a step).
  The 2:4 temperature starts at 1 instead of 4: at τ = 4 the prior pattern has probability ~0.40,
  the soft mask is a blend far from any hard 2:4 mask, and 40 steps are too few to anneal out of
  it (measured: patch-joint with τ 4→0.05 and lr 5e-3 ended at perplexity 4422, worse than the
  1017 it started from). At τ = 1 the prior pattern starts at ~0.94 and the gradients speak about
  masks close to hard ones.
"""

from __future__ import annotations

from dataclasses import replace

from patchsparse.errors import PatchsparseError
from patchsparse.learn.config import (
    LearnConfig,
    LinearSchedule,
    MaskConfig,
    ObjectiveConfig,
    OptimConfig,
    SamplingConfig,
    TrainConfig,
)

PRESETS = ("cpu", "paper")
# On SmolLM2-135M at 35%, the LM gradient on the tile logits pushes toward dense about 12 times as
# hard (mean over tiles, 4 windows of 256 tokens) as the density term at λ_s = 1; with the paper's
# λ_s = 3 the soft density climbs away from the target (0.68 -> 0.70 in 8 steps). A small model loses
# more per pruned weight than a 7B one, so the CPU preset uses λ_s = 30, enough to dominate.
SMALL_MODEL_SPARSE_REG = 30.0
_TAU = LinearSchedule(4.0, 0.05)


def paper_preset(mode: str, sparsity: float) -> LearnConfig:
    train = TrainConfig(steps=2000, batch_size=1, grad_accum=256, seqlen=4096, checkpoint_every=500)
    mask = MaskConfig(mode=mode, sparsity=sparsity, tile=(128, 128))
    if mode == "patch-joint":
        tile_tau = _TAU if sparsity >= 0.45 else LinearSchedule(2.0, 0.05)
        sampling = SamplingConfig(_TAU, LinearSchedule(100.0, 500.0), tile_tau, LinearSchedule(25.0, 350.0))
        return LearnConfig(mask, sampling, ObjectiveConfig(sparse_reg=7.0, weight_reg=10.0),
                           OptimConfig(lr=1e-3, warmup_steps=5), train)
    if mode == "patch-tile":
        sampling = SamplingConfig(_TAU, LinearSchedule(100.0, 500.0), LinearSchedule(2.0, 0.05),
                                  LinearSchedule(100.0, 500.0))
        return LearnConfig(mask, sampling, ObjectiveConfig(sparse_reg=3.0, weight_reg=0.1),
                           OptimConfig(lr=1e-4, warmup_steps=5), train)
    if mode == "maskllm":
        # PATCH's MaskLLM re-implementation: lr 1e-4, weight decay 0.1, no sparsity term.
        sampling = SamplingConfig(_TAU, LinearSchedule(100.0, 500.0), _TAU, LinearSchedule(25.0, 350.0))
        return LearnConfig(mask, sampling, ObjectiveConfig(sparse_reg=0.0, weight_reg=10.0),
                           OptimConfig(lr=1e-4, warmup_steps=5, weight_decay=0.1), train)
    raise PatchsparseError(f"unknown mask mode '{mode}'")


def cpu_preset(mode: str, sparsity: float) -> LearnConfig:
    base = paper_preset(mode, sparsity)
    train = TrainConfig(steps=40, batch_size=1, grad_accum=1, seqlen=256, checkpoint_every=10,
                        activation_checkpointing=False)
    lr, nm_scale = {"patch-tile": (1e-2, 1.0), "patch-joint": (1e-2, 0.3), "maskllm": (3e-3, 1.0)}[mode]
    optim = OptimConfig(lr=lr, nm_lr_scale=nm_scale, warmup_steps=2, weight_decay=base.optim.weight_decay)
    objective = base.objective
    if mode != "maskllm":
        objective = replace(objective, sparse_reg=SMALL_MODEL_SPARSE_REG)
    # 2:4 temperature from 1, not 4: see the module docstring
    sampling = replace(base.sampling, tau_nm=LinearSchedule(1.0, 0.05))
    return LearnConfig(base.mask, sampling, objective, optim, train)


def preset_config(name: str, mode: str, sparsity: float) -> LearnConfig:
    if name == "paper":
        return paper_preset(mode, sparsity)
    if name == "cpu":
        return cpu_preset(mode, sparsity)
    raise PatchsparseError(f"unknown preset '{name}' (choose {', '.join(PRESETS)})")
