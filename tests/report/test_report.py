import json
import math

import pytest
import torch

from patchsparse.io.maskfile import save_mask_spec
from patchsparse.masks import HybridMaskSpec, LayerMask
from patchsparse.report import build_report
from patchsparse.report.figures import (density_per_layer_figure, density_per_projection_figure,
                                        select_tile_map_layers, training_curves_figure)
from patchsparse.report.inputs import read_metrics, read_results
from tests.io.masks_for_tests import hybrid_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def write_run_dir(path, model, with_metrics=True, with_results=True):
    spec = hybrid_spec(model, metadata={"mode": "patch-tile", "target_sparsity": 0.3})
    save_mask_spec(spec, path, identity={"name": "tiny-llama"}, extra={"steps": 40, "lr": 0.05})
    if with_metrics:
        lines = []
        for step in range(40):
            row = {"step": step, "loss": 4 * math.exp(-step / 10) + 2, "soft_density": 0.9 - 0.005 * step,
                   "tau_24": 4 * 0.9 ** step, "lr": 0.05}
            if step % 2:
                row.pop("tau_24")  # keys come and go
            lines.append(json.dumps(row))
        lines.append("")
        lines.append('{"step": 40, "loss": 2.1')  # a run killed mid-line
        (path / "metrics.jsonl").write_text("\n".join(lines))
    if with_results:
        results = path / "results"
        results.mkdir()
        (results / "dense.json").write_text(json.dumps({"command": "eval", "figures": {"perplexity": 20.0}}))
        (results / "sparsegpt.json").write_text(json.dumps(
            {"command": "prune", "settings": {"label": "SparseGPT 2:4"}, "figures": {"perplexity": 50.0, "sparsity": 0.5}}))
        (results / "run.json").write_text(json.dumps(
            {"command": "run", "figures": {"patch": {"perplexity": 30.0, "sparsity": 0.3}, "seconds": 3}}))
        (results / "broken.json").write_text("{not json")
    return spec


def test_report_on_synthetic_run(tiny_model, tmp_path):
    spec = write_run_dir(tmp_path / "run", tiny_model)
    report = build_report(tmp_path / "run")
    text = report.read_text()
    assert "| tiny-llama |" in text and "| 30.00% |" in text  # target
    assert f"{spec.sparsity():.2%}" in text
    # perplexity table: ratios to the record labelled dense, sorted by sparsity
    assert "| dense | — | 20.000 | 1.000x |" in text
    assert "| patch | 30.00% | 30.000 | 1.500x |" in text
    assert "| SparseGPT 2:4 | 50.00% | 50.000 | 2.500x |" in text
    assert text.index("| patch |") < text.index("| SparseGPT 2:4 |")
    assert "broken.json: not valid JSON, skipped" in text
    assert "1 unreadable line(s)" in text and "Last logged step 39" in text
    for name in ("density_per_layer", "density_per_projection", "tile_maps", "training_curves"):
        path = tmp_path / "run" / "figures" / f"{name}.png"
        assert f"figures/{name}.png" in text
        width, height = png_size(path)
        assert width > 400 and height > 300


def test_report_without_optional_inputs(tiny_model, tmp_path):
    write_run_dir(tmp_path / "run", tiny_model, with_metrics=False, with_results=False)
    text = build_report(tmp_path / "run").read_text()
    assert "No `metrics.jsonl`" in text and "No result records" in text
    assert sorted(p.name for p in (tmp_path / "run" / "figures").iterdir()) == [
        "density_per_layer.png", "density_per_projection.png", "tile_maps.png"]


def test_report_of_masks_on_some_blocks_gives_the_sparsity_over_all_linears(tiny_model, tmp_path):
    spec = hybrid_spec(tiny_model, metadata={"mode": None, "model_sparsity": 0.25})
    save_mask_spec(spec, tmp_path / "run")
    text = build_report(tmp_path / "run").read_text()
    assert "| sparsity over all decoder linears | 25.00% (layers without masks stay dense) |" in text
    write_run_dir(tmp_path / "other", tiny_model, with_metrics=False, with_results=False)
    assert "over all decoder linears" not in build_report(tmp_path / "other").read_text()


