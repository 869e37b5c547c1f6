"""`build_report(run_dir)`: report.md with PNG figures from a run directory's files."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from patchsparse.atomic import atomic_directory, atomic_write_text
from patchsparse.errors import PatchsparseError
from patchsparse.io.maskfile import load_mask_spec, read_mask_document
from patchsparse.masks import HybridMaskSpec
from patchsparse.report import figures as fig
from patchsparse.report.inputs import (METRICS_FILE, Metrics, ResultRow, dense_reference, find_mask_dir, read_metrics,
                                      read_results)

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"


def md_cell(value: Any) -> str:
    """Text safe inside a Markdown table cell: no raw HTML, no `|` that opens a column, one line."""
    text = " ".join(str(value).split())  # newlines would end the row
    text = html.escape(text, quote=False).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    return text


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text`, so the text cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _percent(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) else "—"


def summary_lines(document: dict[str, Any], spec: HybridMaskSpec) -> list[str]:
    base = document.get("base_model", {})
    model = base.get("name") or base.get("spec") or "unknown"
    if base.get("revision"):
        model += f" (revision {base['revision']})"
    tile = document.get("tile")
    kept, total = spec.kept_and_total()
    lines = [
        f"| base model | {md_cell(model)} |",
        f"| weights fingerprint | {md_cell(str(base.get('fingerprint') or 'not recorded')[:16])} |",
        f"| mode | {md_cell(document.get('mode') or '—')} |",
        f"| pattern of sparse tiles | {md_cell(document.get('pattern') or 'mixed')} |",
        f"| tile size | {f'{tile[0]}x{tile[1]}' if tile else 'none / mixed'} |",
        f"| target sparsity | {_percent(document.get('target_sparsity'))} |",
        f"| achieved sparsity | {_percent(spec.sparsity())} ({total - kept:,} of {total:,} weights in "
        f"{len(spec.layers)} layers) |",
        f"| written by | patchsparse {md_cell(document.get('package_version', '?'))} |",
    ]
    whole = (document.get("metadata") or {}).get("model_sparsity")
    if isinstance(whole, (int, float)):  # masks of some blocks: the others are dense
        lines.insert(-1, f"| sparsity over all decoder linears | {_percent(whole)} (layers without masks stay dense) |")
    return ["| | |", "|---|---|", *lines]


def perplexity_table(rows: list[ResultRow]) -> list[str]:
    reference = dense_reference(rows)
    header = "| result | sparsity | perplexity | vs dense | data | record |"
    lines = [header, "|---|---:|---:|---:|---|---|"]
    for row in sorted(rows, key=lambda r: (r.sparsity or 0.0, r.perplexity)):
        ratio = f"{row.perplexity / reference.perplexity:.3f}x" if reference else "—"
        lines.append(f"| {md_cell(row.label)} | {_percent(row.sparsity)} | {row.perplexity:.3f} | {ratio} | "
                     f"{md_cell(row.details or '—')} | `{md_cell(row.source)}` |")
    if reference is None:
        lines.append("")
        lines.append("No record is labelled `dense`, so no ratio is shown.")
    return lines


def projection_table(spec: HybridMaskSpec) -> list[str]:
    lines = ["| projection | layers | density | in dense tiles |", "|---|---:|---:|---:|"]
    for kind in fig.projection_order(spec):
        masks = [m for n, m in spec.layers.items() if n.rsplit(".", 1)[-1] == kind]
        total = sum(m.numel() for m in masks)
        kept = sum(m.kept() for m in masks)
        dense = sum(m.dense_tile_fraction() * m.numel() for m in masks)
        lines.append(f"| {md_cell(kind)} | {len(masks)} | {kept / total:.2%} | {dense / total:.2%} |")
    return lines


def last_metrics_line(metrics: Metrics) -> str:
    last = metrics.rows[-1]
    shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step")
    return f"Last logged step {last.get('step', len(metrics.rows) - 1)}: {shown}."


def build_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.md and run_dir/figures/*.png; returns the report's path.

    Needs masks.json + masks.safetensors in run_dir (or in run_dir/masks); metrics.jsonl and
    results/*.json are used when present. The figures folder is replaced in one rename, the
    report file likewise.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PatchsparseError(f"run directory {run_dir} does not exist or is not a directory")
    # the report replaces these two; refuse before any work when something else has their names
    for name, is_kind, kind in ((REPORT_FILE, Path.is_file, "file"), (FIGURES_DIR, Path.is_dir, "folder")):
        if (run_dir / name).exists() and not is_kind(run_dir / name):
            raise PatchsparseError(f"{run_dir / name} exists and is not a {kind}; move it away to write the report")
    mask_dir = find_mask_dir(run_dir)
    document = read_mask_document(mask_dir)
    spec = load_mask_spec(mask_dir)
    metrics = read_metrics(run_dir / METRICS_FILE)
    results, result_notes = read_results(run_dir)

    pngs: dict[str, bytes] = {
        "density_per_layer.png": fig.png_bytes(fig.density_per_layer_figure(spec)),
        "density_per_projection.png": fig.png_bytes(fig.density_per_projection_figure(spec)),
    }
    tile_layers = fig.select_tile_map_layers(spec)
    if tile_layers:
        pngs["tile_maps.png"] = fig.png_bytes(fig.tile_map_figure(spec, tile_layers))
    target = document.get("target_sparsity")
    curves = None
    if metrics is not None and metrics.rows:
        target_density = 1.0 - target if isinstance(target, (int, float)) else None
        curves = fig.training_curves_figure(metrics, target_density)
        if curves is not None:
            pngs["training_curves.png"] = fig.png_bytes(curves)

    md = ["# patchsparse report", "", *summary_lines(document, spec), ""]
    md += ["## Perplexity", ""]
    if results:
        md += perplexity_table(results)
    else:
        md.append("No result records (`results/*.json`) in this directory.")
    md += [f"- {md_cell(note)}" for note in result_notes]
    md += ["", "## Density per layer", "",
           "Fraction of weights kept in each masked layer, grouped by decoder block. Above 50%, the "
           "extra weights are dense tiles.", "",
           f"![Density per layer]({FIGURES_DIR}/density_per_layer.png)", "",
           "## Density per projection type", "",
           f"![Density per projection type]({FIGURES_DIR}/density_per_projection.png)", "",
           *projection_table(spec), ""]
    md += ["## Tile maps", ""]
    if tile_layers:
        md += ["Layers with the most, the fewest and in-between dense tiles; one cell per tile "
               "(edge tiles of a ragged grid are smaller in the weight than they look here).", "",
               f"![Tile maps]({FIGURES_DIR}/tile_maps.png)", ""]
    else:
        md += ["These masks have no tile structure.", ""]
    md += ["## Training curves", ""]
    if curves is not None:
        md += [f"![Training curves]({FIGURES_DIR}/training_curves.png)", "", last_metrics_line(metrics)]
    elif metrics is not None and metrics.rows:
        md.append(f"`{METRICS_FILE}` holds none of the values the curves show (loss, density, τ, κ, lr).")
    else:
        md.append(f"No `{METRICS_FILE}` in this directory.")
    if metrics is not None and metrics.skipped_lines:
        md.append(f"({metrics.skipped_lines} unreadable line(s) of `{METRICS_FILE}` skipped.)")
    training = document.get("training") or {}
    if training:
        text = json.dumps(training, indent=2, default=str)
        md += ["", "## Training settings", "", _fence(text) + "json", text, _fence(text)]
    md.append("")

    with atomic_directory(run_dir / FIGURES_DIR, overwrite=True) as tmp:
        for name, data in pngs.items():
            (tmp / name).write_bytes(data)
    report = run_dir / REPORT_FILE
    atomic_write_text(report, "\n".join(md))
    return report
