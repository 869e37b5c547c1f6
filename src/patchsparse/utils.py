"""Small shared helpers: logging to stderr, progress bars and the cache directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def progress(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None,
             unit: str = "it", leave: bool = False, disable: bool = False) -> tqdm:
    """A progress bar on stderr; PATCHSPARSE_NO_PROGRESS=1 turns all of them off."""
    disable = disable or os.environ.get("PATCHSPARSE_NO_PROGRESS", "") not in ("", "0")
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable,
                mininterval=1.0, dynamic_ncols=True, file=sys.stderr)


def cache_root() -> Path:
    """Cache directory: $PATCHSPARSE_CACHE, else $XDG_CACHE_HOME/patchsparse, else ~/.cache/patchsparse."""
    if os.environ.get("PATCHSPARSE_CACHE"):
        return Path(os.environ["PATCHSPARSE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "patchsparse"
