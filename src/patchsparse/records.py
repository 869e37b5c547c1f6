"""Machine-readable result records (`--json PATH`)."""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from patchsparse.atomic import atomic_write_text
from patchsparse.version import __version__


def git_commit() -> str | None:
    """The commit of the source tree this package runs from, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine_summary() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def make_record(command: str, settings: dict[str, Any], model: dict[str, Any] | None,
                figures: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": command,
        "settings": settings,
        "model": model,
        "figures": figures,
        "package_version": __version__,
        "git_commit": git_commit(),
        "machine": machine_summary(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_record(path: str | Path, record: dict[str, Any]) -> None:
    import json

    atomic_write_text(Path(path), json.dumps(record, indent=2, default=str) + "\n")
