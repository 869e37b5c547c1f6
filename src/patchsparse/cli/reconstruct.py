"""`patchsparse reconstruct`: update the kept weights of a mask directory on calibration data.

Reads `--masks DIR` (learned or one-shot), reconstructs the weights layer by layer on the base
model's dense weights (`patchsparse.reconstruct`), and writes a new mask directory `--out` holding
the masks and the reconstructed weights, as `prune` does for SparseGPT: `apply`, `eval --masks`,
`export` and the kernels restore them from there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from patchsparse.cli.common import (add_data_args, add_json_arg, add_model_args, check_seqlen, check_writable_dir,
                                    positive_float, positive_int, settings_of)
from patchsparse.cli.evaluate import perplexity_line
from patchsparse.cli.prune import save_outputs
from patchsparse.data import load_corpus, random_windows, sequential_windows, tokenize_texts
from patchsparse.errors import PatchsparseError
from patchsparse.evaluate import evaluate_perplexity
from patchsparse.io.lock import directory_lock
from patchsparse.io.maskfile import load_mask_spec, load_updated_weights, weights_fingerprint
from patchsparse.models import load_model
from patchsparse.prior.pattern import PrunePattern
from patchsparse.prior.pruners import SparseGPTOptions
from patchsparse.reconstruct import MODES, BlockFit, reconstruct_model
from patchsparse.records import make_record, write_record


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reconstruct", help="update the kept weights of a mask directory on calibration data")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--masks", type=Path, required=True, metavar="DIR", help="mask directory to reconstruct")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="new mask directory (masks + weights)")
    p.add_argument("--mode", choices=MODES, default="repick",
                   help="repick: dense tiles kept, 2:4 groups re-chosen by SparseGPT with its update (default); "
                        "fixed: the whole mask kept, exact least-squares weights per layer; block: the whole mask "
                        "kept, each decoder block's kept weights fitted to the dense model's block outputs, starting "
                        "from the weights saved beside the masks if any")
    p.add_argument("--calib-windows", type=positive_int, default=32, help="calibration windows (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default: 0)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per layer call (default: 1)")
    p.add_argument("--damp", type=float, default=0.01, help="damping, relative to mean diag(H) (default: 0.01)")
    p.add_argument("--blocksize", type=positive_int, default=128, help="SparseGPT column block size (default: 128)")
    fit = BlockFit()
    p.add_argument("--block-steps", type=positive_int, default=fit.steps,
                   help=f"block: Adam steps per decoder block (default: {fit.steps})")
    p.add_argument("--block-lr", type=positive_float, default=fit.lr,
                   help=f"block: peak learning rate (default: {fit.lr:g})")
    p.add_argument("--block-windows", type=positive_int, default=fit.windows_per_step,
                   help=f"block: calibration windows per step (default: {fit.windows_per_step})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--eval", action="store_true", help="perplexity before and after on the evaluation split")
    p.add_argument("--eval-windows", type=positive_int, default=16, help="evaluation windows with --eval (default: 16)")
    add_json_arg(p)
    p.set_defaults(handler=run_reconstruct)


def run_reconstruct(args: argparse.Namespace) -> int:
    options = SparseGPTOptions(damp=args.damp, blocksize=args.blocksize)
    options.check(PrunePattern.nm(2, 4))
    fit = BlockFit(steps=args.block_steps, lr=args.block_lr, windows_per_step=args.block_windows, seed=args.seed)
    fit.check()
    if args.out.resolve() == args.masks.resolve():
        raise PatchsparseError("--out must differ from --masks: the input masks are kept as they are")
    if args.out.exists() and not args.overwrite:
        raise PatchsparseError(f"output directory {args.out} exists; pass --overwrite to replace it")
    check_writable_dir(args.out)
    with directory_lock(args.out):  # a second reconstruct on the same --out fails here, not after its work
        return _run_reconstruct(args, options, fit)


def _run_reconstruct(args: argparse.Namespace, options: SparseGPTOptions, fit: BlockFit) -> int:
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    model = loaded.model
    check_seqlen(args.seqlen, loaded.max_positions)
    spec = load_mask_spec(args.masks, model)  # names, shapes and the base model's fingerprint checked
    corpus = load_corpus(args.data)
    calib = random_windows(tokenize_texts(loaded.tokenizer, corpus.train), args.calib_windows, args.seqlen, args.seed)
    eval_windows = (sequential_windows(tokenize_texts(loaded.tokenizer, corpus.eval), args.seqlen, args.eval_windows)
                    if args.eval else None)
    fingerprint = weights_fingerprint(model, list(spec.layers))
    figures: dict = {"mode": args.mode, "corpus": corpus.name}
    # the weights saved beside the masks (e.g. SparseGPT's update), read once if anything needs them
    saved = load_updated_weights(args.masks, spec) if eval_windows is not None or args.mode == "block" else None
    if eval_windows is not None:
        from patchsparse.pipeline import masked_perplexity

        # as saved: with the weights stored beside the masks, if any
        figures["perplexity_before"] = masked_perplexity(model, spec, eval_windows, "masks as given", weights=saved)

    start = time.perf_counter()
    # block continues from the saved weights; the layer-wise modes ignore them
    new = reconstruct_model(model, spec, calib.to(next(model.parameters()).device), args.mode,
                            options=options, batch_size=args.batch_size, block_fit=fit, start=saved)
    new.metadata["weights_updated"] = True
    figures.update(seconds=time.perf_counter() - start, sparsity=new.sparsity())
    print(f"reconstructed {len(new.layers)} linears ({args.mode}) at sparsity {new.sparsity():.4f} "
          f"in {figures['seconds']:.1f} s")
    settings = settings_of(args)
    save_outputs(new, model, args.out, args.overwrite, loaded.identity, settings, fingerprint)
    print(f"saved masks and reconstructed weights to {args.out}")
    if eval_windows is not None:
        result = evaluate_perplexity(model, eval_windows, desc="reconstructed perplexity")
        figures["perplexity"] = result.perplexity
        print(f"before (the masks as saved, with their weights if any): perplexity "
              f"{figures['perplexity_before']:.2f}")
        print(perplexity_line(f"reconstructed on {corpus.name} (eval split)", result, 0.0))
    if args.json:
        write_record(args.json, make_record("reconstruct", settings, loaded.identity, figures))
    return 0
