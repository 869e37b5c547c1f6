"""Gumbel noise from a seeded table read at hashed offsets.

Drawing fresh Gumbel noise for every 2:4 logit costs more than the rest of the mask step (six
samples and two logarithms per group of four weights). Instead, one table of i.i.d. Gumbel(0, 1)
samples is drawn once from the run's seed, and each (step, layer, part) reads a contiguous window
of it at an offset given by a 64-bit hash of (seed, step, stream). The window is a view: no copy,
no random-number generation, and the same numbers come back when activation checkpointing
recomputes a layer during backward, or when an interrupted run resumes. This is the shared noise
table of OpenAI's evolution strategies (Salimans et al., 2017). Within a window every sample is
independent; across windows, the samples are the same numbers at unrelated shifts.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
MIN_TABLE_LENGTH = 1 << 20


def splitmix64(x: int) -> int:
    """The SplitMix64 finaliser: a well-mixed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_offset(seed: int, step: int, stream: int, span: int) -> int:
    """A deterministic offset in [0, span) for one (seed, step, stream)."""
    h = splitmix64(splitmix64(splitmix64(seed & _MASK64) ^ (step & _MASK64)) ^ (stream & _MASK64))
    return h % max(span, 1)


def gumbel_table(length: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`length` i.i.d. Gumbel(0, 1) samples, −log(−log U), from a generator seeded with `seed`. -> (length,)"""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(length, generator=generator, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    return (-torch.log(-torch.log(uniform.clamp(min=tiny, max=1.0 - 1e-16)))).to(torch.float32).to(device)


def table_length_for(max_window: int) -> int:
    """Room for every window at many distinct offsets."""
    return max(MIN_TABLE_LENGTH, 4 * max_window)


class NoiseTable:
    """A Gumbel table and the windows read from it."""

    def __init__(self, length: int, seed: int, device: torch.device | str = "cpu") -> None:
        self.seed = seed
        self.table = gumbel_table(length, seed, device)

    def window(self, step: int, stream: int, length: int) -> torch.Tensor:
        """Gumbel samples for one (step, stream). -> (length,) view"""
        span = self.table.numel() - length + 1
        if span < 1:
            raise ValueError(f"noise table of {self.table.numel()} is shorter than a window of {length}")
        start = noise_offset(self.seed, step, stream, span)
        return self.table[start: start + length]

    def logistic(self, step: int, stream: int, length: int) -> torch.Tensor:
        """Logistic(0, 1) samples g₁ − g₀ for a 2-class Gumbel-softmax. -> (length,)"""
        pair = self.window(step, stream, 2 * length)
        return pair[length:] - pair[:length]