def test_rerun_replaces_stale_figures(tiny_model, tmp_path):
    write_run_dir(tmp_path / "run", tiny_model)
    build_report(tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").unlink()
    build_report(tmp_path / "run")
    assert not (tmp_path / "run" / "figures" / "training_curves.png").exists()


def test_metrics_reader_is_tolerant(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"loss": 3.0}\n[1, 2]\n\n{"step": 5, "loss": 2.0, "lr": true}\n{"step": 6, "loss": "nan?"}\n{oops\n')
    metrics = read_metrics(path)
    assert metrics.skipped_lines == 2
    assert metrics.series("loss") == ([0, 5], [3.0, 2.0])  # a missing step is the row index
    assert metrics.series("lr") == ([], [])  # booleans are not numbers
    assert read_metrics(tmp_path / "missing.jsonl") is None


def test_results_without_perplexity_are_noted(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "info.json").write_text(json.dumps({"command": "info", "figures": {"parameters": {}}}))
    rows, notes = read_results(tmp_path)
    assert rows == [] and notes == ["info.json: no perplexity figure, skipped"]


def test_projection_bars_stack_to_the_density(tiny_model):
    spec = hybrid_spec(tiny_model, dense_fraction=0.4)
    axes = density_per_projection_figure(spec).axes[0]
    bars = axes.patches
    kinds = [t.get_text() for t in axes.get_xticklabels()]
    assert kinds == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    half = len(bars) // 2
    sparse_part, dense_part = bars[:half], bars[half:]
    for i, kind in enumerate(kinds):
        masks = [m for n, m in spec.layers.items() if n.endswith(kind)]
        density = sum(m.kept() for m in masks) / sum(m.numel() for m in masks)
        dense_share = sum(m.dense_tile_fraction() * m.numel() for m in masks) / sum(m.numel() for m in masks)
        assert sparse_part[i].get_height() + dense_part[i].get_height() == pytest.approx(density)
        assert dense_part[i].get_height() == pytest.approx(dense_share)


def test_layer_bars_show_each_layer_density(tiny_model):
    spec = hybrid_spec(tiny_model)
    figure = density_per_layer_figure(spec)
    assert len(figure.axes) == 2  # q/k/v/o, then gate/up/down
    heights = sorted(round(b.get_height(), 9) for ax in figure.axes for b in ax.patches)
    assert heights == sorted(round(1 - m.sparsity(), 9) for m in spec.layers.values())


def test_tile_map_selection_spans_dense_fractions(tiny_model):
    spec = hybrid_spec(tiny_model)
    chosen = select_tile_map_layers(spec, count=3)
    fractions = sorted(m.dense_tile_fraction() for m in spec.layers.values())
    assert spec.layers[chosen[0]].dense_tile_fraction() == fractions[-1]
    assert spec.layers[chosen[-1]].dense_tile_fraction() == fractions[0]
    untiled = HybridMaskSpec({"model.layers.0.mlp.up_proj": LayerMask(torch.ones(4, 8, dtype=torch.bool), "unstructured")})
    assert select_tile_map_layers(untiled) == []


def test_curves_figure_skips_absent_panels(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 3}\n{"step": 1, "loss": 2.5}\n')
    figure = training_curves_figure(read_metrics(path))
    assert [ax.get_title() for ax in figure.axes] == ["Loss"]
    path.write_text('{"step": 0, "note": "x"}\n')
    assert training_curves_figure(read_metrics(path)) is None


def test_learn_layout_and_record(tiny_model, tmp_path):
    """`patchsparse learn` writes masks/ beside metrics.jsonl and records perplexities as a dict."""
    run = tmp_path / "learn-out"
    spec = hybrid_spec(tiny_model, metadata={"mode": "patch-tile", "target_sparsity": 0.3})
    save_mask_spec(spec, run / "masks")
    rows = [{"step": s, "lr": 0.1, "loss": 3 - s / 10, "lm_loss": 3 - s / 10, "sparse_reg": 0.01 * s,
             "density": 0.8 - s / 100, "hard_density": 0.8, "tau_nm": 4 - s / 5, "tau_tile": 2 - s / 10,
             "kappa_nm": 100.0, "kappa_tile": 3.0 + s, "block_density": None} for s in range(10)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "results").mkdir()
    (run / "results" / "learn.json").write_text(json.dumps({"command": "learn", "figures": {
        "perplexity": {"magnitude": 40.0, "learned": 30.0}, "prior_sparsity": {"magnitude": 0.5},
        "extraction": {"sparsity": 0.3}, "corpus": "tiny"}}))
    (run / "results" / "dense.json").write_text(json.dumps({"command": "eval", "figures": {"perplexity": 20.0}}))
    text = build_report(run).read_text()
    assert "| magnitude | 50.00% | 40.000 | 2.000x | tiny |" in text
    assert "| learned | — | 30.000 | 1.500x | tiny |" in text
    curves = training_curves_figure(read_metrics(run / "metrics.jsonl"), 0.7)
    assert [ax.get_title() for ax in curves.axes] == [
        "Loss", "Density", "Temperature τ", "Learning rate", "Sparsity regulariser", "Logit scale κ"]
    density_axes = curves.axes[1]
    assert [line.get_label() for line in density_axes.get_lines()] == ["density", "hard_density", "target 70.0%"]
    assert (run / "figures" / "training_curves.png").is_file()


def _table_rows(text, first_cell):
    return [line for line in text.splitlines() if line.startswith(f"| {first_cell}")]


def test_labels_and_names_are_escaped(tiny_model, tmp_path):
    """A `|` must not open a column, HTML must not pass through, a newline must not end the row."""
    run = tmp_path / "run"
    write_run_dir(run, tiny_model, with_metrics=False)
    doc = json.loads((run / "masks.json").read_text())
    doc["base_model"]["name"] = "evil | <script>alert(1)</script>"
    (run / "masks.json").write_text(json.dumps(doc))
    (run / "results" / "x.json").write_text(json.dumps(
        {"label": "a|b <img src=x onerror=alert(1)>\nc", "figures": {"perplexity": 9.0, "sparsity": 0.1}}))
    (run / "results" / "<b>bold.json").write_text("{not json")
    text = build_report(run).read_text()
    assert "<script>" not in text and "<img" not in text and "<b>" not in text
    [model_row] = _table_rows(text, "base model")
    assert model_row == "| base model | evil \\| &lt;script&gt;alert(1)&lt;/script&gt; |"
    [row] = _table_rows(text, "a\\|b")
    assert row.startswith("| a\\|b &lt;img src=x onerror=alert(1)&gt; c | 10.00% | 9.000 |")
    # every row of the perplexity table has the header's number of columns (unescaped pipes)
    header = "| result | sparsity | perplexity | vs dense | data | record |"
    table = [line for line in text[text.index(header):].split("\n\n")[0].splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4
    assert all(len(line.replace("\\|", "").split("|")) == len(header.split("|")) for line in table)


@pytest.mark.parametrize("entry", ["report.md", "figures", "results/odd.json"])
def test_unexpected_entries_in_the_run_directory(tiny_model, tmp_path, entry):
    from patchsparse.errors import PatchsparseError

    run = tmp_path / "run"
    write_run_dir(run, tiny_model, with_metrics=False)
    if entry == "figures":
        (run / entry).write_text("a file where the figures folder goes")
    else:
        (run / entry).mkdir()
    if entry == "results/odd.json":  # a folder among the records is skipped with a note
        assert "odd.json: cannot be read" in build_report(run).read_text()
        return
    with pytest.raises(PatchsparseError, match="exists and is not a"):
        build_report(run)
    assert (run / entry).exists() and not (run / "report.md").is_file()
