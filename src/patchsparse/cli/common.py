"""Options shared by several commands and the glue that turns them into objects."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from patchsparse.data.corpus import DEFAULT_CORPUS
from patchsparse.errors import PatchsparseError
from patchsparse.models.builtin import DEFAULT_MODEL


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"built-in name, local HF model directory or hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto (default: float32)")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto (default: auto)")


def add_placement_args(parser: argparse.ArgumentParser) -> None:
    """Big models: place layers with accelerate (GPU, then CPU memory, then disk)."""
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="load with a device map instead of --device: auto | balanced | sequential | cpu | "
                             "cuda[:N]; with auto, layers beyond GPU memory go to CPU memory, then to disk")
    parser.add_argument("--offload-dir", type=Path, default=None, metavar="DIR",
                        help="folder for weights offloaded to disk (with --device-map)")


def add_data_args(parser: argparse.ArgumentParser, seqlen: int = 512) -> None:
    parser.add_argument("--data", default=DEFAULT_CORPUS,
                        help="'default', a local .txt/.jsonl/.json.gz/.parquet file, or wikitext2 | c4 | slimpajama")
    parser.add_argument("--seqlen", type=int, default=seqlen, help=f"tokens per window (default: {seqlen})")


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write a machine-readable record of the results here")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _finite_float(value: str, accept, what: str) -> float:
    """argparse type: a finite float that `accept` allows, else one line naming `what`."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}") from None
    if not accept(number) or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return number


def positive_float(value: str) -> float:
    return _finite_float(value, lambda number: number > 0, "a positive number")


def non_negative_float(value: str) -> float:
    return _finite_float(value, lambda number: number >= 0, "a number >= 0")


SPARSE_WEIGHTS_HELP = ("what the sparse tiles' weights are while the masks learn: dense = the dense weights under "
                       "the 2:4 mask (the published method, default); fitted = the prior's 2:4 masks' weights after "
                       "block reconstruction, so that each tile's dense weights are weighed against 2:4 weights "
                       "that compensate (the result, and its block reconstruction, then start from them)")


def check_seqlen(seqlen: int, max_positions: int | None, option: str = "--seqlen") -> None:
    if seqlen < 2:
        raise PatchsparseError(f"{option} must be at least 2, got {seqlen}")
    if max_positions is not None and seqlen > max_positions:
        raise PatchsparseError(f"{option} {seqlen} exceeds the model's context of {max_positions} tokens")


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k not in ("handler", "debug", "json")}


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: Path, option: str = "--out") -> None:
    """Refuse before any work an output directory that cannot be created or written."""
    if path.exists() and not path.is_dir():
        raise PatchsparseError(f"{option} {path} exists and is not a directory")
    anchor = _nearest_existing(path)
    if not anchor.is_dir():
        raise PatchsparseError(f"{option} {path} cannot be created: {anchor} is a file")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise PatchsparseError(f"{option} {path} cannot be written: {anchor} is not writable")


def check_writable_file(path: Path | None, option: str = "--json") -> None:
    """Refuse before any work an output file that is a directory, lies below a file, or cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise PatchsparseError(f"{option} {path} is a directory; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise PatchsparseError(f"{option} {path} is not writable")
    anchor = _nearest_existing(path.parent)
    if not anchor.is_dir():
        raise PatchsparseError(f"{option} {path} cannot be created: {anchor} is a file")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise PatchsparseError(f"{option} {path} cannot be written: {anchor} is not writable")
