"""The mask-learning loop: `learn_masks(model, windows, config, prior, out_dir, resume)`.

Why a loop of our own rather than HF `Trainer` or accelerate: only the mask logits train, the
objective has terms that are not the model's loss (one of them injected per layer), schedules are
pure functions of the step, and a resumed run must reproduce an uninterrupted one bit for bit.
The HF Trainer would need a subclassed `compute_loss`, callbacks for τ/κ, and its own
checkpoint format and data sampler state (the published code's loss scaling even changes with the
transformers version, docs/METHOD.md §10); the loop below is about a hundred lines and owns all of it.

Every optimizer step t (0 … T−1):
  1. the sampler takes τ_t, κ_t, the R_w coefficient and the noise stream of step t (one noise
     sample per optimizer step, shared by its micro-batches);
  2. each of the `grad_accum` micro-batches adds ∇(L_LM / grad_accum) (and each layer its R_w
     term) to the logits' gradients;
  3. the sparsity regulariser λ_s·R_s is computed once from the tile values (exact, tiny);
  4. gradients are clipped, AdamW steps with the cosine learning rate of step t.
Data for step t are the windows (t·a + j)·B … in the given order, cycling when exhausted.

Checkpoints (every K steps and at the end) hold the logits, the optimizer state, the step and the
RNG states, written atomically; `resume=True` loads the last one and continues, and the saved
prior is reused, so an interrupted run ends with exactly the masks of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from patchsparse.atomic import atomic_write_text, atomic_write_with
from patchsparse.errors import PatchsparseError
from patchsparse.learn.config import LearnConfig, TrainConfig
from patchsparse.learn.distributed import SINGLE, DataParallel, optimizer_state_for_checkpoint
from patchsparse.learn.masked import (HARD, OFF, SAMPLE, MaskedModel, attach_masks, remove_masks,
                                      soft_weights_built_once)
from patchsparse.learn.objective import distillation_loss, sparsity_regulariser, weight_magnitude_ratio
from patchsparse.learn.schedules import cosine_lr
from patchsparse.masks.bits import pack_bits, unpack_bits
from patchsparse.models.layers import block_index
from patchsparse.prior.types import LayerPrior, PriorMasks
from patchsparse.utils import log, progress

CHECKPOINT_FILE = "checkpoint.pt"
PRIOR_FILE = "prior.pt"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
FORMAT_VERSION = 2  # 2: loadable with weights_only=True (numpy RNG state as plain data)


@dataclass
class LearnResult:
    masked: MaskedModel            # the masks, still attached to the model
    config: LearnConfig
    steps_run: int                 # optimizer steps run by this call (0 when resuming a finished run)
    resumed_from: int | None       # step the run resumed at, if it did
    seconds: float
    last_metrics: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


# ---- files --------------------------------------------------------------------------------------

def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary sibling and one rename: the old file or the new one, never half."""
    atomic_write_with(path, lambda f: torch.save(obj, f))


def save_prior(prior: PriorMasks, path: Path) -> None:
    """The prior a run started from, bit-packed, so a resumed run needs no pruner."""
    data = {}
    for name, layer in prior.items():
        keep = layer.nm_keep.detach().cpu()
        data[name] = {"shape": tuple(keep.shape), "nm_keep": pack_bits(keep.bool()),
                      "tile_scores": None if layer.tile_scores is None else layer.tile_scores.detach().cpu(),
                      "tile": None if layer.tile is None else tuple(layer.tile)}
    atomic_torch_save(data, path)


