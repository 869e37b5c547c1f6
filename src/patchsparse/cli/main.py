"""`patchsparse` entry point: one sub-command per module, errors as one line on stderr."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from patchsparse.cli.common import check_writable_file
from patchsparse.errors import PatchsparseError
from patchsparse.version import __version__

# Each module defines `register(subparsers)`, which adds its parser with `handler=` set.
COMMAND_MODULES = (
    "patchsparse.cli.info",
    "patchsparse.cli.evaluate",
    "patchsparse.cli.run",
    "patchsparse.cli.prune",
    "patchsparse.cli.learn",
    "patchsparse.cli.reconstruct",
    "patchsparse.cli.apply",
    "patchsparse.cli.export",
    "patchsparse.cli.generate",
    "patchsparse.cli.report",
    "patchsparse.cli.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchsparse", description="Learnable tile-level hybrid (dense / 2:4) sparsity for LLMs.")
    parser.add_argument("--version", action="version", version=f"patchsparse {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    # Built-in models and corpora are local; never let transformers wander to the hub for them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # every command's --json record: refuse an unwritable path before the work, not after it
        check_writable_file(getattr(args, "json", None))
        return int(args.handler(args) or 0)
    except PatchsparseError as exc:
        if args.debug:
            raise
        print(f"patchsparse: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment, not a bug: unwritable or full disk, missing permission
        if args.debug:
            raise
        print(f"patchsparse: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("patchsparse: interrupted", file=sys.stderr)
        return 130


def describe_os_error(exc: OSError) -> str:
    """One line: what failed and on which path ("No space left on device: runs/x/checkpoint.pt")."""
    reason = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{reason}: {' -> '.join(paths)}" if paths else reason


if __name__ == "__main__":
    sys.exit(main())
