"""Cost of one mask-learning step against a plain dense fine-tuning step.

    PYTHONPATH=src python benchmarks/mask_step.py [--model smollm2-135m] [--seqlen 256] [--steps 3]
        [--modes patch-tile patch-joint maskllm] [--no-activation-checkpointing] [--threads 2] [--profile ROWS]

Reference: all decoder linear weights trainable, no mask, AdamW, gradient clipping, the same batch
(1 × seqlen), the same activation-checkpointing setting. Each configuration runs in its own fresh
process (so peak memories do not mix): one warm-up step, then `--steps` timed steps (median).

Memory is the peak resident set size (RSS, sampled every 2 ms from /proc/self/statm by a thread)
during the steps, minus the RSS after the model was loaded: it counts gradients, optimizer
states, mask logits and activations, not the frozen model. On CUDA it is the peak of
torch.cuda.max_memory_allocated minus the allocation after loading. The reference runs first and
last; its figures are the mean of the two, which tames drift on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure(kind: str, args: argparse.Namespace) -> dict:
    """Runs in a child process: one configuration, warm-up + timed steps."""
    import torch

    torch.set_num_threads(args.threads)
    from patchsparse.data import load_corpus, tokenize_texts
    from patchsparse.data.windows import shuffled_blocks
    from patchsparse.learn import learn_masks  # noqa: F401  (import cost outside the timing)
    from patchsparse.learn.masked import attach_masks
    from patchsparse.learn.presets import preset_config
    from patchsparse.learn.priors import magnitude_prior
    from patchsparse.learn.trainer import _set_training_mode, make_optimizer, train_step
    from patchsparse.models import load_model, select_linears

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    model = loaded.model
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    ids = tokenize_texts(loaded.tokenizer, load_corpus("default").train)
    windows = shuffled_blocks(ids, args.seqlen, 0)[: args.steps + 2].to(device)
    sparsity = 0.5 if kind == "maskllm" else 0.35
    prior = magnitude_prior(model, sparsity, (128, 128)) if kind != "dense" else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()

    if kind == "dense":
        params = [m.weight for m in select_linears(model).values()]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), fused=True)  # as the mask optimizer

        def step(i: int) -> None:
            batch = windows[i: i + 1]
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        config = preset_config("paper", kind, sparsity)
        train = config.train.__class__(steps=1000, batch_size=1, grad_accum=1, seqlen=args.seqlen,
                                       checkpoint_every=0, activation_checkpointing=args.checkpointing)
        config = config.__class__(config.mask, config.sampling, config.objective, config.optim, train)
        masked = attach_masks(model, config, prior)
        optimizer = make_optimizer(masked, config)

        def step(i: int) -> None:
            train_step(model, masked, optimizer, config, i, [windows[i: i + 1]])

    restore = _set_training_mode(model, args.checkpointing)
    times = []
    with PeakRSS() as peak:
        for i in range(args.steps + 1):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(i)
            if cuda:
                torch.cuda.synchronize()
            if i > 0:  # the first step is a warm-up (allocations, optimizer state)
                times.append(time.perf_counter() - t0)
    profile = None
    if getattr(args, "profile", 0):
        # one more step under the profiler, after the timed ones (the profiler slows what it watches)
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step(args.steps + 1)
        profile = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                            row_limit=args.profile)
    restore()
    memory = (torch.cuda.max_memory_allocated() - base) if cuda else (peak.peak - base)
    return {"kind": kind, "step_seconds": statistics.median(times), "all_seconds": times, "memory_bytes": memory,
            "device": str(device), "model_load_rss_bytes": base if not cuda else None, "profile": profile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["patch-tile", "patch-joint", "maskllm"])
    parser.add_argument("--no-activation-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after the timed steps, profile one more step per configuration and print its "
                             "ROWS most expensive operators (by self time)")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args)), flush=True)
        return

    from patchsparse.records import git_commit, machine_summary

    import torch

    from patchsparse.kernels.bench import machine_lines

    print(f"machine: {json.dumps(machine_summary())}")
    print("\n".join(machine_lines(torch.device(args.device))))          # commit, CPU, instruction set, load
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "json")}
    print(f"settings: {json.dumps(settings)}")
    results: dict[str, list[dict]] = {}
    order = ["dense", *args.modes, "dense"]
    for kind in order:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--model", args.model, "--dtype", args.dtype,
               "--device", args.device, "--seqlen", str(args.seqlen), "--steps", str(args.steps),
               "--threads", str(args.threads), "--profile", str(args.profile)] + (
                   [] if args.checkpointing else ["--no-activation-checkpointing"])
        env = {**os.environ, "PATCHSPARSE_NO_PROGRESS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        results.setdefault(kind, []).append(result)
        print(f"  {kind:12s} step {result['step_seconds']:.2f} s (all {', '.join(f'{t:.2f}' for t in result['all_seconds'])}), "
              f"memory {result['memory_bytes'] / 2**20:.0f} MiB", flush=True)
        if result.get("profile"):
            print(result["profile"], flush=True)
    ref_time = statistics.mean(r["step_seconds"] for r in results["dense"])
    ref_mem = statistics.mean(r["memory_bytes"] for r in results["dense"])
    print(f"\nreference (dense fine-tuning step): {ref_time:.2f} s, {ref_mem / 2**20:.0f} MiB "
          f"({'peak RSS above the loaded model' if args.device == 'cpu' else 'peak CUDA allocation above the loaded model'})")
    print(f"{'mode':12s} {'time':>8s} {'x ref':>7s} {'memory':>10s} {'x ref':>7s}")
    table = {}
    for kind in args.modes:
        r = results[kind][0]
        table[kind] = {"step_seconds": r["step_seconds"], "time_ratio": r["step_seconds"] / ref_time,
                       "memory_bytes": r["memory_bytes"], "memory_ratio": r["memory_bytes"] / ref_mem}
        print(f"{kind:12s} {r['step_seconds']:7.2f}s {table[kind]['time_ratio']:6.2f}x "
              f"{r['memory_bytes'] / 2**20:8.0f}MiB {table[kind]['memory_ratio']:6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_summary(), "commit": git_commit(), "settings": settings,
                       "reference": {"step_seconds": ref_time, "memory_bytes": ref_mem, "runs": results["dense"]},
                       "modes": table}, f, indent=2)


if __name__ == "__main__":
    main()
