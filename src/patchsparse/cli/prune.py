"""`patchsparse prune`: one-shot magnitude / Wanda / SparseGPT pruning with layer-by-layer calibration.

Calibration windows are drawn (seeded) from the corpus's training split; `--eval` scores the
pruned model on its evaluation split. `--out DIR` saves the masks (mask file); when SparseGPT's
weight update is on, the mask alone does not reproduce the pruned model, so the updated weights
of the masked linears are saved in the same directory (`weights.safetensors`, restored by
`apply_mask_dir` and `patchsparse eval --masks`). With `--no-update` (or magnitude / Wanda) the
mask file and the base model reproduce the pruned model exactly.

`--allocation edges|owl` with `--sparsity S` prunes whole decoder blocks to 2:4 and leaves the
others dense, as many blocks as bring the model closest to S (`patchsparse.prior.allocation`).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from patchsparse.cli.common import (add_data_args, add_json_arg, add_model_args, check_writable_dir, check_seqlen,
                                    settings_of)
from patchsparse.cli.evaluate import perplexity_line
from patchsparse.data import load_corpus, random_windows, sequential_windows, tokenize_texts
from patchsparse.errors import PatchsparseError
from patchsparse.evaluate import evaluate_perplexity
from patchsparse.io.lock import directory_lock
from patchsparse.masks.spec import HybridMaskSpec
from patchsparse.masks.tiles import check_hybrid_sparsity, check_tile_reaches_target, check_tile_size
from patchsparse.models import LayerSelection, decoder_layers, load_model, select_linears
from patchsparse.prior.allocation import ALLOCATIONS, allocate_blocks
from patchsparse.prior.methods import get_pruner, pruner_names
from patchsparse.prior.oneshot import check_method, prune_model
from patchsparse.prior.pattern import PrunePattern
from patchsparse.prior.pruners import SparseGPTOptions
from patchsparse.records import make_record, write_record
from patchsparse.utils import log


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prune", help="one-shot pruning (magnitude, Wanda, SparseGPT) to N:M, "
                                                 "unstructured or dense/2:4 tiles")
    add_model_args(parser)
    add_data_args(parser)
    parser.add_argument("--method", default="sparsegpt", metavar="{" + ",".join(pruner_names()) + "}",
                        help="pruning method (default: sparsegpt)")
    parser.add_argument("--pattern", default="2:4", help="2:4, another N:M such as 4:8, or unstructured (default: 2:4)")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction pruned: implied by N:M (2:4 = 0.5); in [0, 1) for unstructured; "
                             "in [0, 0.5] with --tile")
    parser.add_argument("--tile", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"),
                        help="one-shot PATCH prior: each layer's best tiles dense, the rest 2:4 (columns a multiple of 4)")
    parser.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                        help="2:4 on whole decoder blocks, the others dense, to reach --sparsity (in [0, 0.5]) "
                             "over the model: edges keeps the first and last blocks dense, owl the blocks with the "
                             "most outliers (OWL)")
    parser.add_argument("--calib-windows", type=int, default=32, help="calibration windows (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default: 0)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per layer call (default: 1)")
    parser.add_argument("--damp", type=float, default=0.01, help="SparseGPT damping, relative to mean diag(H) (default: 0.01)")
    parser.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size (default: 128)")
    parser.add_argument("--no-update", action="store_true",
                        help="SparseGPT: keep the original weights under the mask (no reconstruction)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="save the masks (and updated weights) here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--eval", action="store_true", help="perplexity of the pruned model on the evaluation split")
    parser.add_argument("--eval-windows", type=int, default=16, help="evaluation windows with --eval (default: 16)")
    add_json_arg(parser)
    parser.set_defaults(handler=run_prune)


def pattern_of(args: argparse.Namespace) -> PrunePattern:
    """Every check on the options that needs no model, so a typo fails before anything is loaded."""
    check_method(args.method)
    tiled = args.tile is not None
    blocks = args.allocation is not None
    is_unstructured = args.pattern.strip().lower() == "unstructured"
    pattern = PrunePattern.parse(args.pattern, args.sparsity if (not (tiled or blocks) or is_unstructured) else None)
    if blocks:
        if tiled:
            raise PatchsparseError("--allocation and --tile are two ways to mix dense weights with 2:4; choose one")
        if not (pattern.is_nm and 2 * pattern.n == pattern.m):
            raise PatchsparseError(f"--allocation mixes dense blocks with a 50% N:M pattern such as 2:4, "
                                   f"not {pattern.label}")
        if args.sparsity is None:
            raise PatchsparseError("--allocation needs --sparsity in [0, 0.5]")
        check_hybrid_sparsity(args.sparsity)
    if tiled:
        check_tile_size(*args.tile)
        if not (pattern.is_nm and 2 * pattern.n == pattern.m):
            raise PatchsparseError(f"--tile mixes dense tiles with a 50% N:M pattern such as 2:4, not {pattern.label}")
        if args.sparsity is None:
            raise PatchsparseError("--tile needs --sparsity in [0, 0.5]")
        check_hybrid_sparsity(args.sparsity)
    get_pruner(args.method).check(pattern, SparseGPTOptions(damp=args.damp, blocksize=args.blocksize))
    if args.calib_windows < 1:
        raise PatchsparseError(f"--calib-windows must be at least 1, got {args.calib_windows}")
    if args.eval_windows < 1:
        raise PatchsparseError(f"--eval-windows must be at least 1, got {args.eval_windows}")
    if args.batch_size < 1:
        raise PatchsparseError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise PatchsparseError(f"output directory {args.out} exists; pass --overwrite to replace it")
    return pattern


def save_outputs(spec: HybridMaskSpec, model: torch.nn.Module, out: Path, overwrite: bool,
                 identity: dict, settings: dict, fingerprint: str | None) -> None:
    """Mask file, plus the reconstructed weights when they differ from the base model's (one atomic write)."""
    from patchsparse.io.maskfile import save_mask_spec

    updated = None
    if spec.metadata.get("weights_updated"):
        modules = dict(model.named_modules())
        updated = {name: modules[name].weight for name in spec.layers}
    save_mask_spec(spec, out, identity=identity, extra=settings, weights_fingerprint=fingerprint,
                   updated_weights=updated, overwrite=overwrite)


