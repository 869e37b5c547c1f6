"""Layer-level benchmark of hybrid layers against dense `nn.Linear`, measured in one run.

Used by `benchmarks/hybrid_matmul.py` and `patchsparse bench`. Every variant of one
(shape, tokens) cell is timed in interleaved rounds (dense, hybrid 25%, 35%, …, dense, …), so
load from other processes hits all variants alike; the figure per variant is its best round
(the code's speed, not the neighbours'), and the spread over rounds is kept in the records.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from patchsparse.kernels.linear import HybridLinear
from patchsparse.kernels.synthetic import synthetic_layer_mask
from patchsparse.kernels.timing import time_interleaved
from patchsparse.utils import progress

DEFAULT_MODEL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]   # SmolLM2-135M (out, in)
LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
PURE_2_4 = 0.5


@dataclass
class Cell:
    shape: tuple[int, int]
    tokens: int
    dense_seconds: float
    hybrid_seconds: dict[str, float] = field(default_factory=dict)  # label -> seconds
    spread: dict[str, float] = field(default_factory=dict)          # label -> median / best
    paths: dict[str, str] = field(default_factory=dict)             # label -> HybridLinear.kernel_path_for(tokens)

    def ratios(self) -> dict[str, float]:
        return {label: self.dense_seconds / s for label, s in self.hybrid_seconds.items()}

    def fastest(self) -> str:
        """The fastest variant of this cell, "dense" when none beats it."""
        label, seconds = min(self.hybrid_seconds.items(), key=lambda item: item[1], default=("dense", 0.0))
        return label if self.hybrid_seconds and seconds < self.dense_seconds else "dense"


def label_of(sparsity: float, backend: str, show_backend: bool) -> str:
    name = "2:4" if sparsity == PURE_2_4 else f"{sparsity:.0%}"
    return f"{name} {backend}" if show_backend else name


def layer_benchmark(shapes: list[tuple[int, int]], tokens: list[int], sparsities: list[float],
                    dtype: torch.dtype, device: torch.device, backends: list[str], tile: tuple[int, int],
                    rounds: int = 7, budget: float = 0.05, max_flops: float | None = None,
                    seed: int = 0) -> tuple[list[Cell], list[str]]:
    """Time dense vs hybrid layers for every shape x token count. Returns cells and skipped lines."""
    cells: list[Cell] = []
    skipped: list[str] = []
    show_backend = len(backends) > 1
    bar = progress(total=len(shapes) * len(tokens), desc=f"layer benchmark {str(dtype).replace('torch.', '')}")
    for out_f, in_f in shapes:
        torch.manual_seed(seed)
        linear = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype).requires_grad_(False)
        hybrids: dict[str, HybridLinear] = {}
        for sparsity in sparsities:
            for backend in backends:
                # the stripe format needs tiles spanning whole rows (still a valid PATCH tiling)
                layer_tile = (tile[0], in_f) if backend == "stripe" else tile
                mask = synthetic_layer_mask(linear.weight, sparsity, layer_tile, seed)
                if sparsity == PURE_2_4:
                    mask = type(mask)(mask.sparse_keep, "2:4")        # no tile grid at all
                hybrids[label_of(sparsity, backend, show_backend)] = HybridLinear.from_dense(
                    linear, mask, backend=backend)
        for n in tokens:
            bar.update(1)
            flops = 2.0 * n * out_f * in_f
            if max_flops is not None and flops > max_flops:
                skipped.append(f"{out_f}x{in_f} at {n} tokens ({flops / 1e9:.0f} GFLOP > limit)")
                continue
            x = torch.randn(n, in_f, device=device, dtype=dtype)
            with torch.no_grad():  # both sides are modules, as in a model after the swap
                fns = [lambda: linear(x)]
                fns += [(lambda h=h: h(x)) for h in hybrids.values()]
                times = time_interleaved(fns, device, rounds, budget)
            best = [min(t) for t in times]
            cell = Cell((out_f, in_f), n, best[0])
            for (label, hybrid), seconds, series in zip(hybrids.items(), best[1:], times[1:]):
                cell.hybrid_seconds[label] = seconds
                cell.paths[label] = hybrid.kernel_path_for(n)
                cell.spread[label] = statistics.median(series) / seconds
            cell.spread["dense"] = statistics.median(times[0]) / best[0]
            cells.append(cell)
        del hybrids, linear
    bar.close()
    return cells, skipped


def ideal_speedups(sparsities: list[float]) -> str:
    return ", ".join(f"{label_of(s, '', False)}: {1 / (1 - s):.2f}x" for s in sparsities)


def format_table(cells: list[Cell]) -> str:
    if not cells:
        return "(no cells)"
    labels = list(cells[0].hybrid_seconds)
    width = max(10, *(len(lb) + 2 for lb in labels))
    head = (f"{'out x in':>13} {'tokens':>6} {'dense':>10}" + "".join(f"{lb:>{width}}" for lb in labels)
            + f"  {'fastest':<{width}} kernel paths")
    lines = [head, "-" * len(head)]
    for c in cells:
        ratios = c.ratios()
        paths = ", ".join(dict.fromkeys(c.paths.get(lb, "?") for lb in labels))   # distinct, in order
        lines.append(f"{c.shape[0]:>6}x{c.shape[1]:<6} {c.tokens:>6} {format_seconds(c.dense_seconds):>10}"
                     + "".join(f"{ratios[lb]:>{width - 1}.2f}x" for lb in labels)
                     + f"  {c.fastest():<{width}} {paths}")
    return "\n".join(lines)


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines(device: torch.device) -> list[str]:
    from patchsparse.kernels.cpu import cpu_kernel_status
    from patchsparse.records import git_commit

    lines = [f"commit: {git_commit() or 'unknown'}",
             f"torch {torch.__version__}, python {platform.python_version()}, {platform.platform()}"]
    if device.type == "cuda":
        lines.append(f"device: {torch.cuda.get_device_name(device)} (capability "
                     f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})")
    else:
        lines.append(f"device: CPU {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                     f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
        lines.append(f"CPU kernel: {cpu_kernel_status()}")
        if hasattr(os, "getloadavg"):
            lines.append("load average (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    return lines
