"""Small learning setups on the tiny random Llama (hidden 64, intermediate 128, 2 blocks)."""

from __future__ import annotations

import torch

from patchsparse.learn.config import LearnConfig, MaskConfig, ObjectiveConfig, OptimConfig, SamplingConfig, TrainConfig
from patchsparse.learn.priors import magnitude_prior

TILE = (16, 16)


def tiny_config(mode: str = "patch-joint", sparsity: float = 0.35, steps: int = 4, **train) -> LearnConfig:
    train_args = {"steps": steps, "batch_size": 2, "grad_accum": 2, "seqlen": 16, "checkpoint_every": 0,
                  "activation_checkpointing": True, **train}
    return LearnConfig(mask=MaskConfig(mode=mode, sparsity=0.5 if mode == "maskllm" else sparsity, tile=TILE),
                       sampling=SamplingConfig(), objective=ObjectiveConfig(),
                       optim=OptimConfig(lr=1e-2, warmup_steps=1), train=TrainConfig(**train_args))


def tiny_windows(vocab: int, n: int = 16, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def tiny_prior(model, sparsity: float = 0.35):
    return magnitude_prior(model, sparsity, TILE)
