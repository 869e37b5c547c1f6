"""What a report reads from a run directory, read tolerantly.

A run directory holds `masks.json` + `masks.safetensors` (required), optionally `metrics.jsonl`
(one JSON object per training step) and `results/*.json` (records written by `--json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
RESULTS_DIR = "results"


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
    rows, skipped = [], 0
    for line in path.read_text(errors="replace").splitlines():
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


def read_results(directory: Path) -> tuple[list[ResultRow], list[str]]:
    """Perplexity rows from results/*.json, and notes on files that gave none.

    A record's row is labelled by its "label" (top level, in figures or in settings), else by the
    file name. A record whose figures hold several results ({"dense": {"perplexity": …}, …})
    gives one row per result, labelled by its key.
    """
    rows: list[ResultRow] = []
    notes: list[str] = []
    for path in sorted((directory / RESULTS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            notes.append(f"{path.name}: not valid JSON, skipped")
            continue
        if not isinstance(record, dict):
            notes.append(f"{path.name}: not a result record, skipped")
            continue
        figures = record.get("figures") if isinstance(record.get("figures"), dict) else {}
        settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
        label = record.get("label") or figures.get("label") or settings.get("label") or path.stem
        found = []
        top = _row(str(label), figures, settings, path.name)
        if top is not None:
            found.append(top)
        for key, value in figures.items():
            if isinstance(value, dict):
                nested = _row(str(value.get("label") or key), value, settings, path.name)
                if nested is not None:
                    found.append(nested)
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
