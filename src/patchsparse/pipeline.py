"""The learned-mask pipeline in one place: prior → learn → extract → remove → (reconstruct), and scoring;
beside it the one-shot block pipeline (`oneshot_blocks`) that `patchsparse run` uses by default.

`patchsparse run`, `patchsparse learn` and the quality benchmark all go through `learn_pipeline`,
so a lever added here (distillation, reconstruction, a new prior) reaches every one of them.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from patchsparse.errors import PatchsparseError
from patchsparse.evaluate import evaluate_perplexity
from patchsparse.extract import extract_masks
from patchsparse.learn.blockwise import BlockwiseConfig, learn_blockwise
from patchsparse.learn.config import LearnConfig
from patchsparse.learn.distributed import SINGLE, DataParallel
from patchsparse.learn.masked import remove_masks
from patchsparse.learn.priors import build_prior
from patchsparse.learn.trainer import (CHECKPOINT_FILE, METRICS_FILE, PRIOR_FILE, RUN_FILE, LearnResult,
                                       check_same_settings, learn_masks, load_prior, save_prior, started_with)
from patchsparse.masks.spec import HybridMaskSpec, LayerMask
from patchsparse.models.layers import LayerSelection, block_index, select_linears
from patchsparse.prior.allocation import allocate_blocks
from patchsparse.prior.oneshot import prune_model
from patchsparse.prior.types import PriorMasks
from patchsparse.reconstruct import BlockFit, reconstruct_model, updated_weights
from patchsparse.utils import log


def can_resume(run_dir: Path | None) -> bool:
    """A run directory holds a checkpoint or at least the prior of a run that was started."""
    return run_dir is not None and ((run_dir / CHECKPOINT_FILE).is_file() or (run_dir / PRIOR_FILE).is_file())


def discard_other_run(run_dir: Path, config: LearnConfig | None) -> bool:
    """Remove the learning run saved in `run_dir` (prior, checkpoint, metrics) when it was started
    with other settings than `config` (None: when masks without learning take the folder over), so
    that a new run starts there instead of refusing to resume, and a report shows no stale curves.
    Returns whether one was removed. Other files of the folder are left alone."""
    files = (CHECKPOINT_FILE, PRIOR_FILE, METRICS_FILE, RUN_FILE)
    if config is None:
        if not any((run_dir / name).exists() for name in files):
            return False
    elif not (run_dir / RUN_FILE).is_file() or started_with(run_dir, config):
        return False  # (without a run file, e.g. block-wise runs, only the prior is there to reuse)
    for name in files:
        (run_dir / name).unlink(missing_ok=True)
    return True


@contextmanager
def weights_restored(linears: dict[str, nn.Linear]) -> Iterator[None]:
    """Put these linears' weights back as they were on leaving the block, whatever happened inside."""
    saved = {name: module.weight.detach().clone() for name, module in linears.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, module in linears.items():
                module.weight.copy_(saved[name])


@torch.no_grad()
def masked_perplexity(model: nn.Module, spec: HybridMaskSpec | None, windows: torch.Tensor, desc: str,
                      weights: dict[str, torch.Tensor] | None = None) -> float:
    """Perplexity with `spec` applied (over `weights`, e.g. reconstructed ones, when given); the
    model's weights are put back afterwards. `spec=None` scores the model as it is."""
    if spec is None:
        return evaluate_perplexity(model, windows, desc=desc).perplexity
    linears = spec.check_matches(model)
    with weights_restored(linears):
        for name, weight in (weights or {}).items():
            linears[name].weight.copy_(weight.to(linears[name].weight.dtype))
        spec.apply_(model)
        return evaluate_perplexity(model, windows, desc=desc).perplexity


@dataclass
class PipelineResult:
    spec: HybridMaskSpec                      # the hard masks (after reconstruction, its masks)
    learn: LearnResult
    prior: PriorMasks                         # the prior the masks started from (a resumed run's saved one)
    weights: dict[str, torch.Tensor] | None   # reconstructed weights of the masked linears (CPU), if any
    seconds: dict[str, float] = field(default_factory=dict)  # prior / learn / reconstruct

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def learn_prior(model: nn.Module, calib_windows: torch.Tensor | None, method: str, config: LearnConfig) -> PriorMasks:
    """The one-shot prior a run of `config` starts from. maskllm uses no tile scores, so its 2:4
    prior is calibrated without dense tiles."""
    tile = config.mask.tile if config.mask.learns_tiles else None
    return build_prior(model, calib_windows, method, config.mask.sparsity, tile, config.mask.selection)


def check_learning_options(config: LearnConfig, blockwise: bool) -> None:
    """Refuse, before any work, a combination of options the pipeline cannot run."""
    if blockwise and config.mask.sparse_weights == "fitted":
        raise PatchsparseError("learning on fitted 2:4 weights (--sparse-weights fitted) is for end-to-end learning, "
                               "not block-wise (--blockwise)")


def prior_2_4_spec(prior: PriorMasks) -> HybridMaskSpec:
    """The prior's 2:4 masks on every layer, no dense tiles."""
    return HybridMaskSpec({name: LayerMask(layer.nm_keep.cpu(), "2:4") for name, layer in prior.items()})


def learn_pipeline(model: nn.Module, train_windows: torch.Tensor, calib_windows: torch.Tensor | None,
                   config: LearnConfig, prior_method: str, *, prior: PriorMasks | None = None,
                   out_dir: Path | None = None, resume: bool | None = None,
                   policy: str = "exact", reconstruct: str | None = None, metadata: dict[str, Any] | None = None,
                   parallel: DataParallel = SINGLE, shard_optimizer: bool = False,
                   blockwise: BlockwiseConfig | None = None, sparse_fit: BlockFit = BlockFit(),
                   block_fit: BlockFit = BlockFit()) -> PipelineResult:
    """Learn masks on `model` and return them extracted, with the model's dense weights back.

    prior: a prior already computed with `prior_method` (e.g. shared by several runs); else it is
    computed here. resume: None resumes whenever `out_dir` holds a started run (`can_resume`); the
    saved prior is then reused and no calibration runs. reconstruct: None, "repick", "fixed" or "block"
    (`patchsparse.reconstruct`; `block` trains as `block_fit` says); the reconstructed weights are
    returned, the model keeps its own.
    blockwise: learn block by block on the calibration windows (`learn.blockwise`) instead of
    end to end on `train_windows`; such a run keeps no checkpoint (it takes minutes): resuming it
    reuses only the saved prior. Under data parallelism every process calls this; only process 0's
    result is meaningful after extraction (the others return it too, for symmetry).
    With `config.mask.sparse_weights == "fitted"` the prior's all-2:4 masks first get their weights
    fitted by block reconstruction (`fitted_sparse_weights`, as `sparse_fit` says), and learning
    weighs every tile's dense weights against those fitted ones rather than the dense weights under
    the 2:4 mask; the result's weights (and the start of `reconstruct="block"`) are the dense tiles'
    dense weights and the sparse tiles' fitted ones.
    """
    check_learning_options(config, blockwise is not None)
    if resume is None:
        resume = can_resume(out_dir)
    seconds: dict[str, float] = {}
    if resume and out_dir is not None and (out_dir / PRIOR_FILE).is_file():
        prior = load_prior(out_dir / PRIOR_FILE)  # the run's own prior, whatever was passed
    elif prior is None:
        start = time.perf_counter()
        prior = learn_prior(model, calib_windows, prior_method, config)
        seconds["prior"] = time.perf_counter() - start
        log(f"{prior_method} prior computed in {seconds['prior']:.1f} s")
    sparse_weights = None
    if config.mask.sparse_weights == "fitted":
        if resume and out_dir is not None and (out_dir / RUN_FILE).is_file():  # refused before minutes of fitting
            check_same_settings(json.loads((out_dir / RUN_FILE).read_text())["config"], config)
        sparse_weights, seconds["fit 2:4"] = fitted_sparse_weights(model, prior, calib_windows, sparse_fit)
    if blockwise is not None:
        if parallel.active:
            raise PatchsparseError("block-wise learning runs in one process; launch it without torchrun")
        if out_dir is not None and prior is not None and not (out_dir / PRIOR_FILE).is_file():
            out_dir.mkdir(parents=True, exist_ok=True)
            save_prior(prior, out_dir / PRIOR_FILE)
        start = time.perf_counter()
        learned = learn_blockwise(model, calib_windows, config, prior, blockwise)
        masked, learned_weights = learned.masked, learned.weights
        blocks = len({block_index(name) for name in masked.masks})
        result = LearnResult(masked=masked, config=config, steps_run=blockwise.steps * blocks, resumed_from=None,
                             seconds=time.perf_counter() - start)
    else:
        learned_weights = None
        result = learn_masks(model, train_windows, config, prior, out_dir, resume=resume, parallel=parallel,
                             shard_optimizer=shard_optimizer, sparse_weights=sparse_weights)
    seconds["learn"] = result.seconds
    target = None if config.mask.mode == "maskllm" else config.mask.sparsity
    spec = extract_masks(model, policy, target, config.mask.mode, metadata=metadata)
    remove_masks(model)
    if sparse_weights is not None:
        learned_weights = dense_tiles_over(spec, model, sparse_weights)
    weights = None
    if learned_weights is not None:  # weights learned with, or fitted for, the masks: the block fit starts from them
        weights = {name: learned_weights[name] * layer.keep_mask().to(learned_weights[name].dtype)
                   for name, layer in spec.layers.items()}
        spec.metadata["weights_updated"] = True
    if reconstruct is not None:
        spec, weights, seconds["reconstruct"] = reconstructed(model, spec, calib_windows, reconstruct,
                                                              block_fit=block_fit, start=weights)
    return PipelineResult(spec, result, prior, weights, seconds)


@dataclass
class OneShotResult:
    spec: HybridMaskSpec                    # 2:4 masks of the sparse blocks' linears (the other blocks dense)
    weights: dict[str, torch.Tensor]        # their weights: the pruner's update, then the reconstruction's (CPU)
    sparse_blocks: list[int]
    sparsity: float                         # over all decoder linears
    seconds: dict[str, float] = field(default_factory=dict)  # prune / reconstruct


def oneshot_blocks(model: nn.Module, calib_windows: torch.Tensor, sparsity: float, *, pruner: str = "sparsegpt",
                   allocation: str = "edges", reconstruct: str | None = "block",
                   block_fit: BlockFit = BlockFit()) -> OneShotResult:
    """A hybrid mask without learning: whole decoder blocks 2:4 (the pruner's groups and, for SparseGPT,
    its weight update) and the others dense, as many 2:4 blocks as bring all decoder linears nearest
    `sparsity` (`allocation`: `edges` keeps the first and last blocks dense); then the kept weights
    reconstructed (`block` starts its fit from the pruner's update). The model keeps its dense weights.

    On the default model at the CPU budget this beats every learned pipeline tried (docs/LEARN.md,
    "More tries"), which is why `patchsparse run` uses it by default.
    """
    start = time.perf_counter()
    selection, blocks, _ = allocate_blocks(model, allocation, sparsity, calib_windows)
    if not blocks:
        raise PatchsparseError(f"sparsity {sparsity} is closer to no 2:4 block than to one; raise it, "
                               "or learn the tiles (--mode patch-tile)")
    allocation_seconds = time.perf_counter() - start
    spec, weights, seconds = pruned(model, calib_windows, pruner, selection=selection, reconstruct=reconstruct,
                                    block_fit=block_fit)
    seconds["prune"] += allocation_seconds
    sparsity = spec.sparsity_over(sum(m.weight.numel() for m in select_linears(model).values()))
    spec.metadata.update(block_allocation=allocation, sparse_blocks=blocks, model_sparsity=sparsity)
    return OneShotResult(spec, weights, blocks, sparsity, seconds)


def pruned(model: nn.Module, calib_windows: torch.Tensor | None, pruner: str, pattern: str = "2:4",
           sparsity: float | None = None, *, tile: tuple[int, int] | None = None,
           selection: LayerSelection = LayerSelection(), reconstruct: str | None = None,
           block_fit: BlockFit = BlockFit()) -> tuple[HybridMaskSpec, dict[str, torch.Tensor], dict[str, float]]:
    """(one-shot masks, their weights on CPU, seconds by stage: prune / reconstruct): the pruner's
    masks and weight update (`prune_model`), then the kept weights reconstructed if asked (`block`
    fits from the pruner's update). The model keeps its dense weights."""
    start = time.perf_counter()
    with weights_restored(select_linears(model, selection)):
        spec = prune_model(model, calib_windows, pruner, pattern, sparsity, tile=tile, selection=selection,
                           update_weights=True)
        weights = updated_weights(model, spec)
    seconds = {"prune": time.perf_counter() - start}
    if reconstruct is not None:
        spec, weights, seconds["reconstruct"] = reconstructed(model, spec, calib_windows, reconstruct,
                                                              block_fit=block_fit, start=weights)
    return spec, weights, seconds


def fitted_sparse_weights(model: nn.Module, prior: PriorMasks, calib_windows: torch.Tensor | None,
                          fit: BlockFit) -> tuple[dict[str, torch.Tensor], float]:
    """(the prior's all-2:4 masks' weights after block reconstruction, seconds); the model keeps its
    dense weights."""
    if calib_windows is None:
        raise PatchsparseError("fitting the 2:4 weights needs calibration windows")
    _, weights, seconds = reconstructed(model, prior_2_4_spec(prior), calib_windows, "block", block_fit=fit)
    log(f"2:4 prior's weights fitted in {seconds:.1f} s")
    return weights, seconds


def dense_tiles_over(spec: HybridMaskSpec, model: nn.Module,
                     sparse: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer of `spec`: the model's weights inside the dense tiles, `sparse`'s elsewhere (CPU).
    (Where a learned 2:4 choice keeps a weight that `sparse` had pruned, that weight is zero.)"""
    weights = {}
    for name, linear in spec.check_matches(model).items():
        layer, fitted = spec.layers[name], sparse[name].cpu()
        if layer.dense_tiles is None:
            weights[name] = fitted.clone()
        else:
            weights[name] = torch.where(layer.grid.expand(layer.dense_tiles), linear.weight.detach().cpu(), fitted)
    return weights


def reconstructed(model: nn.Module, spec: HybridMaskSpec, calib_windows: torch.Tensor | None,
                  mode: str, **options: Any) -> tuple[HybridMaskSpec, dict[str, torch.Tensor], float]:
    """(new spec, reconstructed weights on CPU, seconds); the model keeps its dense weights.
    `options` go to `reconstruct_model` (e.g. block_fit, start)."""
    start = time.perf_counter()
    with weights_restored(spec.check_matches(model)):
        new = reconstruct_model(model, spec, calib_windows, mode, **options)
        weights = updated_weights(model, new)
    new.metadata["weights_updated"] = True
    return new, weights, time.perf_counter() - start
