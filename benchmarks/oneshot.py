"""One-shot pruning baselines: dense vs magnitude vs Wanda vs SparseGPT, perplexity and wall time.

Every method starts from the same dense weights (restored in memory between methods), calibrates
layer by layer on seeded random windows of the corpus's training split, and is scored on the
first windows of its evaluation split. Prints the machine, the commit and the settings with the
table, and the ratios measured in this run.

    python benchmarks/oneshot.py                       # defaults: 2:4, 32 x 512 calibration, 16 x 512 eval
    python benchmarks/oneshot.py --calib-windows 8 --eval-windows 4 --seqlen 256   # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


from patchsparse.data import load_corpus, random_windows, sequential_windows, tokenize_texts
from patchsparse.evaluate import evaluate_perplexity
from patchsparse.models import load_model, select_linears
from patchsparse.models.builtin import DEFAULT_MODEL
from patchsparse.prior.methods import pruner_names
from patchsparse.prior.oneshot import prune_model
from patchsparse.prior.pattern import PrunePattern
from patchsparse.records import git_commit, machine_summary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", default="default")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--methods", nargs="+", default=list(pruner_names()), choices=pruner_names())
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1, help="windows per layer call during calibration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    pattern = PrunePattern.parse(args.pattern)
    loaded = load_model(args.model, dtype="float32", device=args.device)
    model = loaded.model
    corpus = load_corpus(args.data)
    calib = random_windows(tokenize_texts(loaded.tokenizer, corpus.train), args.calib_windows, args.seqlen, args.seed)
    evals = sequential_windows(tokenize_texts(loaded.tokenizer, corpus.eval), args.seqlen, args.eval_windows)
    dense_weights = {name: linear.weight.detach().clone() for name, linear in select_linears(model).items()}

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"machine: {json.dumps(machine_summary())}")
    print(f"commit:  {git_commit()}")
    print(f"settings: {json.dumps(settings)}")
    print(f"model: {loaded.identity.get('name', args.model)}; corpus: {corpus.name} "
          f"(calibration: train split, eval: eval split, {evals.numel():,} tokens)")

    rows = []
    start = time.perf_counter()
    dense = evaluate_perplexity(model, evals, desc="dense")
    rows.append({"method": "dense", "sparsity": 0.0, "perplexity": dense.perplexity,
                 "prune_s": 0.0, "eval_s": time.perf_counter() - start})
    for method in args.methods:
        with torch.no_grad():
            for name, linear in select_linears(model).items():
                linear.weight.copy_(dense_weights[name])
        start = time.perf_counter()
        spec = prune_model(model, calib, method, pattern, batch_size=args.batch_size)
        prune_s = time.perf_counter() - start
        start = time.perf_counter()
        result = evaluate_perplexity(model, evals, desc=method)
        rows.append({"method": method, "sparsity": spec.sparsity(), "perplexity": result.perplexity,
                     "prune_s": prune_s, "eval_s": time.perf_counter() - start})
        print(f"  {method}: perplexity {result.perplexity:.2f} (prune {prune_s:.1f} s)", flush=True)

    print()
    print(f"| method | pattern | sparsity | perplexity | vs dense | prune time (s) | eval time (s) |")
    print(f"|---|---|---|---|---|---|---|")
    for row in rows:
        label = "dense" if row["method"] == "dense" else pattern.label
        print(f"| {row['method']} | {label} | {row['sparsity']:.3f} | {row['perplexity']:.2f} | "
              f"{row['perplexity'] / dense.perplexity:.2f}x | {row['prune_s']:.1f} | {row['eval_s']:.1f} |")
    by_method = {row["method"]: row["perplexity"] for row in rows}
    if all(m in by_method for m in ("magnitude", "wanda", "sparsegpt")):
        expected = by_method["sparsegpt"] < by_method["wanda"] < by_method["magnitude"]
        print(f"\nordering SparseGPT < Wanda < magnitude: {'yes' if expected else 'NO'} "
              f"(Wanda / SparseGPT = {by_method['wanda'] / by_method['sparsegpt']:.2f}x, "
              f"magnitude / Wanda = {by_method['magnitude'] / by_method['wanda']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_summary(), "commit": git_commit(),
                                         "settings": settings, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
