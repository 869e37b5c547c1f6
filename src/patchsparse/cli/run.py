"""`patchsparse run`: the main job on the embedded default model and corpus."""

from __future__ import annotations

import argparse
import time

from patchsparse.cli.common import add_json_arg, settings_of
from patchsparse.cli.evaluate import eval_windows, perplexity_line
from patchsparse.data.corpus import DEFAULT_CORPUS
from patchsparse.evaluate import evaluate_perplexity
from patchsparse.models import load_model
from patchsparse.models.builtin import DEFAULT_MODEL
from patchsparse.records import make_record, write_record


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="the main job on the default model and corpus")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    add_json_arg(parser)
    parser.set_defaults(handler=run_main)


def run_main(args: argparse.Namespace) -> int:
    loaded = load_model(DEFAULT_MODEL, dtype="float32", device="auto")
    corpus, windows = eval_windows(loaded, DEFAULT_CORPUS, args.seqlen, args.eval_windows)
    start = time.perf_counter()
    dense = evaluate_perplexity(loaded.model, windows, desc="dense perplexity")
    seconds = time.perf_counter() - start
    print(perplexity_line(f"dense {DEFAULT_MODEL} on {corpus.name} (eval split)", dense, seconds))
    if args.json:
        write_record(args.json, make_record("run", settings_of(args), loaded.identity,
                                            {"dense": dense.as_dict(), "seconds": seconds}))
    return 0
