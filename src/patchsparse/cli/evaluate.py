"""`patchsparse eval`: perplexity of a model on a corpus's evaluation split."""

from __future__ import annotations

import argparse
import time

from patchsparse.cli.common import add_data_args, add_json_arg, add_model_args, check_seqlen, positive_int, settings_of
from patchsparse.data import load_corpus, sequential_windows, tokenize_texts
from patchsparse.evaluate import PerplexityResult, evaluate_perplexity
from patchsparse.models import LoadedModel, load_model
from patchsparse.records import make_record, write_record


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="perplexity on the evaluation split of a corpus")
    add_model_args(parser)
    add_data_args(parser)
    parser.add_argument("--max-windows", type=positive_int, default=None,
                        help="score at most this many windows (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=1)
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


def run_eval(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    corpus, windows = eval_windows(loaded, args.data, args.seqlen, args.max_windows)
    start = time.perf_counter()
    result = evaluate_perplexity(loaded.model, windows, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    print(perplexity_line(f"{loaded.identity.get('name', args.model)} on {corpus.name} (eval split)",
                          result, seconds))
    if args.json:
        figures = {**result.as_dict(), "seconds": seconds, "corpus": corpus.name, "held_out": corpus.held_out}
        write_record(args.json, make_record("eval", settings_of(args), loaded.identity, figures))
    return 0
