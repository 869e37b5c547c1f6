"""`patchsparse export`: a standard Hugging Face checkpoint with the masks applied, plus the mask sidecar."""

from __future__ import annotations

import argparse
from pathlib import Path

from patchsparse.cli.apply import sparsity_lines
from patchsparse.cli.common import add_model_args, check_writable_dir
from patchsparse.io.export import SIDECAR, check_output_dir, export_checkpoint
from patchsparse.io.maskfile import read_mask_document
from patchsparse.models import load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a Hugging Face checkpoint with the masks applied (loads without patchsparse)")
    add_model_args(parser)
    parser.add_argument("--masks", type=Path, required=True, metavar="DIR", help="mask directory")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="checkpoint directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    check_output_dir(args.out, args.overwrite)  # before loading anything
    check_writable_dir(args.out)
    document = read_mask_document(args.masks)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    spec = export_checkpoint(loaded, args.masks, args.out, overwrite=args.overwrite)
    for line in sparsity_lines(spec, document.get("target_sparsity")):
        print(line)
    print(f"exported {loaded.identity.get('name', args.model)} with masks applied to {args.out} "
          f"(masks in {args.out / SIDECAR})")
    return 0
