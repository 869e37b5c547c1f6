"""Memory of mask learning: training state per masked weight, and capacity plans for 7B / 70B.

    python benchmarks/memory.py                 # arithmetic only (seconds)
    python benchmarks/memory.py --measure       # + tensors of attached masks and peak memory of one
                                                #   step per mode on the default model (minutes on CPU)

Part 1 counts bytes per masked weight for each mode and state precision from the shapes of real
models (LLaMA-2 7B / 70B are built on the meta device: no weights are loaded).
Part 2 is the capacity plan: bytes per GPU of one step for the scenarios in docs/SCALE.md.
Part 3 (--measure) checks part 1 against the tensors of masks attached to the default model,
and measures the peak memory of one training step per mode (batch 1 × seq 256) in a fresh
process each; on CPU that is the process's peak resident set, on CUDA the allocator's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from patchsparse.learn.memory import (GIB, MODES, PRECISIONS, ActivationEstimate, ModelShape,  # noqa: E402
                                      model_shape_of, plan_memory, state_bytes)

GPU_80GB = 79.6 * GIB  # what an "80 GB" H100/A100 offers to PyTorch (81,559 MiB), before the CUDA context

# Public configurations (config.json of each model); the architecture is all the plan needs.
LLAMA_CONFIGS = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
}


def meta_shape(name: str) -> ModelShape:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIGS[name]))
    return model_shape_of(model, name)


def header(args: argparse.Namespace) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, torch {torch.__version__}"
          + (f", cuda {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"))
    print(f"commit: {commit or 'unknown'}")
    print(f"settings: {vars(args)}")


def per_weight_table(shape: ModelShape, tile: tuple[int, int]) -> None:
    print(f"\n## 1. training state per masked weight ({shape.name}, {shape.masked_weights:,} masked weights, "
          f"tile {tile[0]}x{tile[1]})")
    print(f"{'mode':12s} {'precision':13s} {'logits/weight':>13s} {'B/weight':>9s} {'of which host':>13s}  pieces (B/weight)")
    for mode in MODES:
        for precision in PRECISIONS.values():
            s = state_bytes(shape.linears.values(), mode, tile, precision)
            host = sum(v for k, v in s.pieces.items() if k in precision.host) / s.masked_weights
            pieces = " ".join(f"{k}={v / s.masked_weights:.4g}" for k, v in s.pieces.items() if v)
            print(f"{mode:12s} {precision.name:13s} {s.logits / s.masked_weights:13.5f} {s.per_weight:9.4f} "
                  f"{host:13.4f}  {pieces}")


# The scenarios of docs/SCALE.md: (model, mode, precision, sharding, ranks, frozen-mask storage, note)
SCENARIOS = [
    ("llama-2-7b", "patch-tile", "fp32", "none", 1, "bool", "7B patch-tile, one GPU"),
    ("llama-2-7b", "patch-tile", "fp32", "none", 1, "index", "  ... 2:4 mask as a pattern index"),
    ("llama-2-7b", "patch-joint", "bf16", "none", 1, "bool", "7B joint, published state (bf16)"),
    ("llama-2-7b", "patch-joint", "fp32", "none", 1, "bool", "7B joint, fp32 state"),
    ("llama-2-7b", "patch-joint", "bf16-offload", "none", 1, "bool", "7B joint, fp32 master+Adam on host"),
    ("llama-2-7b", "patch-joint", "bf16-8bit", "none", 1, "bool", "7B joint, bf16 + 8-bit Adam"),
    ("llama-2-7b", "patch-joint", "bf16-host", "none", 1, "bool", "7B joint, grads+master+Adam on host"),
    ("llama-2-7b", "maskllm", "bf16-offload", "none", 1, "bool", "7B maskllm, fp32 master+Adam on host"),
    ("llama-2-7b", "patch-joint", "fp32", "zero2", 8, "bool", "7B joint, 8 GPUs, ZeRO-2"),
    ("llama-2-7b", "patch-joint", "fp32", "fsdp", 8, "bool", "7B joint, 8 GPUs, FSDP"),
    ("llama-3.1-8b", "patch-tile", "fp32", "none", 1, "bool", "8B patch-tile, one GPU"),
    ("llama-3.1-8b", "patch-joint", "bf16-offload", "none", 1, "bool", "8B joint, fp32 master+Adam on host"),
    ("llama-2-70b", "patch-tile", "fp32", "fsdp", 8, "bool", "70B patch-tile, 8 GPUs, FSDP"),
    ("llama-2-70b", "patch-joint", "fp32", "fsdp", 8, "bool", "70B joint, 8 GPUs, FSDP, fp32"),
    ("llama-2-70b", "patch-joint", "bf16-offload", "fsdp", 8, "bool", "70B joint, 8 GPUs, FSDP + host Adam"),
    ("llama-2-70b", "patch-joint", "bf16-host", "fsdp", 8, "bool", "70B joint, 8 GPUs, FSDP + host grad+Adam"),
    ("llama-2-70b", "patch-joint", "bf16-offload", "fsdp", 16, "bool", "70B joint, 16 GPUs, FSDP + host Adam"),
    ("llama-2-70b", "patch-joint", "fp32", "fsdp", 32, "bool", "70B joint, 32 GPUs, FSDP, fp32"),
]


def capacity_table(args: argparse.Namespace) -> None:
    print(f"\n## 2. capacity plan: GiB per GPU of one step (micro-batch {args.batch} x {args.seqlen}, bf16 weights, "
          f"every block checkpointed; mask work {args.mask_work_joint:g} B/weight (2:4 logits) or "
          f"{args.mask_work_tile:g} B/weight (tile only) of the {args.mask_scope} being recomputed)")
    shapes = {name: meta_shape(name) for name in LLAMA_CONFIGS}
    print(f"{'scenario':40s} {'weights':>7s} {'2:4 mask':>8s} {'logits':>7s} {'grads':>6s} {'master':>6s} "
          f"{'optim':>6s} {'act':>5s} {'total':>6s} {'host/rank':>9s}  80 GB?")
    for model, mode, precision, sharding, ranks, frozen, note in SCENARIOS:
        shape = shapes[model]
        work = args.mask_work_tile if mode == "patch-tile" else args.mask_work_joint
        if args.mask_scope == "linear":
            # Masks rebuilt one linear at a time: scale the block's working set to its largest linear.
            largest_linear = max(o * i for o, i in shape.linears.values())
            work = work * largest_linear / shape.largest_block_weights()
        plan = plan_memory(shape, mode, PRECISIONS[precision], sharding, ranks, frozen_mask=frozen,
                           activations=ActivationEstimate(args.batch, args.seqlen, work))
        d = plan.device
        act = sum(v for k, v in d.items() if k.startswith("act_") or k == "gathered_blocks")
        cells = [d.get("weights", 0), d.get("frozen_mask", 0), d.get("logits", 0), d.get("grads", 0),
                 d.get("master", 0), d.get("optim", 0), act]
        print(f"{note:40s} " + " ".join(f"{c / GIB:{w}.1f}" for c, w in zip(cells, (7, 8, 7, 6, 6, 6, 5)))
              + f" {plan.device_total / GIB:6.1f} {plan.host_total / GIB:9.1f}  {'yes' if plan.fits(GPU_80GB) else 'NO'}")


# ---- part 3: measurements on the default model (needs the mask trainer) ----------------------------

def measure_one(mode: str, seqlen: int, checkpointing: bool) -> dict:
    """One training step of `mode` on the default model; run in a fresh process for a clean peak."""
    from patchsparse.learn.memory import state_bytes as _state
    from patchsparse.learn.presets import cpu_preset
    from patchsparse.learn.trainer import make_optimizer, train_step
    from patchsparse.learn.masked import attach_masks
    from patchsparse.models import load_model, select_linears
    from patchsparse.prior.oneshot import compute_prior
    from patchsparse.data import load_corpus, random_windows, tokenize_texts

    import dataclasses

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cuda = torch.cuda.is_available()
    loaded = load_model("smollm2-135m", dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu")
    model = loaded.model
    config = cpu_preset(mode, 0.45)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, seqlen=seqlen,
                                                                   activation_checkpointing=checkpointing))
    ids = tokenize_texts(loaded.tokenizer, load_corpus("default").train)
    windows = random_windows(ids, 2, seqlen, seed=0)
    prior = None
    if mode == "patch-tile" or True:
        prior = compute_prior(model, windows[:1].to(next(model.parameters()).device), "magnitude", 0.45,
                              config.mask.tile, config.mask.selection)
    shapes = [tuple(m.weight.shape) for m in select_linears(model).values()]
    baseline = _peak_bytes(cuda, reset=True)
    masked = attach_masks(model, config, prior)
    optimizer = make_optimizer(masked, config)
    from patchsparse.learn.trainer import _set_training_mode
    restore = _set_training_mode(model, checkpointing)
    batch = windows[1:2].to(next(model.parameters()).device)
    train_step(model, masked, optimizer, config, 0, [batch])
    restore()
    peak = _peak_bytes(cuda)
    params = sum(p.numel() * p.element_size() for p in masked.parameters())
    buffers = sum(b.numel() * b.element_size() for m in masked.masks.values() for b in m.buffers())
    optim = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    weights = sum(o * i for o, i in shapes)
    expected = _state(shapes, mode, config.mask.tile, PRECISIONS["fp32"])
    return {"mode": mode, "masked_weights": weights, "param_bytes": params, "buffer_bytes": buffers,
            "optim_bytes": optim, "grad_bytes": params, "expected_state_bytes": expected.total,
            "peak_minus_baseline": peak - baseline, "device": "cuda" if cuda else "cpu",
            "largest_block_weights": max(
                sum(o * i for n, (o, i) in zip(select_linears(model), shapes) if f".{b}." in n)
                for b in range(model.config.num_hidden_layers))}


def _peak_bytes(cuda: bool, reset: bool = False) -> int:
    if cuda:
        torch.cuda.synchronize()
        value = torch.cuda.max_memory_allocated()
        if reset:
            torch.cuda.reset_peak_memory_stats()
            value = torch.cuda.memory_allocated()
        return value
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measured_table(args: argparse.Namespace) -> None:
    print(f"\n## 3. measured on the default model (batch 1 x {args.seqlen}, one step, fresh process per mode)")
    print(f"{'mode':12s} {'ckpt':>4s} {'state B/weight':>14s} {'expected':>9s} {'peak step - baseline':>21s} "
          f"{'B/masked weight':>15s}")
    for mode in MODES:
        for checkpointing in (False, True):
            cmd = [sys.executable, __file__, "--child", mode, "--seqlen", str(args.seqlen)]
            if checkpointing:
                cmd.append("--checkpointing")
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PATCHSPARSE_NO_PROGRESS": "1"})
            if out.returncode != 0:
                print(f"{mode:12s} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            w = r["masked_weights"]
            state = r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"] + r["buffer_bytes"]
            print(f"{mode:12s} {'yes' if checkpointing else 'no':>4s} {state / w:14.4f} {r['expected_state_bytes'] / w:9.4f} "
                  f"{r['peak_minus_baseline'] / 2**20:17.0f} MiB {r['peak_minus_baseline'] / w:15.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tile", type=int, nargs=2, default=(128, 128))
    parser.add_argument("--batch", type=int, default=1, help="micro-batch of the capacity plan")
    parser.add_argument("--seqlen", type=int, default=4096, help="sequence length of the capacity plan")
    parser.add_argument("--mask-work-joint", type=float, default=30.0,
                        help="bytes per masked weight of a block's soft 2:4 masks while it is recomputed")
    parser.add_argument("--mask-work-tile", type=float, default=10.0,
                        help="the same for patch-tile (frozen 2:4, tile values only)")
    parser.add_argument("--mask-scope", choices=("block", "linear"), default="block",
                        help="soft masks rebuilt per checkpointed block, or one linear at a time")
    parser.add_argument("--measure", action="store_true", help="also run part 3 (needs the mask trainer)")
    parser.add_argument("--measure-seqlen", type=int, default=256)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_one(args.child, args.seqlen, args.checkpointing)))
        return
    header(args)
    per_weight_table(meta_shape("llama-2-7b"), tuple(args.tile))
    capacity_table(args)
    if args.measure:
        args.seqlen = args.measure_seqlen
        measured_table(args)


if __name__ == "__main__":
    main()
