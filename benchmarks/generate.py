"""End-to-end greedy generation speed: dense model vs hybrid models (25/35/45%) vs pure 2:4.

Every decoder linear of the model is converted with `convert_model` under a synthetic mask
(random dense tiles at the target sparsity + magnitude 2:4; speed does not depend on which tiles
a trained mask keeps). All variants live in memory at once and are timed in interleaved rounds.
Per variant: prefill time (prompt + first token) and decode tokens/s = (N − 1) · batch /
(time for N new tokens − time for 1), the median over rounds; ratios are against the dense model.

    python benchmarks/generate.py                                  # default model, CPU, fp32
    python benchmarks/generate.py --device cuda --dtype bfloat16 --batch 16
    python benchmarks/generate.py --masks runs/my-mask                # a saved (e.g. learned) mask too
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch


from patchsparse.data import load_corpus, tokenize_texts
from patchsparse.inference import kernel_paths
from patchsparse.kernels import convert_model, synthetic_spec
from patchsparse.kernels.bench import PURE_2_4, machine_lines
from patchsparse.kernels.timing import synchronize
from patchsparse.models import load_model, select_linears
from patchsparse.models.builtin import DEFAULT_MODEL
from patchsparse.records import make_record, write_record
from patchsparse.utils import progress


def generate_seconds(model, ids: torch.Tensor, new_tokens: int, pad_id: int) -> float:
    synchronize(ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    synchronize(ids.device)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sparsities", default="0.25,0.35,0.45", help="hybrid targets; pure 2:4 is always added")
    parser.add_argument("--tile", default="128x128")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    parser.add_argument("--masks", type=Path, default=None,
                        help="also time a saved mask directory (e.g. a learned mask) beside the synthetic ones")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    dense = loaded.model
    device = next(dense.parameters()).device
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    tile = tuple(int(v) for v in args.tile.split("x"))
    sparsities = [float(s) for s in args.sparsities.split(",")] + [PURE_2_4]
    corpus = load_corpus("default")
    prompt = tokenize_texts(loaded.tokenizer, corpus.eval[:20])[: args.prompt_tokens]
    ids = prompt[None].repeat(args.batch, 1).to(device)                       # (B, T)
    pad_id = loaded.tokenizer.eos_token_id or 0

    print("\n".join(machine_lines(device)))
    print(f"model: {loaded.identity.get('name', args.model)}, dtype {args.dtype}, batch {args.batch}, "
          f"prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, tile {tile}, rounds {args.rounds} "
          f"(median), backend {args.backend}")
    variants = {"dense": dense}
    if args.masks is not None:
        from patchsparse.io.maskfile import load_mask_spec

        spec = load_mask_spec(args.masks, dense)                                # checked on the dense model
        model = copy.deepcopy(dense)
        convert_model(model, spec, backend=args.backend)
        variants[f"masks {args.masks.name} (s={spec.sparsity():.3f})"] = model
    for sparsity in progress(sparsities, desc="converting"):
        model = copy.deepcopy(dense)
        spec = synthetic_spec(select_linears(model), sparsity, tile)
        if sparsity == PURE_2_4:
            spec.layers = {n: type(m)(m.sparse_keep, "2:4") for n, m in spec.layers.items()}
        convert_model(model, spec, backend=args.backend)
        label = "2:4" if sparsity == PURE_2_4 else f"hybrid {sparsity:.0%}"
        variants[f"{label} (s={spec.sparsity():.3f})"] = model

    prefill: dict[str, list[float]] = {k: [] for k in variants}
    decode: dict[str, list[float]] = {k: [] for k in variants}
    for name, model in variants.items():                                        # warm-up
        generate_seconds(model, ids, 2, pad_id)
    for _ in progress(range(args.rounds), desc="rounds"):
        for name, model in variants.items():
            first = generate_seconds(model, ids, 1, pad_id)
            full = generate_seconds(model, ids, args.new_tokens, pad_id)
            prefill[name].append(first)
            decode[name].append((args.new_tokens - 1) * args.batch / max(full - first, 1e-9))

    base_decode = statistics.median(decode["dense"])
    base_prefill = statistics.median(prefill["dense"])
    print(f"\n{'variant':<28}{'decode tok/s':>14}{'vs dense':>10}{'prefill':>12}{'vs dense':>10}  layers")
    figures = {}
    for name in variants:
        d, p = statistics.median(decode[name]), statistics.median(prefill[name])
        paths = kernel_paths(variants[name])          # auto conversion keeps slower layers dense
        print(f"{name:<28}{d:>14.1f}{d / base_decode:>9.2f}x{p * 1e3:>10.1f}ms{base_prefill / p:>9.2f}x  "
              + ", ".join(f"{n} {path}" for path, n in paths.items()))
        figures[name] = {"decode_tokens_per_s": decode[name], "prefill_seconds": prefill[name],
                         "decode_speedup": d / base_decode, "prefill_speedup": base_prefill / p, "kernel_paths": paths}
    print(f"after: {machine_lines(device)[-1]}")
    if args.json:
        write_record(args.json, make_record("benchmarks/generate.py", vars(args) | {"json": str(args.json)},
                                            loaded.identity, figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
