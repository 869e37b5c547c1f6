"""`patchsparse learn`: train MaskLLM / PATCH-Tile / PATCH-Joint masks and save the hard masks.

Under `torchrun --nproc_per_node N` the same command trains data-parallel: each process takes a
disjoint slice of every micro-batch (`--batch` must be a multiple of N), gradients are averaged,
and process 0 alone evaluates and writes the outputs (`patchsparse.learn.distributed`).

The output directory holds `masks/` (the extracted `HybridMaskSpec`), `metrics.jsonl` (one line
per step), `run.json`, `prior.pt` and `checkpoint.pt` (for `--resume`).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import replace
from pathlib import Path

import torch

from patchsparse.atomic import set_aside
from patchsparse.cli.common import (SPARSE_WEIGHTS_HELP, add_data_args, add_json_arg, add_model_args,
                                    check_seqlen, check_writable_dir, non_negative_float, positive_int, settings_of)
from patchsparse.data import load_corpus, random_windows, sequential_windows, tokenize_texts
from patchsparse.data.windows import shuffled_blocks
from patchsparse.errors import PatchsparseError
from patchsparse.extract import POLICIES, extraction_report
from patchsparse.io.lock import directory_lock
from patchsparse.learn.blockwise import BlockwiseConfig
from patchsparse.learn.config import SPARSE_WEIGHTS, MODES, LearnConfig, LinearSchedule, with_overrides
from patchsparse.learn.presets import PRESETS, preset_config
from patchsparse.learn.trainer import PRIOR_FILE
from patchsparse.masks.spec import HybridMaskSpec, LayerMask
from patchsparse.masks.tiles import TileGrid, initial_dense_tiles
from patchsparse.learn.distributed import DataParallel
from patchsparse.models import LayerSelection, load_model, resolve_device
from patchsparse.pipeline import (check_learning_options, learn_pipeline, learn_prior, masked_perplexity,
                                  prior_2_4_spec)
from patchsparse.prior.methods import pruner_names
from patchsparse.prior.types import PriorMasks
from patchsparse.reconstruct import MODES as RECONSTRUCTIONS, BlockFit
from patchsparse.records import make_record, write_record
from patchsparse.utils import log

MASKS_DIR = "masks"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("learn", help="learn hybrid dense/2:4 masks (maskllm, patch-tile, patch-joint)")
    add_model_args(p)
    add_data_args(p, seqlen=None)
    p.add_argument("--mode", choices=MODES, default="patch-tile")
    p.add_argument("--sparsity", type=float, default=None,
                   help="target sparsity in [0, 0.5] (default: 0.35; maskllm: 0.5)")
    p.add_argument("--tile", type=int, nargs=2, metavar=("R", "C"), default=None, help="tile size (default 128 128)")
    p.add_argument("--prior", choices=pruner_names(), default="magnitude", help="one-shot pruner for the prior")
    p.add_argument("--calib-windows", type=positive_int, default=32, help="calibration windows for the prior")
    p.add_argument("--preset", choices=PRESETS, default="cpu",
                   help="cpu: a few dozen steps for the default model on a CPU; paper: the published recipe")
    g = p.add_argument_group("overrides of the preset")
    g.add_argument("--steps", type=positive_int)
    g.add_argument("--batch", type=positive_int, help="windows per micro-batch")
    g.add_argument("--grad-accum", type=positive_int, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float)
    g.add_argument("--nm-lr-scale", type=float, help="the 2:4 logits train at lr times this")
    g.add_argument("--warmup", type=int, dest="warmup_steps")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--sparse-reg", type=float, help="λ_s")
    g.add_argument("--weight-reg", type=float, help="λ_w")
    g.add_argument("--density-scope", choices=("global", "layer", "block"))
    g.add_argument("--distill", type=float, metavar="ALPHA",
                   help="share α of distillation from the dense model: (1-α)·LM loss + α·T²·KL (0: LM only)")
    g.add_argument("--distill-temperature", type=float, metavar="T", help="temperature T of the distillation term")
    g.add_argument("--tau-nm", type=float, nargs=2, metavar=("START", "END"))
    g.add_argument("--kappa-nm", type=float, nargs=2, metavar=("START", "END"))
    g.add_argument("--tau-tile", type=float, nargs=2, metavar=("START", "END"))
    g.add_argument("--kappa-tile", type=float, nargs=2, metavar=("START", "END"))
    g.add_argument("--prior-strength", type=float, help="α of both priors")
    g.add_argument("--init-allocation", choices=("uniform", "edges"), default=None,
                   help="where the tile prior starts the dense share: uniform = every layer at the target "
                        "(default), edges = the first and last blocks dense, the others 2:4")
    g.add_argument("--hard", action="store_true", default=None, help="straight-through hard samples (2:4 and tiles)")
    g.add_argument("--seed", type=int)
    g.add_argument("--checkpoint-every", type=int)
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--include", nargs="+", default=None, help="regexes of layer names to mask (default: all decoder linears)")
    p.add_argument("--exclude", nargs="+", default=(), help="regexes of layer names never masked")
    p.add_argument("--policy", choices=POLICIES, default="exact", help="how hard tiles are extracted")
    p.add_argument("--blockwise", type=int, default=0, metavar="STEPS",
                   help="learn block by block on the calibration windows, STEPS optimizer steps per block, "
                        "each block's masks reproducing the dense block's output (0: end to end, the default)")
    p.add_argument("--blockwise-windows", type=positive_int, default=2, metavar="N",
                   help="calibration windows per block-wise step (default: 2)")
    p.add_argument("--blockwise-weight-lr", type=non_negative_float, default=0.0, metavar="LR",
                   help="block-wise: the block's weights learn with its masks at this peak rate, and block "
                        "reconstruction starts from them (default: 0, the weights stay frozen)")
    p.add_argument("--sparse-weights", choices=SPARSE_WEIGHTS, default="dense", help=SPARSE_WEIGHTS_HELP)
    p.add_argument("--reconstruct", choices=(*RECONSTRUCTIONS, "none"), default="none",
                   help="after extraction, update the kept weights on the calibration windows (saved beside the "
                        "masks): block = each block's kept weights fitted to the dense model's block outputs; "
                        "fixed = exact least squares per layer under the learned mask; repick = dense tiles kept, "
                        "2:4 groups re-chosen by SparseGPT (default: none)")
    p.add_argument("--block-steps", type=positive_int, default=BlockFit().steps,
                   help=f"--reconstruct block: Adam steps per decoder block (default: {BlockFit().steps})")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the prior and learned masks on the eval split (default: on; --no-eval skips)")
    p.add_argument("--eval-windows", type=int, default=16,
                   help="perplexity windows of the eval split for prior vs learned masks (0: skip)")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--shard-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun: each process keeps only its share of AdamW's state (ZeRO-1); "
                        "default: on for maskllm and patch-joint, whose logits are 1.5 per weight")
    add_json_arg(p)
    p.set_defaults(handler=run_learn)


def config_from_args(args: argparse.Namespace) -> LearnConfig:
    sparsity = args.sparsity if args.sparsity is not None else (0.5 if args.mode == "maskllm" else 0.35)
    config = preset_config(args.preset, args.mode, sparsity)
    selection = LayerSelection(tuple(args.include) if args.include else (r".*",), tuple(args.exclude))
    mask = with_overrides(config.mask, tile=tuple(args.tile) if args.tile else None, selection=selection,
                          prior_strength_nm=args.prior_strength, prior_strength_tile=args.prior_strength,
                          hard_nm=args.hard, hard_tile=args.hard)
    if args.init_allocation is not None:
        mask = replace(mask, init_allocation=None if args.init_allocation == "uniform" else args.init_allocation)
    mask = replace(mask, sparse_weights=args.sparse_weights)
    schedules = {name: LinearSchedule(*getattr(args, name)) for name in ("tau_nm", "kappa_nm", "tau_tile", "kappa_tile")
                 if getattr(args, name) is not None}
    sampling = with_overrides(config.sampling, **schedules)
    objective = with_overrides(config.objective, sparse_reg=args.sparse_reg, weight_reg=args.weight_reg,
                               density_scope=args.density_scope, distill=args.distill,
                               distill_temperature=args.distill_temperature)
    optim = with_overrides(config.optim, lr=args.lr, nm_lr_scale=args.nm_lr_scale, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay)
    train = with_overrides(config.train, steps=args.steps, batch_size=args.batch, grad_accum=args.grad_accum,
                           seqlen=args.seqlen, seed=args.seed, checkpoint_every=args.checkpoint_every,
                           activation_checkpointing=args.activation_checkpointing)
    config = LearnConfig(mask, sampling, objective, optim, train)
    config.check()
    return config


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse an unusable --out before any work; True when an existing run is to be replaced.

    `check_writable_dir` has run before. Nothing is deleted here: the old run is set aside only once everything else has been checked,
    and put back if the new run fails (`set_aside`).
    """
    if resume or not (out.exists() and any(out.iterdir())):
        return False
    if not overwrite:
        raise PatchsparseError(f"--out {out} exists; pass --overwrite to replace it or --resume to continue it")
    return True


