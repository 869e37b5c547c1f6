"""`patchsparse generate`: generate text with the sparse model (hybrid layers) and measure its speed.

The masks come from `--masks DIR` (a mask directory, with SparseGPT's updated weights if it has
them) or from an exported checkpoint given as `--model` (it carries its masks). `--compare-dense`
also runs the masked model with ordinary dense layers: the same arithmetic as the dense model
(a dense GEMM costs the same with zeros in it), so it is both the speed baseline and the output
that greedy decoding with the hybrid layers must reproduce.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from patchsparse.cli.common import add_json_arg, add_model_args, positive_int, settings_of
from patchsparse.errors import PatchsparseError
from patchsparse.kernels.linear import BACKENDS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate text with the sparse model (hybrid dense / 2:4 layers) and report tokens/s")
    add_model_args(parser)
    parser.add_argument("--masks", type=Path, default=None, metavar="DIR",
                        help="mask directory; not needed when --model is a checkpoint written by `export`")
    parser.add_argument("--prompt", default=None, help="the prompt text")
    parser.add_argument("--prompt-file", type=Path, default=None, metavar="PATH",
                        help="read the prompt from a file ('-': standard input); without --prompt or "
                             "--prompt-file the prompt is read from standard input")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="(default: 64)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="always generate --max-new-tokens tokens (for speed measurements)")
    parser.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto",
                        help="wrap the prompt in the model's chat template (auto: when it has one)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --sample (default: 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --sample: nucleus mass (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="with --sample: keep the k likeliest tokens (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend (default: auto)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads on CPU (default: torch's)")
    parser.add_argument("--compare-dense", action="store_true",
                        help="also run the masked model with dense layers: speed ratio and whether greedy "
                             "outputs are identical")
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="with --compare-dense: timed rounds, interleaved, median reported (default: 1)")
    add_json_arg(parser)
    parser.set_defaults(handler=run_generate)


def check_sampling(args: argparse.Namespace) -> None:
    if args.temperature <= 0:
        raise PatchsparseError(f"--temperature must be positive, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise PatchsparseError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise PatchsparseError(f"--top-k must be 0 or positive, got {args.top_k}")


def read_prompt(prompt: str | None, prompt_file: Path | None, stdin=None) -> str:
    """The prompt from --prompt, --prompt-file (or '-'), or piped standard input; never empty."""
    stdin = stdin or sys.stdin
    if prompt is not None and prompt_file is not None:
        raise PatchsparseError("give either --prompt or --prompt-file, not both")
    if prompt is None and prompt_file is not None and str(prompt_file) != "-":
        if not prompt_file.is_file():
            raise PatchsparseError(f"prompt file {prompt_file} does not exist")
        try:
            prompt = prompt_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise PatchsparseError(f"cannot read prompt file {prompt_file}: {exc}") from None
    elif prompt is None:
        if prompt_file is None and stdin.isatty():
            raise PatchsparseError("no prompt: give --prompt TEXT, --prompt-file PATH, or pipe it on standard input")
        prompt = stdin.read()
    if not prompt.strip():
        raise PatchsparseError("the prompt is empty")
    return prompt


def encode_prompt(tokenizer, prompt: str, chat_template: str) -> torch.Tensor:
    """Token ids (1, T) of the prompt, wrapped in the chat template when asked or available."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template == "on" and not has_template:
        raise PatchsparseError("--chat-template on: this model's tokenizer has no chat template")
    if chat_template != "off" and has_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def generate_kwargs(args: argparse.Namespace, tokenizer) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(max_new_tokens=args.max_new_tokens, pad_token_id=pad, do_sample=args.sample)
    if args.ignore_eos:
        kwargs["min_new_tokens"] = args.max_new_tokens
    if args.sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    else:  # greedy: silence the model's own sampling defaults (generation_config) for a clean run
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def timing_line(label: str, timing) -> str:
    rate = timing.decode_tokens_per_s
    decode = f"decode {rate:.1f} tokens/s" if rate is not None else "decode n/a (one token)"
    return (f"{label}: {timing.new_tokens} new tokens, prefill {timing.prefill_seconds * 1e3:.0f} ms "
            f"(prompt + first token), {decode}")


