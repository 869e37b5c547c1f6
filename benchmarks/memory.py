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
import subprocess
import sys
from pathlib import Path

import torch

from patchsparse.learn.memory import (GIB, MODES, PRECISIONS, ActivationEstimate, ModelShape,
                                      model_shape_of, plan_memory, state_bytes)

ROOT = Path(__file__).resolve().parents[1]

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


# ---- part 3: measurements on the default model -----------------------------------------------------

def attached_state(mode: str) -> dict:
    """Bytes of the tensors mask learning adds to the default model: logits, their gradients, AdamW's
    state after one update, and buffers (the frozen 2:4 mask). Run in a fresh process."""
    from patchsparse.learn.masked import attach_masks
    from patchsparse.learn.presets import cpu_preset
    from patchsparse.learn.priors import magnitude_prior
    from patchsparse.learn.trainer import make_optimizer
    from patchsparse.models import load_model
    from patchsparse.models.layers import block_index

    model = load_model("smollm2-135m", device="cpu").model
    config = cpu_preset(mode, 0.5 if mode == "maskllm" else 0.35)
    prior = magnitude_prior(model, config.mask.sparsity, config.mask.tile, config.mask.selection)
    masked = attach_masks(model, config, prior)
    optimizer = make_optimizer(masked, config)
    for p in masked.parameters():  # one update materialises AdamW's moments
        p.grad = torch.zeros_like(p)
    optimizer.step()
    masks = masked.masks
    blocks: dict[int, int] = {}
    for name, m in masks.items():
        blocks[block_index(name)] = blocks.get(block_index(name), 0) + m.numel
    shapes = [m.shape for m in masks.values()]
    return {"mode": mode, "masked_weights": sum(o * i for o, i in shapes),
            "param_bytes": sum(p.numel() * p.element_size() for p in masked.parameters()),
            "optim_bytes": sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                               if torch.is_tensor(t) and t.dim() > 0),
            "buffer_bytes": sum(b.numel() * b.element_size() for m in masks.values() for b in m.buffers()),
            "expected_state_bytes": state_bytes(shapes, mode, config.mask.tile, PRECISIONS["fp32"]).total,
            "largest_block_weights": max(blocks.values())}


def measured_table(args: argparse.Namespace) -> None:
    """State tensors counted here; the peak memory of a step comes from benchmarks/mask_step.py."""
    print(f"\n## 3. measured on the default model (fp32 on CPU; step memory by benchmarks/mask_step.py, "
          f"batch 1 x {args.seqlen}, activation checkpointing on)")
    step_json = Path(args.step_json) if args.step_json else None
    if step_json is None or not step_json.is_file():
        step_json = Path(os.environ.get("TMPDIR", "/tmp")) / f"mask_step_{os.getpid()}.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "mask_step.py"), "--seqlen", str(args.seqlen),
               "--steps", "1", "--json", str(step_json)]
        print(f"running: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PATCHSPARSE_NO_PROGRESS": "1"})
    steps = json.loads(step_json.read_text())
    print(f"{'mode':12s} {'state B/weight':>14s} {'arithmetic':>10s} {'step memory':>12s} {'B/weight':>9s} "
          f"{'minus state':>11s} {'per block weight':>16s}")
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True,
                             env={**os.environ, "PATCHSPARSE_NO_PROGRESS": "1"})
        if out.returncode != 0:
            print(f"{mode:12s} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        w = r["masked_weights"]
        state = 2 * r["param_bytes"] + r["optim_bytes"] + r["buffer_bytes"]  # logits + grads + Adam + buffers
        step = steps["modes"].get(mode, {}).get("memory_bytes")
        rest = "" if step is None else (f"{step / 2**20:9.0f} MiB {step / w:9.2f} {(step - state) / w:11.2f} "
                                        f"{(step - state) / r['largest_block_weights']:16.1f}")
        print(f"{mode:12s} {state / w:14.4f} {r['expected_state_bytes'] / w:10.4f} {rest}")
        if args.json_out:
            with open(args.json_out, "a", encoding="utf-8") as f:
                f.write(json.dumps({**r, "step_memory_bytes": step}) + "\n")
    ref = steps.get("reference", {})
    if ref:
        print(f"dense fine-tuning step for comparison: {ref['memory_bytes'] / 2**20:.0f} MiB")


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
    parser.add_argument("--measure", action="store_true",
                        help="also run part 3: state tensors of masks attached to the default model, and the "
                             "step memory measured by benchmarks/mask_step.py (minutes on a CPU)")
    parser.add_argument("--measure-seqlen", type=int, default=256)
    parser.add_argument("--step-json", default=None, help="reuse the --json output of a benchmarks/mask_step.py run")
    parser.add_argument("--json-out", default=None, help="append the raw measurements (JSON lines) here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(attached_state(args.child)))
        return
    header(args)
    per_weight_table(meta_shape("llama-2-7b"), tuple(args.tile))
    capacity_table(args)
    if args.measure:
        args.seqlen = args.measure_seqlen
        measured_table(args)


if __name__ == "__main__":
    main()