def prior_spec(prior: PriorMasks, config: LearnConfig) -> dict[str, HybridMaskSpec]:
    """The masks learning starts from: the 2:4 prior, and (patch modes) with the prior's dense tiles."""
    specs = {"prior 2:4": prior_2_4_spec(prior)}
    if config.mask.learns_tiles and all(p.tile_scores is not None for p in prior.values()):
        layers = {}
        for name, p in prior.items():
            grid = TileGrid.for_weight(p.nm_keep, config.mask.tile)
            dense = initial_dense_tiles(p.tile_scores.cpu(), grid, config.mask.sparsity)
            layers[name] = LayerMask(p.nm_keep.cpu(), "2:4", (grid.rows, grid.cols), dense)
        specs["prior hybrid (start)"] = HybridMaskSpec(layers)
    return specs


def run_learn(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from patchsparse.learn.distributed import from_environment

    config = config_from_args(args)
    if args.blockwise < 0:
        raise PatchsparseError(f"--blockwise must be >= 0 steps per block, got {args.blockwise}")
    check_learning_options(config, bool(args.blockwise))
    if args.blockwise and args.resume:
        raise PatchsparseError("a block-wise run keeps no checkpoint to resume; run it again without --resume")
    device = resolve_device(args.device)
    check_writable_dir(args.out)
    parallel = from_environment(device.type)
    try:
        with contextlib.ExitStack() as stack:
            if parallel.is_main:  # a second learn on the same --out fails here, before any work
                stack.enter_context(directory_lock(args.out))
            return _run_learn(args, config, parallel, device, stack)
    finally:
        if parallel.active and dist.is_initialized():
            dist.destroy_process_group()


def _run_learn(args: argparse.Namespace, config: LearnConfig, parallel: DataParallel, device: torch.device,
               stack: contextlib.ExitStack) -> int:
    if parallel.active and config.train.batch_size % parallel.world:
        raise PatchsparseError(f"--batch {config.train.batch_size} cannot be split over {parallel.world} processes; "
                               f"make it a multiple of {parallel.world}")
    main = parallel.is_main
    replace_old = check_out_dir(args.out, args.resume, args.overwrite) if main else False
    if parallel.active and device.type == "cuda":
        device = torch.device("cuda", parallel.local_rank)
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    model = loaded.model
    check_seqlen(config.train.seqlen, loaded.max_positions)
    evaluate = args.eval and args.eval_windows > 0
    if evaluate:  # checked before the prior, the expensive part, is computed
        check_seqlen(args.eval_seqlen, loaded.max_positions, "--eval-seqlen")
    corpus = load_corpus(args.data)
    train_ids = tokenize_texts(loaded.tokenizer, corpus.train)
    windows = shuffled_blocks(train_ids, config.train.seqlen, config.train.seed)
    device = next(model.parameters()).device

    blockwise = (BlockwiseConfig(args.blockwise, args.blockwise_windows, args.blockwise_weight_lr) if args.blockwise
                 else None)
    prior = calib = None
    if (not (args.resume and (args.out / PRIOR_FILE).is_file()) or args.reconstruct != "none" or blockwise
            or config.mask.sparse_weights == "fitted"):
        calib = random_windows(train_ids, args.calib_windows, config.train.seqlen, config.train.seed).to(device)
    if not (args.resume and (args.out / PRIOR_FILE).is_file()):
        start = time.perf_counter()
        prior = learn_prior(model, calib, args.prior, config)
        log(f"{args.prior} prior computed in {time.perf_counter() - start:.1f} s")

    figures: dict = {}
    eval_windows = None
    if evaluate and main:  # evaluation is process 0's alone
        eval_windows = sequential_windows(tokenize_texts(loaded.tokenizer, corpus.eval), args.eval_seqlen,
                                          args.eval_windows)
        if prior is not None:
            for label, spec in prior_spec(prior, config).items():
                figures.setdefault("perplexity", {})[label] = masked_perplexity(model, spec, eval_windows, label)
                figures.setdefault("prior_sparsity", {})[label] = spec.sparsity()

    if replace_old:  # everything is checked: set the old run aside (it comes back if this one fails)
        stack.enter_context(set_aside(args.out))
    # with --resume, learning continues from the checkpoint, or (killed before the first one)
    # starts afresh from the saved prior
    parallel.barrier()  # the others wait while process 0 evaluates the prior
    shard = config.mask.learns_patterns if args.shard_optimizer is None else args.shard_optimizer
    reconstruct = None if args.reconstruct == "none" or not main else args.reconstruct
    pipeline = learn_pipeline(model, windows, calib, config, args.prior, prior=prior, out_dir=args.out,
                              resume=args.resume, policy=args.policy, reconstruct=reconstruct,
                              metadata={"prior": args.prior, "preset": args.preset},
                              parallel=parallel, shard_optimizer=shard, blockwise=blockwise,
                              block_fit=BlockFit(steps=args.block_steps))
    result, spec = pipeline.learn, pipeline.spec
    if not main:
        parallel.barrier()  # wait until process 0 has written the masks
        return 0
    report = extraction_report(spec)

    from patchsparse.io.maskfile import save_mask_spec

    save_mask_spec(spec, args.out / MASKS_DIR, identity=loaded.identity, base_model=model, overwrite=True,
                   updated_weights=pipeline.weights,
                   extra={"learn_config": config.to_dict(), "steps_run": result.steps_run,
                          "last_metrics": result.last_metrics, "reconstruction": reconstruct})
    if eval_windows is not None:
        label = "learned" if reconstruct is None else f"learned + {reconstruct} reconstruction"
        figures.setdefault("perplexity", {})[label] = masked_perplexity(model, spec, eval_windows, label,
                                                                        pipeline.weights)

    print(f"{config.mask.mode}: {config.train.steps} steps ({result.steps_run} run here) in {result.seconds:.1f} s; "
          f"masks in {args.out / MASKS_DIR}")
    print(f"sparsity ({report.policy}): {report.sparsity:.4f} (target {config.mask.sparsity}); per projection: "
          + ", ".join(f"{k} {v:.3f}" for k, v in report.per_projection.items()))
    for label, ppl in figures.get("perplexity", {}).items():
        print(f"perplexity {label}: {ppl:.3f}")
    if args.json:
        figures.update({"extraction": report.as_dict(), "seconds": result.seconds, "steps_run": result.steps_run,
                        "last_metrics": result.last_metrics, "config": config.to_dict()})
        write_record(args.json, make_record("learn", settings_of(args), loaded.identity, figures))
    parallel.barrier()
    return 0
