"""Where a hybrid layer's GPU time goes: the bare 2:4 GEMMs against our wrappers (about 90 s on an H200).

    python benchmarks/gpu_probe.py [--out FILE.json]

For bf16 LLaMA-2-7B shapes and 1…2048 tokens, seconds per call (loops of calls between two
synchronisations, so launch overhead counts as it does in a model) of:
dense `F.linear`; torch's `to_sparse_semi_structured` weight under `F.linear`; the bare
`torch._cslt_sparse_mm` (default algorithm, and the one `_cslt_sparse_mm_search` picks); our
`TwoFourOperand`; `HybridLinear` with the split, stripe and triton backends at 45% and pure 2:4;
and the host time of one call of each (CPU-bound when it is close to the per-call time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchsparse.kernels import HybridLinear, synthetic_layer_mask
from patchsparse.kernels.split import TwoFourOperand
from patchsparse.masks import nm_mask_from_scores

SHAPES = [(4096, 4096), (11008, 4096)]
TOKENS = [1, 16, 512, 2048]


def per_call(fn, n: int = 50) -> dict:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n          # launches queued, not waited for
    torch.cuda.synchronize()
    total = (time.perf_counter() - start) / n
    return {"seconds": total, "host_seconds": host}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_probe: error: no CUDA device", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    for out_f, in_f in SHAPES:
        torch.manual_seed(0)
        linear = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype).requires_grad_(False)
        keep = nm_mask_from_scores(linear.weight.abs().float(), 2, 4)
        w24 = (linear.weight * keep).contiguous()
        compressed = torch._cslt_compress(w24)
        semi = torch.sparse.to_sparse_semi_structured(w24)
        operand = TwoFourOperand.from_masked(linear.weight, keep)
        layers = {}
        for sparsity in (0.45, 0.5):
            for backend in ("split", "stripe", "triton"):
                tile = (128, in_f) if backend == "stripe" else (128, 128)
                try:
                    mask = synthetic_layer_mask(linear.weight, sparsity, tile) if sparsity < 0.5 else None
                    if mask is None:
                        from patchsparse.masks import LayerMask
                        mask = LayerMask(sparse_keep=keep.cpu(), pattern="2:4")
                    layers[f"{'2:4' if sparsity == 0.5 else '45%'} {backend}"] = HybridLinear.from_dense(
                        linear, mask, backend=backend)
                except Exception as exc:  # noqa: BLE001 - a finding
                    rows.append({"shape": [out_f, in_f], "layer": backend, "error": str(exc)[:200]})
        for tokens in TOKENS:
            x = torch.randn(tokens, in_f, device=device, dtype=dtype)
            xp = F.pad(x, (0, 0, 0, -tokens % 8))
            fns = {"dense F.linear": lambda: F.linear(x, linear.weight),
                   "torch semi-structured F.linear": lambda: F.linear(xp, semi),
                   "bare _cslt_sparse_mm": lambda: torch._cslt_sparse_mm(compressed, xp.t(), transpose_result=True),
                   "TwoFourOperand": lambda: operand(x)}
            try:
                alg = torch._cslt_sparse_mm_search(compressed, xp.t(), transpose_result=True)
                fns[f"_cslt_sparse_mm alg {alg}"] = lambda: torch._cslt_sparse_mm(
                    compressed, xp.t(), transpose_result=True, alg_id=alg)
            except Exception as exc:  # noqa: BLE001
                rows.append({"shape": [out_f, in_f], "tokens": tokens, "error": f"search: {str(exc)[:200]}"})
            with torch.no_grad():
                for name, layer in layers.items():
                    fns[name] = (lambda layer=layer: layer(x))
                for name, fn in fns.items():
                    try:
                        rows.append({"shape": [out_f, in_f], "tokens": tokens, "what": name, **per_call(fn)})
                    except Exception as exc:  # noqa: BLE001
                        rows.append({"shape": [out_f, in_f], "tokens": tokens, "what": name,
                                     "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            dense = next(r["seconds"] for r in rows if r.get("what") == "dense F.linear" and r["tokens"] == tokens
                         and r["shape"] == [out_f, in_f])
            for r in rows:
                if r.get("tokens") == tokens and r["shape"] == [out_f, in_f] and "seconds" in r:
                    r["speedup"] = dense / r["seconds"]
                    print(f"{out_f}x{in_f} {tokens:5d} tok  {r['what']:<32} {r['seconds'] * 1e6:9.1f} us "
                          f"(host {r['host_seconds'] * 1e6:7.1f} us)  {r['speedup']:.2f}x", flush=True)
    for r in rows:
        if "error" in r:
            print("error:", r, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
