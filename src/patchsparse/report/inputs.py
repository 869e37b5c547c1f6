"""What a report reads from a run directory, read tolerantly.

A run directory holds a mask directory (`masks.json` + `masks.safetensors`, in the run directory
itself or in its `masks/` folder as `patchsparse learn` writes it), optionally `metrics.jsonl` (one
JSON object per training step) and `results/*.json` (records written by `--json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
RESULTS_DIR = "results"
MASKS_SUBDIR = "masks"


def find_mask_dir(run_dir: Path) -> Path:
    """The run directory itself when it holds masks.json, else its masks/ folder when that does."""
    from patchsparse.io.maskfile import MASKS_JSON

    if not (run_dir / MASKS_JSON).is_file() and (run_dir / MASKS_SUBDIR / MASKS_JSON).is_file():
        return run_dir / MASKS_SUBDIR
    return run_dir


@dataclass(frozen=True)
class Metrics:
    rows: list[dict[str, Any]]
    skipped_lines: int  # blank lines are not counted; unreadable ones are

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of the rows that have a number for `key`; the row index stands in for a missing step."""
        steps, values = [], []
        for index, row in enumerate(self.rows):
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                step = row.get("step")
                steps.append(step if isinstance(step, (int, float)) else index)
                values.append(float(value))
        return steps, values

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(k for k, v in row.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)))
        return list(seen)


def read_metrics(path: Path) -> Metrics | None:
    """Rows of a metrics.jsonl; lines that are not JSON objects (e.g. a truncated last line) are skipped."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(errors="replace")
    except OSError:  # unreadable: the report goes on without curves
        return None
    rows, skipped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return Metrics(rows=rows, skipped_lines=skipped)


@dataclass(frozen=True)
class ResultRow:
    label: str
    perplexity: float
    sparsity: float | None
    source: str        # file the row came from
    details: str       # corpus, tokens, …


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _row(label: str, figures: dict[str, Any], settings: dict[str, Any], source: str) -> ResultRow | None:
    perplexity = _number(figures.get("perplexity"))
    if perplexity is None:
        return None
    sparsity = _number(figures.get("sparsity"))
    if sparsity is None:
        sparsity = _number(settings.get("sparsity"))
    parts = [str(figures["corpus"])] if figures.get("corpus") else []
    if _number(figures.get("tokens_scored")) is not None:
        parts.append(f"{int(figures['tokens_scored']):,} tokens")
    return ResultRow(label=label, perplexity=perplexity, sparsity=sparsity, source=source, details=", ".join(parts))


def _rows_of_record(record: dict[str, Any], stem: str, source: str) -> list[ResultRow]:
    figures = record.get("figures") if isinstance(record.get("figures"), dict) else {}
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    label = record.get("label") or figures.get("label") or settings.get("label") or stem
    rows = []
    top = _row(str(label), figures, settings, source)
    if top is not None:
        rows.append(top)
    # {"perplexity": {"dense": 20.1, "learned": 25.3}, "prior_sparsity": {"magnitude": 0.5}}
    if isinstance(figures.get("perplexity"), dict):
        sparsity_maps = [v for k, v in figures.items() if k.endswith("sparsity") and isinstance(v, dict)]
        for key, value in figures["perplexity"].items():
            sparsity = next((m[key] for m in sparsity_maps if _number(m.get(key)) is not None), None)
            nested = _row(str(key), {"perplexity": value, "sparsity": sparsity, **_data_of(figures)}, {}, source)
            if nested is not None:
                rows.append(nested)
    # {"dense": {"perplexity": 20.1, …}, "patch": {"perplexity": 25.3, "sparsity": 0.35}}
    for key, value in figures.items():
        if isinstance(value, dict) and key != "perplexity":
            nested = _row(str(value.get("label") or key), value, settings, source)
            if nested is not None:
                rows.append(nested)
    return rows


def _data_of(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: figures[k] for k in ("corpus", "tokens_scored") if k in figures}


def read_results(directory: Path) -> tuple[list[ResultRow], list[str]]:
    """Perplexity rows from results/*.json, and notes on files that gave none.

    A record's row is labelled by its "label" (top level, in figures or in settings), else by the
    file name. Records holding several results give one row per result, labelled by its key:
    figures {"dense": {"perplexity": …}, …} or figures {"perplexity": {"dense": …, "learned": …}}.
    """
    rows: list[ResultRow] = []
    notes: list[str] = []
    for path in sorted((directory / RESULTS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            notes.append(f"{path.name}: not valid JSON, skipped")
            continue
        except OSError as exc:  # a folder or an unreadable file named *.json
            notes.append(f"{path.name}: cannot be read ({exc.strerror or type(exc).__name__}), skipped")
            continue
        if not isinstance(record, dict):
            notes.append(f"{path.name}: not a result record, skipped")
            continue
        found = _rows_of_record(record, path.stem, path.name)
        if not found:
            notes.append(f"{path.name}: no perplexity figure, skipped")
        rows.extend(found)
    return rows, notes


def dense_reference(rows: list[ResultRow]) -> ResultRow | None:
    """The row labelled "dense" (case-insensitive), else none: ratios need an explicit reference."""
    for row in rows:
        if row.label.lower() == "dense":
            return row
    return None
