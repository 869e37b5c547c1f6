"""Timing of small GPU/CPU calls: interleaved rounds, synchronised where the device is asynchronous.

Shared by the benchmarks (`kernels.bench`) and by conversion, which times each layer's packed
form against the dense product to decide which one to keep (`kernels.linear.convert_model`).
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: list[Callable[[], object]], device: torch.device, rounds: int = 7,
                     budget: float = 0.05) -> list[list[float]]:
    """Seconds per call of each function, one list of `rounds` figures per function.

    Each round runs every function in turn, as many calls as fill about `budget` seconds (so load
    from other processes hits all of them alike); take the minimum over rounds for the code's speed.
    """
    def run(fn, n):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            fn()
        synchronize(device)
        return (time.perf_counter() - start) / n

    calls = []
    for fn in fns:
        run(fn, 1)                                                   # warm-up (and lazy builds)
        calls.append(max(1, int(budget / max(run(fn, 1), 1e-7))))
    results: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            results[i].append(run(fn, calls[i]))
    return results