def run_generate(args: argparse.Namespace) -> int:
    from patchsparse.inference import kernel_paths, load_masked, timed_generate
    from patchsparse.kernels.linear import convert_model
    from patchsparse.records import make_record, write_record

    check_sampling(args)
    prompt = read_prompt(args.prompt, args.prompt_file)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = load_masked(args.model, args.masks, dtype=args.dtype, device=args.device)
    if loaded.tokenizer is None:
        raise PatchsparseError(f"model '{args.model}' comes without a tokenizer")
    dense = copy.deepcopy(loaded.model) if args.compare_dense else None
    convert_model(loaded.model, loaded.spec, backend=args.backend)   # packed once, here
    hybrid = loaded.model
    device = next(hybrid.parameters()).device
    ids = encode_prompt(loaded.tokenizer, prompt, args.chat_template).to(device)
    kwargs = generate_kwargs(args, loaded.tokenizer)
    variants = {"hybrid": hybrid} if dense is None else {"hybrid": hybrid, "dense": dense}

    name = loaded.identity.get("name", args.model)
    source = "exported checkpoint" if loaded.exported else f"masks {loaded.mask_dir}"
    paths = ", ".join(f"{n} {p}" for p, n in kernel_paths(hybrid).items())
    print(f"{name} with {source}: sparsity {loaded.spec.sparsity():.2%}, {len(loaded.spec.layers)} hybrid "
          f"layers ({paths}), {str(next(hybrid.parameters()).dtype).removeprefix('torch.')} on {device}, "
          f"prompt {ids.shape[1]} tokens", file=sys.stderr)
    if dense is not None:  # warm-up: kernel loading and first allocations stay out of the comparison
        for model in variants.values():
            timed_generate(model, ids, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                           pad_token_id=kwargs["pad_token_id"])
    outputs, timings = {}, {k: [] for k in variants}
    for _ in range(args.rounds if dense is not None else 1):
        for label, model in variants.items():
            torch.manual_seed(args.seed)
            out, timing = timed_generate(model, ids, **kwargs)
            outputs.setdefault(label, out)
            timings[label].append(timing)

    new_ids = outputs["hybrid"][0, ids.shape[1]:]
    print(loaded.tokenizer.decode(new_ids, skip_special_tokens=True))
    print()
    print(timing_line("hybrid", timings["hybrid"][0]) if dense is None else
          timing_line(f"hybrid (median of {args.rounds})", _median_timing(timings["hybrid"])))
    figures: dict = {"sparsity": loaded.spec.sparsity(), "prompt_tokens": ids.shape[1], "kernel_paths":
                     kernel_paths(hybrid), "hybrid": [t.as_dict() for t in timings["hybrid"]]}
    if dense is not None:
        h, d = _median_timing(timings["hybrid"]), _median_timing(timings["dense"])
        print(timing_line(f"dense  (median of {args.rounds})", d))
        ratio = (h.decode_tokens_per_s / d.decode_tokens_per_s
                 if h.decode_tokens_per_s and d.decode_tokens_per_s else None)
        prefill_ratio = d.prefill_seconds / h.prefill_seconds
        print(f"speed vs dense: decode {f'{ratio:.2f}x' if ratio else 'n/a'}, prefill {prefill_ratio:.2f}x")
        same = None
        if args.sample:
            print("outputs not compared: sampling (compare with greedy decoding)")
        else:
            same = outputs["hybrid"].tolist() == outputs["dense"].tolist()
            print("greedy output identical to the masked dense model's: " + ("yes" if same else "NO"))
        figures.update(dense=[t.as_dict() for t in timings["dense"]], decode_speedup=ratio,
                       prefill_speedup=prefill_ratio, identical_to_masked_dense=same)
    if args.json:
        write_record(args.json, make_record("generate", settings_of(args) | {"prompt": prompt},
                                            loaded.identity, figures))
    return 0


def _median_timing(series: list):
    """The round with the (lower) median decode speed: its prefill and decode figures stay together."""
    ranked = sorted(series, key=lambda t: t.decode_tokens_per_s or 0.0)
    return ranked[(len(ranked) - 1) // 2]
