"""`patchsparse run`: the main job — dense vs SparseGPT 2:4 vs PATCH on the default model.

The PATCH row is by default the pipeline that wins at a CPU budget (`--mode oneshot`: SparseGPT 2:4
on the middle decoder blocks, the first and last dense, then block reconstruction); `--mode
patch-tile` or `patch-joint` learns the tiles instead (docs/LEARN.md says what each gives).

Each step writes its result record to `OUT/results/<step>.json` when it finishes; a rerun with the
same settings reuses finished steps (and an interrupted PATCH run resumes from its checkpoint).
The run directory is also a report directory: `OUT/masks/` (PATCH masks), `OUT/metrics.jsonl`,
`OUT/results/`, and `patchsparse report OUT` is written at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from patchsparse.cli.common import (SPARSE_WEIGHTS_HELP, add_json_arg, check_seqlen, check_writable_dir,
                                    positive_int)
from patchsparse.data import load_corpus, random_windows, sequential_windows, tokenize_texts
from patchsparse.data.corpus import DEFAULT_CORPUS
from patchsparse.data.windows import shuffled_blocks
from patchsparse.errors import PatchsparseError
from patchsparse.evaluate import evaluate_perplexity
from patchsparse.atomic import atomic_write_text
from patchsparse.io.lock import directory_lock
from patchsparse.io.maskfile import save_mask_spec
from patchsparse.learn.blockwise import BlockwiseConfig
from patchsparse.learn.config import SPARSE_WEIGHTS, LearnConfig, with_overrides
from patchsparse.learn.presets import preset_config
from patchsparse.models import load_model, select_linears
from patchsparse.models.builtin import DEFAULT_MODEL
from patchsparse.pipeline import (can_resume, check_learning_options, discard_other_run, learn_pipeline,
                                  masked_perplexity, oneshot_blocks, weights_restored)
from patchsparse.prior.methods import pruner_names
from patchsparse.prior.oneshot import prune_model
from patchsparse.masks.tiles import check_hybrid_sparsity
from patchsparse.reconstruct import MODES as RECONSTRUCTIONS, BlockFit, updated_weights
from patchsparse.records import make_record, write_record
from patchsparse.utils import log

RESULTS = "results"
ONESHOT = "oneshot"
MODES = (ONESHOT, "patch-tile", "patch-joint")
# block-fit steps per block when --block-steps is not given: the one-shot pipeline spends on the fit
# the minutes the learned ones spend learning (both about 8 min on 2 cores at 35%)
DEFAULT_BLOCK_STEPS = {ONESHOT: 128}
# the settings that only learning reads, at the values that leave them unused
LEARNING_DEFAULTS = {"preset": "cpu", "steps": None, "distill": None, "blockwise": 0, "sparse_weights": "dense",
                     "init_allocation": "edges"}


@dataclass(frozen=True)
class RunSettings:
    model: str
    data: str
    sparsity: float
    mode: str
    prior: str
    preset: str
    calib_windows: int
    eval_windows: int
    seqlen: int
    seed: int
    steps: int | None = None  # overrides the preset's number of optimizer steps
    distill: float | None = None  # overrides the preset's distillation share α
    reconstruct: str | None = None  # weight reconstruction after extraction (None: none)
    blockwise: int = 0  # steps per block of block-wise learning (0: end to end)
    init_allocation: str | None = "edges"  # where the tile prior starts the dense share (None: uniform)
    sparse_weights: str = "dense"  # what the sparse tiles' weights are while learning: dense | fitted
    block_steps: int | None = None  # block reconstruction's steps per block (None: the mode's default)

    @property
    def learns(self) -> bool:
        return self.mode != ONESHOT

    def block_fit(self) -> BlockFit:
        steps = self.block_steps or DEFAULT_BLOCK_STEPS.get(self.mode)
        return BlockFit(steps=steps) if steps else BlockFit()

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="the main job: dense vs SparseGPT 2:4 vs PATCH, with a report")
    p.add_argument("--out", type=Path, default=Path("runs/main"), help="run directory (default: runs/main)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", default=DEFAULT_CORPUS)
    p.add_argument("--sparsity", type=float, default=0.35, help="PATCH target sparsity in [0, 0.5] (default 0.35)")
    p.add_argument("--mode", choices=MODES, default=ONESHOT,
                   help="oneshot (default): SparseGPT 2:4 on the middle blocks, the first and last dense, no "
                        "learning; patch-tile / patch-joint: learn the tiles (and 2:4 groups) from a one-shot prior")
    p.add_argument("--prior", choices=pruner_names(), default="sparsegpt",
                   help="the one-shot pruner (oneshot), or the prior learning starts from")
    p.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    p.add_argument("--calib-windows", type=positive_int, default=32, help="calibration windows of --seqlen tokens")
    p.add_argument("--eval-windows", type=positive_int, default=16, help="evaluation windows of --seqlen tokens")
    p.add_argument("--seqlen", type=positive_int, default=512, help="calibration and evaluation window length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive_int, default=None, help="PATCH optimizer steps (default: the preset's)")
    p.add_argument("--distill", type=float, default=None, metavar="ALPHA",
                   help="share of the dense-model distillation term in [0, 1] (default: the preset's)")
    p.add_argument("--blockwise", type=int, default=0, metavar="STEPS",
                   help="learn block by block on the calibration windows, STEPS steps per block (0: end to end)")
    p.add_argument("--block-steps", type=positive_int, default=None,
                   help=f"block reconstruction's Adam steps per block (default {DEFAULT_BLOCK_STEPS[ONESHOT]} for "
                        f"oneshot, {BlockFit().steps} for the learned modes)")
    p.add_argument("--reconstruct", choices=(*RECONSTRUCTIONS, "none"), default="block",
                   help="weight reconstruction of the PATCH masks: block = each block's kept weights fitted to the "
                        "dense model's block outputs (default), fixed = exact least squares per layer, repick = "
                        "SparseGPT re-picks the 2:4 groups of the sparse tiles, none")
    p.add_argument("--init-allocation", choices=("uniform", "edges"), default="edges",
                   help="where the tile prior starts the dense share: edges = the first and last blocks dense, "
                        "the others 2:4 (default), uniform = every layer at the target (the published prior)")
    p.add_argument("--sparse-weights", choices=SPARSE_WEIGHTS, default="dense", help=SPARSE_WEIGHTS_HELP)
    p.add_argument("--fresh", action="store_true", help="recompute every step instead of reusing finished ones")
    add_json_arg(p)
    p.set_defaults(handler=run_main)


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The run's settings, every one checked before anything is loaded."""
    check_hybrid_sparsity(args.sparsity)
    settings = RunSettings(model=args.model, data=args.data, sparsity=args.sparsity, mode=args.mode,
                           prior=args.prior, preset=args.preset, calib_windows=args.calib_windows,
                           eval_windows=args.eval_windows, seqlen=args.seqlen, seed=args.seed, steps=args.steps,
                           distill=args.distill, reconstruct=None if args.reconstruct == "none" else args.reconstruct,
                           blockwise=args.blockwise, sparse_weights=args.sparse_weights, block_steps=args.block_steps,
                           init_allocation=None if args.init_allocation == "uniform" else args.init_allocation)
    if settings.blockwise < 0:
        raise PatchsparseError(f"--blockwise must be >= 0 steps per block, got {settings.blockwise}")
    if settings.learns:
        check_learning_options(run_config(settings), bool(settings.blockwise))
        return settings
    changed = [k for k, unused in LEARNING_DEFAULTS.items() if getattr(settings, k) != unused]
    if changed:  # (the one-shot masks always keep the first and last blocks dense: the edges allocation)
        raise PatchsparseError(f"--{changed[0].replace('_', '-')} is an option of learning; add --mode patch-tile "
                               "(or patch-joint) to learn the tiles")
    return settings