def load_run_file(path: Path) -> Any:
    """Read prior.pt / checkpoint.pt without executing anything: tensors and plain containers only.

    Run directories are shared; `weights_only=True` refuses any pickled object that is not a tensor,
    a number, a string or a list/tuple/dict of them, so a crafted file cannot run code on resume.
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # random bytes fail too, on an unknown opcode
            raise PatchsparseError(f"{path} is corrupt or truncated (not a torch file); "
                                   f"delete it to restart the run, or pass --overwrite") from None
        reason = str(exc).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
        raise PatchsparseError(f"{path}: refused to load: it holds objects other than tensors and plain data "
                               f"({detail.strip()[:120]}); a checkpoint of patchsparse before format "
                               f"{FORMAT_VERSION} does too: restart such a run with --overwrite") from None
    except Exception as exc:  # noqa: BLE001 - truncated or not a torch file at all
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PatchsparseError(f"{path} is corrupt or truncated ({first[:120]}); "
                               f"delete it to restart the run, or pass --overwrite") from None


def _bad_run_file(path: Path, what: str) -> PatchsparseError:
    return PatchsparseError(f"{path} is not a valid {what} (unexpected structure); delete it to restart the run")


def load_prior(path: Path) -> PriorMasks:
    data = load_run_file(path)
    prior = {}
    try:
        for name, d in data.items():
            rows, cols = (int(x) for x in d["shape"])
            n = rows * cols
            packed = d["nm_keep"]
            if rows < 1 or cols < 1 or packed.dtype != torch.uint8 or packed.numel() != -(-n // 8):
                raise ValueError("packed mask does not fit its shape")
            keep = unpack_bits(packed.reshape(-1), (rows, cols))
            tile_scores, tile = d["tile_scores"], d["tile"]
            if tile_scores is not None and not (isinstance(tile_scores, torch.Tensor)
                                                and bool(torch.isfinite(tile_scores).all())):
                raise ValueError("tile scores are not finite")
            prior[name] = LayerPrior(keep, tile_scores, None if tile is None else tuple(int(x) for x in tile))
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError):
        raise _bad_run_file(path, "prior file") from None
    return prior


def _rng_state() -> dict[str, Any]:
    # numpy's state as plain data: a checkpoint holds nothing that needs unpickling of foreign classes
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _normalised(config_dict: dict) -> str:
    return json.dumps(config_dict, sort_keys=True, default=list)


def _as_today(saved_config: dict) -> dict:
    """A saved config as this version writes it: a setting added since counts as its default."""
    return LearnConfig.from_dict(saved_config).to_dict()


def started_with(out_dir: Path, config: LearnConfig) -> bool:
    """Whether the learning run saved in `out_dir` was started with `config`; False when there is
    none or it cannot be read."""
    try:
        saved = json.loads((Path(out_dir) / RUN_FILE).read_text())["config"]
        return _normalised(_as_today(saved)) == _normalised(config.to_dict())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def check_same_settings(saved_config: dict, config: LearnConfig) -> None:
    """Refuse to resume a run saved with `saved_config` under other settings than `config`."""
    saved_config = _as_today(saved_config)
    if _normalised(saved_config) != _normalised(config.to_dict()):
        a, b = json.loads(_normalised(saved_config)), json.loads(_normalised(config.to_dict()))
        diffs = [f"{part}.{k}" for part in a for k in a[part] if a[part].get(k) != b.get(part, {}).get(k)]
        raise PatchsparseError(f"cannot resume: the checkpoint was made with different settings ({', '.join(diffs) or 'config'})")


def _check_same_run(saved: dict, config: LearnConfig, layers: dict[str, list[int]]) -> None:
    check_same_settings(saved["config"], config)
    if saved["layers"] != layers:
        raise PatchsparseError("cannot resume: the checkpoint was made for other layers or another model")


# ---- the loop -----------------------------------------------------------------------------------

def _hard_density(masked: MaskedModel) -> float:
    """Density of the threshold-extracted masks (tile dense where ℓ > 0), counted by weights."""
    kept = 0.0
    for m in masked.masks.values():
        if m.tile_logits is None:
            kept += 0.5 * m.numel
        else:
            dense = (m.tile_logits.detach() > 0).float()
            kept += float((m.tile_numel * (m.sparse_density + (1 - m.sparse_density) * dense)).sum())
    return kept / masked.numel()


def _block_densities(masked: MaskedModel) -> dict[str, float]:
    kept: dict[int, float] = {}
    total: dict[int, int] = {}
    with torch.no_grad():
        for name, m in masked.masks.items():
            b = block_index(name)
            kept[b] = kept.get(b, 0.0) + float(m.soft_kept())
            total[b] = total.get(b, 0) + m.numel
    return {str(b): kept[b] / total[b] for b in sorted(kept)}


def _set_training_mode(model: nn.Module, checkpointing: bool) -> Callable[[], None]:
    """Train mode (HF only checkpoints in training) with non-reentrant activation checkpointing;
    returns the function that restores eval mode."""
    was_training = model.training
    if checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise PatchsparseError(f"{type(model).__name__} does not support activation checkpointing; disable it")
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()

    def restore() -> None:
        if checkpointing:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
        model.train(was_training)
    return restore


def step_window_indices(step: int, train: TrainConfig, n_windows: int) -> list[torch.Tensor]:
    """Window indices of each micro-batch of optimizer step `step` (cycling through the windows)."""
    first = step * train.windows_per_step
    return [(torch.arange(first + j * train.batch_size, first + (j + 1) * train.batch_size) % n_windows)
            for j in range(train.grad_accum)]


def make_optimizer(masked: MaskedModel, config: LearnConfig, parallel: DataParallel = SINGLE,
                   shard: bool = False) -> torch.optim.Optimizer:
    """AdamW over the logits; with `shard` under data parallelism each rank keeps only its share of
    the state (ZeRO-1, `learn.distributed`)."""
    from patchsparse.learn.distributed import make_optimizer as make_parallel_optimizer

    oc = config.optim
    params = masked.parameters()
    tile_params = [m.tile_logits for m in masked.masks.values() if m.tile_logits is not None]
    nm_params = [m.pattern_logits for m in masked.masks.values() if m.pattern_logits is not None]
    groups = [g for g in ({"params": tile_params, "lr_scale": 1.0},
                          {"params": nm_params, "lr_scale": oc.nm_lr_scale}) if g["params"]]
    # The fused (single-kernel) AdamW is several times faster than the per-tensor one on CPU; the
    # logits are fp32 on one device, which it supports.
    fused = params[0].device.type in ("cpu", "cuda") and all(p.dtype == torch.float32 for p in params)
    return make_parallel_optimizer(groups, parallel, shard, lr=oc.lr, betas=oc.betas, eps=oc.eps,
                                   weight_decay=oc.weight_decay, fused=fused)


@torch.no_grad()
def dense_logits(model: nn.Module, masked: MaskedModel, batch: torch.Tensor) -> torch.Tensor:
    """The teacher's logits: the same model with every mask switched off (no second copy of the weights)."""
    mode = masked.sampler.mode
    masked.sampler.mode = OFF
    try:
        return model(input_ids=batch, use_cache=False).logits
    finally:
        masked.sampler.mode = mode


