"""Weight reconstruction on fixed masks: which update helps which family of masks.

    python benchmarks/reconstruct_study.py --masks DIR [DIR ...] --ways none fixed block:32:1e-3 \
        --out study.jsonl

For each mask directory (learned or one-shot, with or without weights saved beside the masks) and
each way, the kept weights are rebuilt from the base model's dense weights on the calibration
windows of docs/RESULTS.md, and the perplexities in and out of domain are appended to --out, one
JSON line per pair (a pair already there is skipped, so the study resumes).

Ways:
  none                      the masks over the weights saved beside them (if any, else the dense ones)
  fixed | repick            layer-wise least squares / SparseGPT re-pick (`patchsparse.reconstruct`)
  block[:STEPS[:LR]]        block-level fit from the dense weights under the mask
  fixed+block[:STEPS[:LR]]  the block fit started from the least-squares weights
  saved+block[:STEPS[:LR]]  the block fit started from the weights saved beside the masks
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from patchsparse.data import load_corpus, random_windows, sequential_windows, tokenize_texts
from patchsparse.errors import PatchsparseError
from patchsparse.io.maskfile import load_mask_spec, load_updated_weights
from patchsparse.models import load_model, select_linears
from patchsparse.models.builtin import DEFAULT_MODEL
from patchsparse.pipeline import masked_perplexity, reconstructed
from patchsparse.reconstruct import BlockFit

from quality import load_ood


def parse_way(way: str) -> tuple[str, BlockFit | None]:
    """'fixed+block:64:3e-4' -> ('fixed+block', BlockFit(steps=64, lr=3e-4)); layer-wise ways have no fit."""
    name, *numbers = way.split(":")
    if name in ("none", "fixed", "repick") and not numbers:
        return name, None
    if name not in ("block", "fixed+block", "saved+block") or len(numbers) > 2:
        raise PatchsparseError(f"unknown way '{way}' (see --help)")
    fit = BlockFit()
    try:
        if numbers:
            fit = BlockFit(steps=int(numbers[0]), lr=float(numbers[1]) if len(numbers) > 1 else fit.lr)
    except ValueError:
        raise PatchsparseError(f"way '{way}': STEPS must be an integer and LR a number") from None
    fit.check()
    return name, fit


def rebuilt(model, spec, saved, calib, name: str, fit: BlockFit | None):
    """(masks, kept weights on CPU) of way `name`, computed from the model's dense weights, which it
    keeps (`repick` returns new masks: its 2:4 groups are chosen again)."""
    if name == "none":
        return spec, saved
    if name in ("fixed", "repick"):
        new, weights, _ = reconstructed(model, spec, calib, name)
        return new, weights
    if name == "saved+block" and saved is None:
        raise PatchsparseError("saved+block needs weights saved beside the masks")
    start = {"block": None, "saved+block": saved}.get(name)
    if name == "fixed+block":
        _, start, _ = reconstructed(model, spec, calib, "fixed")
    new, weights, _ = reconstructed(model, spec, calib, "block", block_fit=fit, start=start)
    return new, weights


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--masks", type=Path, nargs="+", required=True)
    p.add_argument("--ways", nargs="+", default=["none", "fixed", "block"])
    p.add_argument("--out", type=Path, required=True, help="JSON-lines results file (appended; resumable)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ood", default="shakespeare", help="'shakespeare', 'none' or a .txt file")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "patchsparse",
                   help="where the Shakespeare source package is kept")
    args = p.parse_args(argv)
    try:
        ways = [(way, *parse_way(way)) for way in args.ways]
        torch.set_num_threads(args.threads)
        loaded = load_model(args.model, dtype="float32", device=args.device)
        model, tok = loaded.model, loaded.tokenizer
        corpus = load_corpus(args.data)
        calib = random_windows(tokenize_texts(tok, corpus.train), args.calib_windows, args.seqlen, args.seed)
        calib = calib.to(next(model.parameters()).device)
        evals = {"in-domain": sequential_windows(tokenize_texts(tok, corpus.eval), args.seqlen, args.eval_windows)}
        ood, _ = load_ood(args)
        if ood is not None:
            evals["out-of-domain"] = sequential_windows(tokenize_texts(tok, ood), args.seqlen, args.eval_windows)
        done = set()
        if args.out.is_file():
            done = {(r["masks"], r["way"]) for r in map(json.loads, args.out.read_text().splitlines()) if r}
        total = sum(m.weight.numel() for m in select_linears(model).values())
        for directory in args.masks:
            spec = load_mask_spec(directory, model)
            saved = load_updated_weights(directory, spec)
            for way, name, fit in ways:
                if (str(directory), way) in done:
                    continue
                start = time.perf_counter()
                masks, weights = rebuilt(model, spec, saved, calib, name, fit)
                seconds = time.perf_counter() - start
                ppl = {split: masked_perplexity(model, masks, windows, f"{way} {split}", weights)
                       for split, windows in evals.items()}
                pruned = sum(int((~layer.keep_mask()).sum()) for layer in masks.layers.values())
                record = {"masks": str(directory), "way": way, "sparsity": pruned / total, "ppl": ppl,
                          "seconds": round(seconds, 1), "device": args.device, "calib_windows": args.calib_windows}
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
    except PatchsparseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
