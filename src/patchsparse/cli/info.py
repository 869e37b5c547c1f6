"""`patchsparse info`: architecture, every linear layer with its shape, parameter counts by kind."""

from __future__ import annotations

import argparse
from collections import Counter

import torch.nn as nn

from patchsparse.cli.common import add_json_arg, add_model_args, settings_of
from patchsparse.models import load_model, select_linears
from patchsparse.records import make_record, write_record


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="show a model's architecture and linear layers")
    add_model_args(parser)
    add_json_arg(parser)
    parser.set_defaults(handler=run_info)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters by kind; tied weights are counted once."""
    decoder = {id(m.weight) for m in select_linears(model).values()}
    counts: Counter[str] = Counter()
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if id(param) in decoder:
                kind = "decoder_linear"
            elif isinstance(module, nn.Embedding):
                kind = "embedding"
            elif isinstance(module, nn.Linear):
                kind = "other_linear"  # e.g. an untied lm_head
            elif "norm" in type(module).__name__.lower():
                kind = "norm"
            else:
                kind = "other"
            counts[kind] += param.numel()
    counts["total"] = sum(counts.values())
    return dict(counts)


def run_info(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    model = loaded.model
    config = model.config
    print(f"model: {loaded.identity.get('name', args.model)} ({loaded.identity['architecture']})")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        if hasattr(config, key):
            print(f"  {key}: {getattr(config, key)}")
    linears = {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    decoder = set(select_linears(model))
    print(f"linear layers ({len(linears)}; {len(decoder)} maskable decoder linears), weight shape (out, in):")
    for name, shape in linears.items():
        print(f"  {name:50s} {shape[0]:>6} x {shape[1]:<6}{'' if name in decoder else '  (not maskable)'}")
    counts = parameter_counts(model)
    print("parameters:")
    for kind, n in counts.items():
        print(f"  {kind:16s} {n:>14,}")
    if args.json:
        write_record(args.json, make_record("info", settings_of(args), loaded.identity,
                                            {"parameters": counts, "linears": {k: list(v) for k, v in linears.items()}}))
    return 0
