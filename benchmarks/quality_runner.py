"""Running one row of the quality benchmark (`benchmarks/quality.py`): the shared model, data and
one-shot priors (`Bench`), and a runner per kind of method."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from patchsparse.data import random_windows
from patchsparse.data.windows import shuffled_blocks
from patchsparse.errors import PatchsparseError
from patchsparse.evaluate import evaluate_perplexity
from patchsparse.learn.blockwise import BlockwiseConfig
from patchsparse.learn.config import LearnConfig, with_overrides
from patchsparse.learn.presets import preset_config
from patchsparse.learn.priors import build_prior
from patchsparse.models import select_linears
from patchsparse.models.layers import MLP_ONLY, LayerSelection
from patchsparse.pipeline import can_resume, learn_pipeline, masked_perplexity, pruned
from patchsparse.prior.allocation import allocate_blocks
from patchsparse.reconstruct import BlockFit

from quality_report import settings_key
from quality_specs import FULL_WIDTH, MethodSpec, key_fields


# ---- running -------------------------------------------------------------------------------------

@dataclass
class Bench:
    """What every method needs: the model (dense weights kept aside), token windows, settings."""

    model: nn.Module
    identity: dict[str, Any]
    train_ids: torch.Tensor
    evals: dict[str, torch.Tensor]          # split name -> (n, seqlen) windows
    settings: dict[str, Any]
    out: Path
    dense_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    priors: dict[tuple, Any] = field(default_factory=dict)   # one-shot priors shared by learned rows

    @property
    def total_weights(self) -> int:
        return sum(w.numel() for w in self.dense_weights.values())

    def calibration(self) -> torch.Tensor:
        s = self.settings
        return random_windows(self.train_ids, s["calib_windows"], s["seqlen"], s["seed"])

    @property
    def calib_tokens(self) -> int:
        return self.settings["calib_windows"] * self.settings["seqlen"]

    @torch.no_grad()
    def restore(self) -> None:
        for name, linear in select_linears(self.model).items():
            linear.weight.copy_(self.dense_weights[name])

    def prior(self, pruner: str, sparsity: float, tile: tuple[int, int] | None,
              selection: LayerSelection) -> tuple[Any, float]:
        """(one-shot prior, seconds it took). Computed once per (pruner, sparsity, tile, layers):
        PATCH-Tile and PATCH-Joint at one sparsity, and the seeds of a row, start from the same
        one; every row that uses it is charged its full time."""
        key = (pruner, sparsity, tile, selection)
        if key not in self.priors:
            start = time.perf_counter()
            prior = build_prior(self.model, self.calibration(), pruner, sparsity, tile, selection)
            self.priors[key] = (prior, time.perf_counter() - start)
        return self.priors[key]

    def perplexities(self, prefix: str) -> dict[str, float]:
        return {split: evaluate_perplexity(self.model, windows, desc=f"{prefix} {split}").perplexity
                for split, windows in self.evals.items()}


def learn_config(spec: MethodSpec, settings: dict[str, Any], model: nn.Module) -> LearnConfig:
    # maskllm learns 2:4 wherever it masks (the row's sparsity is then set by the blocks it masks)
    config = preset_config(settings["preset"], spec.mode, 0.5 if spec.mode == "maskllm" else spec.sparsity)
    mask = config.mask
    if spec.tile is not None:
        tile = spec.tile
        if tile[1] == FULL_WIDTH:
            tile = (tile[0], max(l.in_features for l in select_linears(model, mask.selection).values()))
        mask = with_overrides(mask, tile=tile)
    train = with_overrides(config.train, steps=settings["steps"], seed=spec.seed,
                    seqlen=settings["train_seqlen"] or config.train.seqlen)
    optim = config.optim
    if settings.get("nm_lr_scale") is not None and spec.mode in ("patch-joint", "maskllm"):
        optim = with_overrides(optim, nm_lr_scale=settings["nm_lr_scale"])
    objective = with_overrides(config.objective, distill=spec.distill)
    if spec.mode == "maskllm" and spec.allocation is not None:
        # learned 2:4 on the blocks the allocation makes 2:4 (the others stay dense): a hybrid at spec.sparsity
        selection = allocate_blocks(model, spec.allocation, spec.sparsity)[0]
        mask = with_overrides(mask, selection=selection)
    else:
        mask = with_overrides(mask, init_allocation=spec.allocation)   # learned rows: where the tile prior starts
    mask = with_overrides(mask, sparse_weights=spec.sparse_weights)
    return with_overrides(config, mask=mask, train=train, optim=optim, objective=objective)


def run_dense(bench: Bench, spec: MethodSpec) -> dict[str, Any]:
    return {"sparsity": 0.0, "ppl": bench.perplexities("dense"), "calib_tokens": 0, "train_tokens": 0}


def run_oneshot(bench: Bench, spec: MethodSpec, selection: LayerSelection = LayerSelection(),
                extra_tokens: int = 0) -> dict[str, Any]:
    if spec.reconstruct not in (None, "block"):
        raise PatchsparseError(f"{spec.name}: one-shot rows reconstruct only with 'block'")
    start = time.perf_counter()
    hybrid = spec.pattern == "hybrid"  # the one-shot PATCH prior itself: the layer's best tiles dense, 2:4 elsewhere
    tile = preset_config(bench.settings["preset"], "patch-tile", spec.sparsity).mask.tile if hybrid else None
    sparsity = spec.sparsity if spec.pattern in ("unstructured", "hybrid") else None  # N:M implies its own
    fit = BlockFit(steps=spec.block_steps) if spec.block_steps else BlockFit()
    spec_masks, weights, _ = pruned(bench.model, bench.calibration(), spec.pruner, "2:4" if hybrid else spec.pattern,
                                    sparsity, tile=tile, selection=selection, reconstruct=spec.reconstruct,
                                    block_fit=fit)
    seconds = time.perf_counter() - start
    ppl = {split: masked_perplexity(bench.model, spec_masks, windows, f"{spec.name} {split}", weights)
           for split, windows in bench.evals.items()}
    return {"sparsity": spec_masks.sparsity_over(bench.total_weights), "ppl": ppl, "method_seconds": seconds,
            "calib_tokens": bench.calib_tokens + extra_tokens, "train_tokens": 0,
            "masked_layers": len(spec_masks.layers)}


def run_mlp_only(bench: Bench, spec: MethodSpec) -> dict[str, Any]:
    return run_oneshot(bench, spec, MLP_ONLY)


def run_blocks(bench: Bench, spec: MethodSpec) -> dict[str, Any]:
    start = time.perf_counter()
    owl = spec.allocation == "owl"
    selection, blocks, ratios = allocate_blocks(bench.model, spec.allocation, spec.sparsity,
                                                bench.calibration() if owl else None)
    extra_tokens = bench.calib_tokens if owl else 0
    allocation_seconds = time.perf_counter() - start
    figures = run_oneshot(bench, spec, selection, extra_tokens)
    figures["method_seconds"] += allocation_seconds
    figures["sparse_blocks"] = blocks
    if ratios is not None:
        figures["owl_outlier_ratios"] = [round(float(r), 6) for r in ratios]
    return figures


def run_learned(bench: Bench, spec: MethodSpec) -> dict[str, Any]:
    config = learn_config(spec, bench.settings, bench.model)
    # neither the extraction policy nor the reconstruction is part of training: rows that differ
    # only there share one training run (and its checkpoint)
    training_settings = {k: v for k, v in bench.settings.items() if k != "extraction"}
    untrained = dataclasses.replace(spec, reconstruct=None, name="", label="", group="")  # (a None is a value here)
    key = settings_key({"spec": key_fields(untrained),
                        "settings": training_settings})[:10]
    run_dir = bench.out / "learn" / f"{spec.mode}-{spec.sparsity:.0%}-{key}"
    prior, prior_seconds = None, 0.0
    if spec.blockwise or not can_resume(run_dir):
        tile = config.mask.tile if config.mask.learns_tiles else None
        prior, prior_seconds = bench.prior(spec.pruner, config.mask.sparsity, tile, config.mask.selection)
    windows = shuffled_blocks(bench.train_ids, config.train.seqlen, spec.seed)
    result = learn_pipeline(bench.model, windows, bench.calibration(), config, spec.pruner, prior=prior,
                            out_dir=None if spec.blockwise else run_dir,
                            policy=bench.settings.get("extraction", "exact"), reconstruct=spec.reconstruct,
                            blockwise=(BlockwiseConfig(spec.blockwise, weight_lr=spec.blockwise_weight_lr)
                                       if spec.blockwise else None),
                            block_fit=BlockFit(steps=spec.block_steps) if spec.block_steps else BlockFit())
    seconds = prior_seconds + result.total_seconds
    ppl = {split: masked_perplexity(bench.model, result.spec, windows_, f"{spec.name} {split}", result.weights)
           for split, windows_ in bench.evals.items()}
    tc = config.train
    # block-wise rows learn on the calibration windows: each block sees steps × windows-per-step of them
    train_tokens = (spec.blockwise * BlockwiseConfig().windows_per_step * bench.settings["seqlen"] if spec.blockwise
                    else tc.steps * tc.windows_per_step * tc.seqlen)
    return {"sparsity": result.spec.sparsity_over(bench.total_weights), "ppl": ppl, "method_seconds": seconds,
            "calib_tokens": bench.calib_tokens, "train_tokens": train_tokens,
            "steps": result.learn.steps_run if spec.blockwise else tc.steps, "tile": list(config.mask.tile) if spec.mode != "maskllm" else None,
            "prior_seconds": round(prior_seconds, 1),
            "stage_seconds": {k: round(v, 1) for k, v in result.seconds.items()},
            "resumed_from": result.learn.resumed_from, "final_lm_loss": result.learn.last_metrics.get("lm_loss"),
            "final_kd_loss": result.learn.last_metrics.get("kd_loss")}


RUNNERS: dict[str, Callable[[Bench, MethodSpec], dict[str, Any]]] = {
    "dense": run_dense, "learned": run_learned, "blocks": run_blocks,
}


def run_spec(bench: Bench, spec: MethodSpec) -> dict[str, Any]:
    if spec.kind == "oneshot":
        runner = run_mlp_only if spec.layers == "mlp" else run_oneshot
    else:
        runner = RUNNERS[spec.kind]
    start = time.perf_counter()
    figures = runner(bench, spec)
    figures["wall_seconds"] = round(time.perf_counter() - start, 1)
    figures.setdefault("method_seconds", 0.0)
    figures["method_seconds"] = round(figures["method_seconds"], 1)
    figures["tokens_seen"] = figures["calib_tokens"] + figures["train_tokens"]
    return figures
