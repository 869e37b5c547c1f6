"""`patchsparse bench`: layer-level speed of hybrid layers against dense, with small defaults.

The full benchmarks (7B shapes, end-to-end generation) are `benchmarks/hybrid_matmul.py` and
`benchmarks/generate.py`; this command runs the same layer benchmark on the default model's shapes.
"""

from __future__ import annotations

import argparse

import torch

from patchsparse.cli.common import add_json_arg, positive_int, settings_of
from patchsparse.errors import PatchsparseError
from patchsparse.kernels.bench import (DEFAULT_MODEL_SHAPES, LLAMA7B_SHAPES, PURE_2_4, format_table,
                                       ideal_speedups, layer_benchmark, machine_lines)
from patchsparse.kernels.linear import BACKENDS
from patchsparse.models.loading import resolve_device, resolve_dtype
from patchsparse.records import make_record, write_record


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="layer-level speed of hybrid (dense / 2:4) layers vs dense")
    parser.add_argument("--shapes", default="default",
                        help="default (the default model's shapes) | 7b | list like 576x576,4096x11008 (out x in)")
    parser.add_argument("--tokens", default="1,16", help="token counts (default: 1,16)")
    parser.add_argument("--sparsities", default="0.25,0.35,0.45", help="hybrid targets; pure 2:4 is always added")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--tile", default="128x128", help="mask tile size rows x cols (default 128x128)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads on CPU (default 2)")
    parser.add_argument("--rounds", type=positive_int, default=5)
    add_json_arg(parser)
    parser.set_defaults(handler=run_bench)


def _pairs(text: str, what: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        raise PatchsparseError(f"{what} must look like 576x576,192x576, got '{text}'") from None
    if any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise PatchsparseError(f"{what} must look like 576x576,192x576, got '{text}'")
    return pairs  # type: ignore[return-value]


def _numbers(text: str, kind, what: str) -> list:
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise PatchsparseError(f"{what} must be a comma-separated list of numbers, got '{text}'") from None


def run_bench(args: argparse.Namespace) -> int:
    shapes = {"default": DEFAULT_MODEL_SHAPES, "7b": LLAMA7B_SHAPES}.get(args.shapes) or _pairs(args.shapes, "--shapes")
    if any(in_f % 4 for _, in_f in shapes):
        raise PatchsparseError("every input dimension must be a multiple of 4 for 2:4")
    tokens = _numbers(args.tokens, int, "--tokens")
    sparsities = _numbers(args.sparsities, float, "--sparsities")
    if any(not 0 <= s < 0.5 for s in sparsities) or any(t < 1 for t in tokens):
        raise PatchsparseError("--sparsities must lie in [0, 0.5) and --tokens be positive")
    tile = _pairs(args.tile, "--tile")[0]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    backend = args.backend if args.backend != "auto" else ("cpu" if device.type == "cpu" else "auto")
    sparsities = sparsities + [PURE_2_4]

    print("\n".join(machine_lines(device)))
    print(f"ideal speedups 1/(1-s): {ideal_speedups(sparsities)}")
    cells, skipped = layer_benchmark(shapes, tokens, sparsities, dtype, device, [backend], tile,
                                     rounds=args.rounds, budget=0.03)
    print(f"\n{args.dtype}, backend {backend}: speedup = dense nn.Linear time / HybridLinear time (best of {args.rounds})")
    print(format_table(cells))
    if args.json:
        figures = {"cells": [{"shape": list(c.shape), "tokens": c.tokens, "dense_seconds": c.dense_seconds,
                              "speedup": c.ratios()} for c in cells], "machine": machine_lines(device)}
        write_record(args.json, make_record("bench", settings_of(args), None, figures))
    return 0
