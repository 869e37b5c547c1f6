"""Layer-level benchmark: dense nn.Linear vs hybrid (dense / 2:4 tiles) layers, in one run.

Prints the machine, the commit and the settings, then per dtype a table of speedups
(dense time / hybrid time) for every weight shape and token count; the ideal for a sparsity s is
1 / (1 − s). Masks are synthetic (random dense tiles at the target sparsity + magnitude 2:4):
speed depends on where the dense tiles are, not on which ones a trained mask keeps.

    python benchmarks/hybrid_matmul.py                       # CPU, fp32, 2 threads, all shapes
    python benchmarks/hybrid_matmul.py --dtypes float32,bfloat16 --tokens 1,16
    python benchmarks/hybrid_matmul.py --device cuda --dtypes float16,bfloat16 --tokens 1,16,128,2048
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


from patchsparse.kernels.bench import (DEFAULT_MODEL_SHAPES, LLAMA7B_SHAPES, PURE_2_4, format_table,
                                       ideal_speedups, layer_benchmark, machine_lines)
from patchsparse.kernels.split import semi_structured_supported
from patchsparse.kernels.triton_tiles import triton_available
from patchsparse.models.loading import resolve_device, resolve_dtype
from patchsparse.records import make_record, write_record


def parse_shapes(text: str) -> list[tuple[int, int]]:
    named = {"default": DEFAULT_MODEL_SHAPES, "7b": LLAMA7B_SHAPES, "all": DEFAULT_MODEL_SHAPES + LLAMA7B_SHAPES}
    if text in named:
        return named[text]
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]  # type: ignore[misc]


def default_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    if device.type != "cuda":
        return ["cpu"]
    backends = ["split", "stripe"] if semi_structured_supported(device, dtype) else []
    if triton_available(device):
        backends.append("triton")
    return backends or ["reference"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
    parser.add_argument("--dtypes", default="float32", help="comma list: float32,bfloat16,float16")
    parser.add_argument("--shapes", default="all", help="default | 7b | all | list like 576x576,4096x11008 (out x in)")
    parser.add_argument("--tokens", default="1,16,128,2048")
    parser.add_argument("--sparsities", default="0.25,0.35,0.45", help="hybrid targets; pure 2:4 is always added")
    parser.add_argument("--backends", default=None, help="comma list (default: cpu on CPU; split,stripe,triton on GPU)")
    parser.add_argument("--tile", default="128x128")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.03, help="seconds per timed round and variant")
    parser.add_argument("--max-gflop", type=float, default=None,
                        help="skip cells above this many GFLOP (default: 12 on CPU, none on GPU)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")] + [PURE_2_4]
    tile = tuple(int(v) for v in args.tile.split("x"))
    shapes = parse_shapes(args.shapes)
    max_gflop = args.max_gflop if args.max_gflop is not None else (12.0 if device.type == "cpu" else None)

    print("\n".join(machine_lines(device)))
    print(f"settings: shapes {shapes}, tokens {tokens}, tile {tile}, rounds {args.rounds} x {args.budget}s, "
          f"figure = best round; synthetic masks (seed 0)")
    print(f"ideal speedups 1/(1-s): {ideal_speedups(sparsities)}")
    record_cells = []
    for dtype_name in args.dtypes.split(","):
        dtype = resolve_dtype(dtype_name, device)
        backends = args.backends.split(",") if args.backends else default_backends(device, dtype)
        cells, skipped = layer_benchmark(shapes, tokens, sparsities, dtype, device, backends, tile,  # type: ignore[arg-type]
                                         rounds=args.rounds, budget=args.budget,
                                         max_flops=None if max_gflop is None else max_gflop * 1e9)
        print(f"\n== {dtype_name}, backends {','.join(backends)}: speedup = dense nn.Linear time / HybridLinear time ==")
        print(format_table(cells))
        for line in skipped:
            print(f"skipped: {line}")
        worst_spread = max((max(c.spread.values()) for c in cells), default=1.0)
        print(f"noise: median round / best round up to {worst_spread:.2f}x")
        record_cells += [{"dtype": dtype_name, "shape": list(c.shape), "tokens": c.tokens,
                          "dense_seconds": c.dense_seconds, "hybrid_seconds": c.hybrid_seconds,
                          "speedup": c.ratios(), "median_over_best": c.spread} for c in cells]
    for line in machine_lines(device)[-1:]:
        print(f"after: {line}")
    if args.json:
        write_record(args.json, make_record("benchmarks/hybrid_matmul.py", vars(args) | {"json": str(args.json)},
                                            None, {"cells": record_cells}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