def run_prune(args: argparse.Namespace) -> int:
    pattern = pattern_of(args)
    with contextlib.ExitStack() as stack:
        if args.out is not None:
            check_writable_dir(args.out)
            # a second prune on the same --out fails here, not after all its work
            stack.enter_context(directory_lock(args.out))
        return _run_prune(args, pattern)


def _run_prune(args: argparse.Namespace, pattern: PrunePattern) -> int:
    tile = tuple(args.tile) if args.tile is not None else None
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    model = loaded.model
    check_seqlen(args.seqlen, loaded.max_positions)
    linears = select_linears(model)  # fails early for a model without decoder linears
    names = list(linears)
    if tile is not None:
        check_tile_reaches_target([tuple(m.weight.shape) for m in linears.values()], tile, args.sparsity)
    corpus = load_corpus(args.data)
    calib = None
    if get_pruner(args.method).needs_statistic or args.allocation == "owl":  # magnitude alone needs no data
        calib = random_windows(tokenize_texts(loaded.tokenizer, corpus.train), args.calib_windows,
                               args.seqlen, args.seed)
    selection, blocks = LayerSelection(), None
    allocation_seconds = 0.0
    if args.allocation is not None:
        start = time.perf_counter()
        selection, blocks, ratios = allocate_blocks(model, args.allocation, args.sparsity, calib,
                                                    batch_size=args.batch_size)
        allocation_seconds = time.perf_counter() - start
        if not blocks:
            raise PatchsparseError(f"--sparsity {args.sparsity} is closer to no 2:4 block than to one; "
                                   f"raise it, or use --tile for finer steps")
        names = list(select_linears(model, selection))
    eval_windows = None
    if args.eval:
        eval_windows = sequential_windows(tokenize_texts(loaded.tokenizer, corpus.eval), args.seqlen,
                                          args.eval_windows)
    fingerprint = None
    if args.out is not None:
        from patchsparse.io.maskfile import weights_fingerprint

        fingerprint = weights_fingerprint(model, names)  # of the original weights, before pruning

    start = time.perf_counter()
    spec = prune_model(model, calib, args.method, pattern, None if blocks else args.sparsity, tile=tile,
                       selection=selection, update_weights=not args.no_update,
                       options=SparseGPTOptions(damp=args.damp, blocksize=args.blocksize),
                       batch_size=args.batch_size)
    prune_seconds = time.perf_counter() - start + allocation_seconds
    label = f"{args.method} {pattern.label}" + (f" + dense {tile[0]}x{tile[1]} tiles" if tile else "")
    if blocks:
        model_sparsity = spec.sparsity_over(sum(m.weight.numel() for m in linears.values()))
        spec.metadata.update(block_allocation=args.allocation, sparse_blocks=blocks, model_sparsity=model_sparsity)
        label += f" on {len(blocks)} of {len(decoder_layers(model)[1])} blocks ({args.allocation}: {blocks})"
    print(f"{label}: {len(spec.layers)} linears pruned to sparsity {spec.sparsity():.4f} "
          f"({'weights updated' if spec.metadata['weights_updated'] else 'original weights kept'}) "
          f"in {prune_seconds:.1f} s")
    if blocks:
        print(f"sparsity over all decoder linears: {model_sparsity:.4f} (target {args.sparsity})")

    settings = settings_of(args)
    if args.out is not None:
        save_outputs(spec, model, args.out, args.overwrite, loaded.identity, settings, fingerprint)
        extra = " and the updated weights" if spec.metadata["weights_updated"] else ""
        print(f"saved masks{extra} to {args.out}")

    figures: dict = {"sparsity": spec.sparsity(), "prune_seconds": prune_seconds,
                     "per_projection_sparsity": spec.per_projection_sparsity(),
                     "weights_updated": spec.metadata["weights_updated"], "corpus": corpus.name}
    if blocks:
        figures.update(allocation=args.allocation, sparse_blocks=blocks, model_sparsity=model_sparsity)
    if eval_windows is not None:
        start = time.perf_counter()
        result = evaluate_perplexity(model, eval_windows, desc="pruned perplexity")
        seconds = time.perf_counter() - start
        print(perplexity_line(f"pruned {loaded.identity.get('name', args.model)} on {corpus.name} (eval split)",
                              result, seconds))
        figures.update(perplexity=result.as_dict(), eval_seconds=seconds)
    elif args.out is None:
        log("note: neither --out nor --eval given; the pruned model was not saved or scored")
    if args.json:
        write_record(args.json, make_record("prune", settings, loaded.identity, figures))
    return 0