def train_step(model: nn.Module, masked: MaskedModel, optimizer: torch.optim.Optimizer, config: LearnConfig,
               step: int, batches: list[torch.Tensor], parallel: DataParallel = SINGLE) -> dict[str, Any]:
    """One optimizer step over its micro-batches (token ids (B, T) each); returns the step's metrics.

    Under data parallelism `batches` are this rank's slices; the gradients of the LM loss (and of
    the R_w term, identical on every rank) are averaged over the ranks before the sparsity
    regulariser, which depends on the logits only, and before clipping and the update."""
    t0 = time.perf_counter()
    mc, oc, tc = config.mask, config.optim, config.train
    sampler = masked.sampler
    params = masked.parameters()
    sampler.mode = SAMPLE
    sampler.set_step(step, config, masked.weight_norm_total)
    sampler.layer_norms.clear()
    lr = cosine_lr(step, tc.steps, oc.lr, oc.warmup_steps, oc.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    alpha, temperature = config.objective.distill, config.objective.distill_temperature
    lm_total = kd_total = 0.0
    for batch in batches:
        teacher = dense_logits(model, masked, batch) if alpha > 0 else None
        with soft_weights_built_once(model, masked) if tc.cache_soft_weights else contextlib.nullcontext():
            out = model(input_ids=batch, labels=batch, use_cache=False)
            task = out.loss
            if teacher is not None:
                kd = distillation_loss(out.logits, teacher, temperature)
                task = (1.0 - alpha) * out.loss + alpha * kd
                kd_total += float(kd.detach()) / len(batches)
            (task / len(batches)).backward()
        lm_total += float(out.loss.detach()) / len(batches)
    parallel.average_gradients_(params)
    lm_total = parallel.mean(lm_total)
    kd_total = parallel.mean(kd_total) if alpha > 0 else None
    task_total = lm_total if kd_total is None else (1.0 - alpha) * lm_total + alpha * kd_total
    if mc.learns_tiles:
        reg, density = sparsity_regulariser(masked, mc.sparsity, config.objective.density_scope)
        if config.objective.sparse_reg > 0:
            (config.objective.sparse_reg * reg).backward()
        reg_value = float(reg.detach())
    else:
        reg_value, density = 0.0, 0.5
    r_w = weight_magnitude_ratio(masked)
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = (float(torch.nn.utils.clip_grad_norm_(params, oc.grad_clip)) if oc.grad_clip > 0
                 else float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    decay = 1.0 - step / tc.steps
    loss = task_total + config.objective.sparse_reg * reg_value - (
        config.objective.weight_reg * decay * r_w if r_w is not None else 0.0)
    return {"step": step, "lr": lr, "loss": loss, "lm_loss": lm_total, "kd_loss": kd_total, "sparse_reg": reg_value,
            "weight_reg_ratio": r_w, "density": density, "hard_density": _hard_density(masked),
            "tau_nm": sampler.tau_nm, "kappa_nm": sampler.kappa_nm, "tau_tile": sampler.tau_tile,
            "kappa_tile": sampler.kappa_tile, "grad_norm": grad_norm,
            "block_density": _block_densities(masked) if mc.learns_tiles else None,
            "seconds": time.perf_counter() - t0}


def learn_masks(model: nn.Module, train_windows: torch.Tensor, config: LearnConfig, prior: PriorMasks | None,
                out_dir: str | Path | None = None, resume: bool = False,
                on_step_end: Callable[[int, dict[str, Any]], None] | None = None,
                parallel: DataParallel = SINGLE, shard_optimizer: bool = False,
                sparse_weights: dict[str, torch.Tensor] | None = None) -> LearnResult:
    """Attach learnable masks to `model` and train them on `train_windows` (n, seqlen).

    Returns with the masks still attached (use `extract_masks`, then `remove_masks`). With
    `out_dir`, writes run.json, prior.pt, metrics.jsonl (one line per step) and checkpoint.pt;
    with `resume`, continues the run found there (its saved prior replaces `prior`).

    `parallel` (from `distributed.from_environment()` under torchrun): every rank calls this with
    the same windows and takes its slice of each micro-batch; rank 0 alone writes files.
    `shard_optimizer`: each rank keeps only its share of AdamW's state (ZeRO-1); checkpoints hold
    the whole state, gathered on rank 0, so a run resumes with any number of processes.
    `sparse_weights`: the weights the 2:4 part of every mask keeps (`attach_masks`); not saved in
    checkpoints, so a resumed run must be given the same ones.
    """
    config.check()
    tc = config.train
    if train_windows.dim() != 2 or train_windows.shape[1] != tc.seqlen or train_windows.shape[0] < 1:
        raise PatchsparseError(f"training windows must be (n, {tc.seqlen}), got {tuple(train_windows.shape)}")
    out = Path(out_dir) if out_dir is not None else None
    checkpoint = None
    if resume:
        if out is None:
            raise PatchsparseError("resuming needs the run's output directory")
        if (out / CHECKPOINT_FILE).is_file():
            checkpoint = load_run_file(out / CHECKPOINT_FILE)
            if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT_VERSION:
                raise PatchsparseError(f"{out / CHECKPOINT_FILE}: unknown checkpoint format")
        if (out / PRIOR_FILE).is_file():
            prior = load_prior(out / PRIOR_FILE)
    if checkpoint is not None:
        missing = {"config", "layers", "step", "masks", "optimizer", "rng"} - set(checkpoint)
        if missing or not isinstance(checkpoint["config"], dict) or not isinstance(checkpoint["layers"], dict):
            raise _bad_run_file(out / CHECKPOINT_FILE, "checkpoint")
        _check_same_run(checkpoint, config, checkpoint["layers"])  # settings first: nothing touched yet

    masked = attach_masks(model, config, prior, sparse_weights)
    layers = {name: list(m.shape) for name, m in masked.masks.items()}
    device = masked.parameters()[0].device
    optimizer = make_optimizer(masked, config, parallel, shard_optimizer)
    start = 0
    if checkpoint is not None:
        _check_same_run(checkpoint, config, layers)
        try:
            with torch.no_grad():
                for name, m in masked.masks.items():
                    for key, value in checkpoint["masks"][name].items():
                        if not torch.isfinite(value).all():
                            raise ValueError(f"non-finite values in {name}.{key}")
                        getattr(m, key).copy_(value)
            # the whole state; a sharded optimizer keeps its own share of it
            optimizer.load_state_dict(checkpoint["optimizer"])
            _set_rng_state(checkpoint["rng"])
            start = int(checkpoint["step"])
            if not 0 <= start <= tc.steps:
                raise ValueError(f"step {start} outside 0..{tc.steps}")
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError):
            remove_masks(model)
            raise _bad_run_file(out / CHECKPOINT_FILE, "checkpoint") from None
        log(f"resuming at step {start} of {tc.steps} from {out / CHECKPOINT_FILE}")
    writes = out is not None and parallel.is_main
    if writes:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / RUN_FILE, json.dumps({"config": config.to_dict(), "layers": layers}, indent=2) + "\n")
        if prior is not None and not (out / PRIOR_FILE).is_file():
            save_prior(prior, out / PRIOR_FILE)
        _truncate_metrics(out / METRICS_FILE, start)

    def save_checkpoint(steps_done: int) -> None:
        optimizer_state = optimizer_state_for_checkpoint(optimizer, parallel)  # collective when sharded
        if not writes:
            return
        state = {"format": FORMAT_VERSION, "config": config.to_dict(), "layers": layers, "step": steps_done,
                 "masks": {name: {k: v.detach().cpu() for k, v in m.named_parameters()} for name, m in masked.masks.items()},
                 "optimizer": optimizer_state, "rng": _rng_state()}
        atomic_torch_save(state, out / CHECKPOINT_FILE)

    mc = config.mask
    n_windows = train_windows.shape[0]
    restore = _set_training_mode(model, tc.activation_checkpointing)
    bar = progress(total=tc.steps, desc=f"learn {mc.mode}", unit="step", disable=not parallel.is_main)
    bar.update(start)
    began = time.perf_counter()
    metrics: dict[str, Any] = {}
    try:
        for step in range(start, tc.steps):
            batches = [parallel.slice(train_windows[index]).to(device)
                       for index in step_window_indices(step, tc, n_windows)]
            metrics = train_step(model, masked, optimizer, config, step, batches, parallel)
            if writes:
                with open(out / METRICS_FILE, "a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
            bar.update(1)
            tau = metrics["tau_tile"] if mc.learns_tiles else metrics["tau_nm"]
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", density=f"{metrics['density']:.4f}", tau=f"{tau:.3f}")
            steps_done = step + 1
            if out is not None and tc.checkpoint_every and (steps_done % tc.checkpoint_every == 0 or steps_done == tc.steps):
                save_checkpoint(steps_done)
            if on_step_end is not None:
                on_step_end(step, metrics)
    finally:
        bar.close()
        restore()
        masked.sampler.mode = HARD
        masked.sampler.weight_reg_grad = 0.0
        masked.sampler.layer_norms.clear()
    return LearnResult(masked=masked, config=config, steps_run=tc.steps - start,
                       resumed_from=start if checkpoint is not None else None,
                       seconds=time.perf_counter() - began, last_metrics=metrics, out_dir=out)


def _truncate_metrics(path: Path, start: int) -> None:
    """Keep the metric lines of the steps before `start` (a resumed run rewrites the rest)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] < start]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