def run_config(settings: RunSettings) -> LearnConfig:
    """The learning configuration of the PATCH step: the preset with the run's overrides."""
    config = preset_config(settings.preset, settings.mode, settings.sparsity)
    config = with_overrides(config, train=with_overrides(config.train, steps=settings.steps),
                            objective=with_overrides(config.objective, distill=settings.distill),
                            mask=with_overrides(config.mask, init_allocation=settings.init_allocation,
                                                sparse_weights=settings.sparse_weights))
    config.check()
    return config


# The settings each step's result depends on: the dense and SparseGPT rows are reused when only
# the PATCH settings change (the PATCH step depends on every setting).
STEP_SETTINGS = {
    "dense": ("model", "data", "eval_windows", "seqlen"),
    "sparsegpt-2of4": ("model", "data", "eval_windows", "seqlen", "calib_windows", "seed"),
}


def finished_step(path: Path, name: str, settings: RunSettings) -> dict[str, Any] | None:
    """The step's record when it was finished with the same settings (those it depends on), else None."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    saved, current = record.get("settings"), settings.as_dict()
    if not isinstance(saved, dict):
        return None
    keys = STEP_SETTINGS.get(name, tuple(current))
    return record if all(saved.get(k) == current[k] for k in keys) else None


def run_main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    check_writable_dir(args.out)
    with directory_lock(args.out):  # a second `run` on the same --out stops here, before any work
        return _run_main(args, settings)


def _run_main(args: argparse.Namespace, settings: RunSettings) -> int:
    out: Path = args.out
    (out / RESULTS).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)

    loaded = load_model(settings.model, dtype="float32", device="auto")
    model = loaded.model
    check_seqlen(settings.seqlen, loaded.max_positions)
    corpus = load_corpus(settings.data)
    train_ids = tokenize_texts(loaded.tokenizer, corpus.train)
    eval_windows = sequential_windows(tokenize_texts(loaded.tokenizer, corpus.eval), settings.seqlen,
                                      settings.eval_windows)
    device = next(model.parameters()).device

    def calibration() -> torch.Tensor:
        return random_windows(train_ids, settings.calib_windows, settings.seqlen, settings.seed).to(device)

    def step(name: str, label: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = out / RESULTS / f"{name}.json"
        record = None if args.fresh else finished_step(path, name, settings)
        if record is not None:
            log(f"[{label}] reusing {path}")
            return record["figures"]
        log(f"[{label}] running …")
        start = time.perf_counter()
        figures = compute()
        figures["seconds"] = round(time.perf_counter() - start, 1)
        record = make_record("run", settings.as_dict(), loaded.identity, figures)
        record["label"] = label
        write_record(path, record)
        return figures

    def dense() -> dict[str, Any]:
        result = evaluate_perplexity(model, eval_windows, desc="dense perplexity")
        return {"perplexity": result.perplexity, "sparsity": 0.0, "tokens_scored": result.tokens_scored,
                "corpus": corpus.name}

    def sparsegpt_2of4() -> dict[str, Any]:
        with weights_restored(select_linears(model)):
            spec = prune_model(model, calibration(), "sparsegpt", "2:4", update_weights=True)
            updated = updated_weights(model, spec)
            perplexity = evaluate_perplexity(model, eval_windows, desc="SparseGPT 2:4 perplexity").perplexity
        save_mask_spec(spec, out / "baselines" / "sparsegpt-2of4", identity=loaded.identity, base_model=model,
                       updated_weights=updated, overwrite=True, extra={"method": "sparsegpt", "pattern": "2:4"})
        return {"perplexity": perplexity, "sparsity": spec.sparsity(), "corpus": corpus.name,
                "masks": str(out / "baselines" / "sparsegpt-2of4")}

    def oneshot() -> dict[str, Any]:
        if discard_other_run(out, None):
            log(f"removed the learning run saved in {out}: the one-shot masks take its place")
        result = oneshot_blocks(model, calibration(), settings.sparsity, pruner=settings.prior,
                                reconstruct=settings.reconstruct, block_fit=settings.block_fit())
        spec = result.spec
        save_mask_spec(spec, out / "masks", identity=loaded.identity, base_model=model, overwrite=True,
                       updated_weights=result.weights,
                       extra={"method": settings.prior, "pattern": "2:4", "block_allocation": "edges",
                              "sparse_blocks": result.sparse_blocks, "reconstruction": settings.reconstruct})
        perplexity = masked_perplexity(model, spec, eval_windows, f"PATCH one-shot {settings.sparsity:.0%} perplexity",
                                       result.weights)
        return {"perplexity": perplexity, "sparsity": result.sparsity, "corpus": corpus.name,
                "sparse_blocks": result.sparse_blocks, "masks": str(out / "masks"),
                "seconds_by_stage": {k: round(v, 1) for k, v in result.seconds.items()}}

    def patch() -> dict[str, Any]:
        config = run_config(settings)
        if discard_other_run(out, config):  # this step is being redone with other settings
            log(f"the learning run saved in {out} had other settings; learning from the start")
        windows = shuffled_blocks(train_ids, config.train.seqlen, settings.seed)
        blockwise = BlockwiseConfig(settings.blockwise) if settings.blockwise else None
        needs_calibration = (blockwise is not None or config.mask.sparse_weights == "fitted"
                             or settings.reconstruct is not None or not can_resume(out))
        result = learn_pipeline(model, windows, calibration() if needs_calibration else None, config,
                                settings.prior, out_dir=out, reconstruct=settings.reconstruct, blockwise=blockwise,
                                block_fit=settings.block_fit(),
                                metadata={"prior": settings.prior, "preset": settings.preset})
        spec = result.spec
        save_mask_spec(spec, out / "masks", identity=loaded.identity, base_model=model, overwrite=True,
                       updated_weights=result.weights,
                       extra={"learn_config": config.to_dict(), "steps_run": result.learn.steps_run,
                              "reconstruction": settings.reconstruct})
        perplexity = masked_perplexity(model, spec, eval_windows, f"PATCH {settings.sparsity:.0%} perplexity",
                                       result.weights)
        return {"perplexity": perplexity, "sparsity": spec.sparsity(), "corpus": corpus.name,
                "steps": config.train.steps, "masks": str(out / "masks"),
                "seconds_by_stage": {k: round(v, 1) for k, v in result.seconds.items()}}

    started = time.perf_counter()
    rows = [
        ("dense", step("dense", "dense", dense)),
        ("SparseGPT 2:4", step("sparsegpt-2of4", "SparseGPT 2:4", sparsegpt_2of4)),
        (f"PATCH {settings.mode} {settings.sparsity:.0%}",
         step("patch", f"PATCH {settings.mode} {settings.sparsity:.0%}", patch if settings.learns else oneshot)),
    ]
    from patchsparse.report.build import build_report

    report = build_report(out)
    table = comparison_table(rows, eval_windows)
    print(table)
    print(f"report: {report}")
    atomic_write_text(out / "summary.md", table + "\n")
    if args.json:
        figures = {label: figs for label, figs in rows}
        figures["seconds"] = round(time.perf_counter() - started, 1)
        write_record(args.json, make_record("run", settings.as_dict(), loaded.identity, figures))
    return 0


def comparison_table(rows: list[tuple[str, dict[str, Any]]], eval_windows: torch.Tensor) -> str:
    dense = rows[0][1]["perplexity"]
    n, seqlen = eval_windows.shape
    lines = [f"perplexity on the evaluation split ({n} windows of {seqlen} tokens)", "",
             "| method | sparsity | perplexity | vs dense | seconds |", "|---|---|---|---|---|"]
    for label, figures in rows:
        lines.append(f"| {label} | {figures['sparsity']:.1%} | {figures['perplexity']:.2f} | "
                     f"{figures['perplexity'] / dense:.2f}x | {figures.get('seconds', 0):.0f} |")
    return "\n".join(lines)
