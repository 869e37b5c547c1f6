"""Schedules as pure functions of the optimizer step.

A run of T steps uses steps t = 0 … T−1. Temperatures and logit scales move linearly from their
start value at t = 0 to their end value at the last step (t = T−1), so the final step trains with
the sharpest masks whatever T is; the learning rate warms up linearly and then follows a cosine.
"""

from __future__ import annotations

import math


def progress_fraction(step: int, total_steps: int) -> float:
    """t/(T−1) in [0, 1]; a one-step run sits at 1."""
    if total_steps <= 1:
        return 1.0
    return min(max(step / (total_steps - 1), 0.0), 1.0)


def linear_value(start: float, end: float, step: int, total_steps: int) -> float:
    return start + (end - start) * progress_fraction(step, total_steps)


def weight_reg_decay(step: int, total_steps: int) -> float:
    """(1 − t/T) of the weight-magnitude term: 1 at the first step, 1/T at the last."""
    return 1.0 - step / total_steps


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up over the first `warmup_steps` steps (from lr/warmup to lr), then a cosine
    from lr down to lr·min_lr_ratio, reached after the last step (as HF's cosine schedule)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    fraction = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * fraction))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
