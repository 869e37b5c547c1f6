"""Learnable hybrid masks: MaskLLM, PATCH-Tile and PATCH-Joint training."""

from patchsparse.learn.config import (
    LearnConfig,
    LinearSchedule,
    MaskConfig,
    ObjectiveConfig,
    OptimConfig,
    SamplingConfig,
    TrainConfig,
)
from patchsparse.learn.masked import HybridMask, MaskedModel, MaskSampler, attach_masks, find_masks, remove_masks
from patchsparse.learn.trainer import LearnResult, learn_masks

__all__ = [
    "HybridMask",
    "LearnConfig",
    "LearnResult",
    "LinearSchedule",
    "MaskConfig",
    "MaskSampler",
    "MaskedModel",
    "ObjectiveConfig",
    "OptimConfig",
    "SamplingConfig",
    "TrainConfig",
    "attach_masks",
    "find_masks",
    "learn_masks",
    "remove_masks",
]
