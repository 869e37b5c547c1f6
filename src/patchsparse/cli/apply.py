"""`patchsparse apply`: load a model, apply a mask directory, report sparsity and optionally perplexity."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from patchsparse.cli.common import add_data_args, add_json_arg, add_model_args, positive_int, settings_of
from patchsparse.cli.evaluate import eval_windows, perplexity_line
from patchsparse.evaluate import evaluate_perplexity
from patchsparse.io.maskfile import apply_mask_dir, read_mask_document
from patchsparse.masks import HybridMaskSpec
from patchsparse.models import load_model
from patchsparse.records import make_record, write_record


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "apply", help="apply a mask directory to its base model (checks fingerprint and shapes)")
    add_model_args(parser)
    parser.add_argument("--masks", type=Path, required=True, metavar="DIR",
                        help="mask directory (masks.json + masks.safetensors)")
    parser.add_argument("--eval", action="store_true", help="also measure perplexity of the masked model")
    add_data_args(parser)
    parser.add_argument("--max-windows", type=positive_int, default=None,
                        help="with --eval: score at most this many windows (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    add_json_arg(parser)
    parser.set_defaults(handler=run_apply)


def sparsity_figures(spec: HybridMaskSpec) -> dict:
    kept, total = spec.kept_and_total()
    return {
        "sparsity": spec.sparsity(),
        "kept": kept,
        "masked_weights": total,
        "layers": len(spec.layers),
        "per_projection_sparsity": spec.per_projection_sparsity(),
        "per_block_sparsity": {str(b): s for b, s in spec.per_block_sparsity().items()},
    }


def sparsity_lines(spec: HybridMaskSpec, target: float | None) -> list[str]:
    kept, total = spec.kept_and_total()
    target_text = f" (target {target:.2%})" if isinstance(target, (int, float)) else ""
    lines = [f"sparsity {spec.sparsity():.2%}{target_text}: {total - kept:,} of {total:,} weights "
             f"in {len(spec.layers)} layers pruned"]
    per_projection = "  ".join(f"{k} {v:.1%}" for k, v in spec.per_projection_sparsity().items())
    lines.append(f"  per projection: {per_projection}")
    return lines


def run_apply(args: argparse.Namespace) -> int:
    document = read_mask_document(args.masks)  # fail on a bad directory before loading the model
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    spec = apply_mask_dir(loaded.model, args.masks)
    name = loaded.identity.get("name", args.model)
    print(f"applied masks from {args.masks} to {name}")
    for line in sparsity_lines(spec, document.get("target_sparsity")):
        print(line)
    figures = {**sparsity_figures(spec), "target_sparsity": document.get("target_sparsity"),
               "mode": document.get("mode")}
    if args.eval:
        corpus, windows = eval_windows(loaded, args.data, args.seqlen, args.max_windows)
        start = time.perf_counter()
        result = evaluate_perplexity(loaded.model, windows, batch_size=args.batch_size, desc="masked perplexity")
        seconds = time.perf_counter() - start
        print(perplexity_line(f"masked {name} on {corpus.name} (eval split)", result, seconds))
        figures.update(result.as_dict(), seconds=seconds, corpus=corpus.name, held_out=corpus.held_out)
    if args.json:
        write_record(args.json, make_record("apply", settings_of(args), loaded.identity, figures))
    return 0
