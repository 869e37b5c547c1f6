"""`patchsparse report DIR`: DIR/report.md with PNG figures from a run directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from patchsparse.report import build_report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="write DIR/report.md with figures (needs DIR/masks.json; uses metrics.jsonl, results/*.json)")
    parser.add_argument("directory", type=Path, metavar="DIR", help="run directory holding a mask file")
    parser.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    report = build_report(args.directory)
    print(f"report written to {report} (figures in {report.parent / 'figures'})")
    return 0
