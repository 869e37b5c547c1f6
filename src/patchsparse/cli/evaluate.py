"""`patchsparse eval`: perplexity on a corpus's evaluation split, or zero-shot tasks (`--tasks`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from patchsparse.cli.common import (add_data_args, add_json_arg, add_model_args, add_placement_args, check_seqlen,
                                    positive_int, settings_of)
from patchsparse.data import load_corpus, sequential_windows, tokenize_texts
from patchsparse.errors import PatchsparseError
from patchsparse.evaluate import PerplexityResult, evaluate_perplexity
from patchsparse.models import LoadedModel, load_model
from patchsparse.records import make_record, write_record


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="perplexity on the evaluation split of a corpus, or zero-shot tasks with --tasks",
        description="Without --tasks: perplexity on the evaluation split of --data. With --tasks: "
                    "lm-evaluation-harness tasks, 0-shot, metric acc (the paper's protocol). "
                    "'paper' = mmlu,piqa,arc_easy,arc_challenge,winogrande,openbookqa,race,hellaswag "
                    "(need the Hugging Face hub); offline, the local tasks patchsparse_mc (which sentence "
                    "really comes next) and patchsparse_ppl (rolling log-likelihood) are built from the "
                    "held-out texts of --data.")
    add_model_args(parser)
    add_placement_args(parser)
    add_data_args(parser)
    parser.add_argument("--max-windows", type=positive_int, default=None,
                        help="perplexity: score at most this many windows (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--tasks", default=None, metavar="LIST",
                        help="comma-separated lm-eval tasks (e.g. patchsparse_mc,patchsparse_ppl, piqa, paper, local)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="zero-shot: score at most this many documents per task (for quick checks)")
    parser.add_argument("--num-fewshot", type=int, default=0, help="zero-shot: examples in context (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="zero-shot: seed of the local task builder and the harness")
    parser.add_argument("--masks", type=Path, default=None, metavar="DIR",
                        help="apply the masks of this mask directory (patchsparse learn/prune output) before evaluating")
    add_json_arg(parser)
    parser.set_defaults(handler=run_eval)


def eval_windows(loaded: LoadedModel, data: str, seqlen: int, max_windows: int | None):
    check_seqlen(seqlen, loaded.max_positions)
    corpus = load_corpus(data)
    ids = tokenize_texts(loaded.tokenizer, corpus.eval)
    return corpus, sequential_windows(ids, seqlen, max_windows)


def perplexity_line(label: str, result: PerplexityResult, seconds: float) -> str:
    return (f"{label}: perplexity {result.perplexity:.4f} over {result.tokens_scored:,} tokens "
            f"({result.windows} windows of {result.seqlen}) in {seconds:.1f} s")


def load_for_eval(args: argparse.Namespace) -> tuple[LoadedModel, dict[str, Any] | None]:
    """The model to evaluate, with `--masks` applied; -> (model, what was applied)."""
    loaded = load_model(args.model, dtype=args.dtype, device=args.device,
                        device_map=args.device_map, offload_dir=args.offload_dir)
    if args.masks is None:
        return loaded, None
    return loaded, apply_masks_for_eval(loaded, args.masks)


def apply_masks_for_eval(loaded: LoadedModel, directory: Path) -> dict[str, Any]:
    """Check a mask directory against the model (names, shapes, weights fingerprint), then apply it."""
    from patchsparse.io.maskfile import apply_mask_dir
    from patchsparse.models import select_linears

    offloaded = [n for n, m in select_linears(loaded.model).items() if m.weight.device.type == "meta"]
    if offloaded:
        raise PatchsparseError(f"cannot apply masks to weights offloaded to disk (e.g. {offloaded[0]}); "
                               "give the device map more GPU or CPU memory")
    spec = apply_mask_dir(loaded.model, directory)  # every check runs before the model changes
    print(f"applied masks from {directory}: {len(spec.layers)} layers, sparsity {spec.sparsity():.4f}")
    return {"directory": str(directory), "sparsity": spec.sparsity(), "layers": len(spec.layers)}


def run_eval(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        return run_zeroshot_eval(args)
    loaded, masks = load_for_eval(args)
    corpus, windows = eval_windows(loaded, args.data, args.seqlen, args.max_windows)
    start = time.perf_counter()
    result = evaluate_perplexity(loaded.model, windows, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    print(perplexity_line(f"{loaded.identity.get('name', args.model)} on {corpus.name} (eval split)",
                          result, seconds))
    if args.json:
        figures = {**result.as_dict(), "seconds": seconds, "corpus": corpus.name, "held_out": corpus.held_out,
                   "masks": masks}
        write_record(args.json, make_record("eval", settings_of(args), loaded.identity, figures))
    return 0


def zeroshot_lines(result) -> list[str]:
    lines = [f"{'task':20s} {'acc':>8s} {'acc_norm':>9s} {'samples':>8s}  other"]
    for score in result.scores:
        m = score.metrics
        acc = f"{m['acc']:.4f}" if "acc" in m else "-"
        norm = f"{m['acc_norm']:.4f}" if "acc_norm" in m else "-"
        other = "  ".join(f"{k} {v:.4f}" for k, v in m.items()
                          if k in ("word_perplexity", "byte_perplexity", "bits_per_byte"))
        samples = "-" if score.samples is None else str(score.samples)
        lines.append(f"{score.task:20s} {acc:>8s} {norm:>9s} {samples:>8s}  {other}".rstrip())
    with_acc = [s.task for s in result.scores if "acc" in s.metrics]
    if with_acc:
        lines.append(f"average acc over {len(with_acc)} task(s): {result.average_acc:.4f}")
    return lines


def run_zeroshot_eval(args: argparse.Namespace) -> int:
    from patchsparse.evaluate.local_tasks import LOCAL_TASKS
    from patchsparse.evaluate.zeroshot import parse_task_list, run_zeroshot

    tasks = parse_task_list(args.tasks)
    if args.num_fewshot < 0:
        raise PatchsparseError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    # Only the local tasks need the corpus; load it first so bad --data fails before the model loads.
    texts = load_corpus(args.data).eval if any(t in LOCAL_TASKS for t in tasks) else ()
    loaded, masks = load_for_eval(args)
    start = time.perf_counter()
    result = run_zeroshot(loaded.model, loaded.tokenizer, tasks, texts, limit=args.limit,
                          batch_size=args.batch_size, num_fewshot=args.num_fewshot, seed=args.seed)
    seconds = time.perf_counter() - start
    limit = f", at most {args.limit} per task" if args.limit else ""
    print(f"{loaded.identity.get('name', args.model)}: {args.num_fewshot}-shot lm-eval "
          f"{result.lm_eval_version}{limit}, {seconds:.1f} s")
    for line in zeroshot_lines(result):
        print(line)
    if args.json:
        figures = {**result.as_dict(), "seconds": seconds, "masks": masks}
        write_record(args.json, make_record("eval", settings_of(args), loaded.identity, figures))
    return 0
