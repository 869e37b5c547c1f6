import json

import pytest

from patchsparse.cli.main import main


@pytest.fixture()
def varied_text_file(tmp_path):
    """Distinct paragraphs, so the held-out split does not swallow the training text."""
    words = "sparse dense tile mask weight group pattern keep learn model layer".split()
    paragraphs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40 + i % 9)) + f" {i}."
                  for i in range(60)]
    path = tmp_path / "varied.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


def _run(tiny_model_dir, varied_text_file, out, *extra, learn=True):
    mode = ["--mode", "patch-tile", "--steps", "3"] if learn else []
    return main(["run", "--model", str(tiny_model_dir), "--data", str(varied_text_file), "--out", str(out),
                 "--seqlen", "64", "--calib-windows", "2", "--eval-windows", "2", "--prior", "magnitude",
                 *mode, *extra])


def test_main_job_on_tiny_model_writes_table_report_and_reuses_steps(tiny_model_dir, varied_text_file, tmp_path,
                                                                     capsys):
    out = tmp_path / "run"
    assert _run(tiny_model_dir, varied_text_file, out, "--json", str(tmp_path / "r.json")) == 0
    printed = capsys.readouterr().out
    assert "| dense | 0.0% |" in printed and "SparseGPT 2:4" in printed and "PATCH patch-tile 35%" in printed
    assert (out / "report.md").is_file() and (out / "masks" / "masks.json").is_file()
    assert (out / "baselines" / "sparsegpt-2of4" / "weights.safetensors").is_file()
    record = json.loads((tmp_path / "r.json").read_text())
    patch = record["figures"]["PATCH patch-tile 35%"]
    assert abs(patch["sparsity"] - 0.35) < 0.05  # tiny layers: one tile is a few points
    assert record["figures"]["SparseGPT 2:4"]["sparsity"] == pytest.approx(0.5)
    first = {p.name: p.read_text() for p in (out / "results").glob("*.json")}

    # a rerun with the same settings reuses every finished step
    assert _run(tiny_model_dir, varied_text_file, out) == 0
    err = capsys.readouterr().err
    assert err.count("reusing") == 3
    assert {p.name: p.read_text() for p in (out / "results").glob("*.json")} == first


def test_main_job_by_default_prunes_the_middle_blocks_and_fits_them(tiny_model_dir, varied_text_file, tmp_path,
                                                                    capsys):
    from patchsparse.io.maskfile import load_mask_spec, load_updated_weights

    out = tmp_path / "run"
    (out).mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # a learning run's leftovers: not this run's curves
    assert _run(tiny_model_dir, varied_text_file, out, "--block-steps", "2", "--json", str(tmp_path / "r.json"),
                learn=False) == 0
    assert "PATCH oneshot 35%" in capsys.readouterr().out
    assert not (out / "metrics.jsonl").exists()
    patch = json.loads((tmp_path / "r.json").read_text())["figures"]["PATCH oneshot 35%"]
    # two equal blocks: 35% is nearest one block at 2:4, the last (the first stays dense): 25% of all weights
    assert patch["sparse_blocks"] == [1] and patch["sparsity"] == pytest.approx(0.25)
    spec = load_mask_spec(out / "masks")
    assert spec.layers and all(name.startswith("model.layers.1.") for name in spec.layers)
    assert {layer.pattern for layer in spec.layers.values()} == {"2:4"} and spec.sparsity() == pytest.approx(0.5)
    assert spec.metadata["reconstruction_steps_per_block"] == 2
    weights = load_updated_weights(out / "masks", spec)
    for name, layer in spec.layers.items():  # the fitted weights are zero where the masks prune
        assert not weights[name][~layer.keep_mask()].any()
    assert (out / "report.md").is_file()


@pytest.mark.parametrize("option", [["--steps", "3"], ["--distill", "0.5"], ["--blockwise", "2"],
                                    ["--sparse-weights", "fitted"], ["--init-allocation", "uniform"],
                                    ["--preset", "paper"]])
def test_main_job_refuses_learning_options_without_learning(option, tiny_model_dir, varied_text_file, tmp_path,
                                                            capsys):
    out = tmp_path / "x"
    assert _run(tiny_model_dir, varied_text_file, out, *option, learn=False) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "learn" in line and option[0] in line
    assert not out.exists()


def test_main_job_rejects_bad_target(tiny_model_dir, varied_text_file, tmp_path, capsys):
    assert _run(tiny_model_dir, varied_text_file, tmp_path / "x", "--sparsity", "0.6") == 2
    assert "outside [0, 0.5]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_main_job_refuses_fitted_sparse_weights_with_block_wise_learning(tiny_model_dir, varied_text_file, tmp_path,
                                                                        capsys):
    out = tmp_path / "x"
    assert _run(tiny_model_dir, varied_text_file, out, "--blockwise", "2", "--sparse-weights", "fitted") == 2
    assert "for end-to-end learning" in capsys.readouterr().err
    assert not out.exists()


def test_a_finished_step_is_reused_when_only_settings_it_ignores_change(tmp_path):
    from dataclasses import replace

    from patchsparse.cli.run import RunSettings, finished_step

    settings = RunSettings(model="m", data="d", sparsity=0.35, mode="patch-tile", prior="sparsegpt", preset="cpu",
                           calib_windows=32, eval_windows=16, seqlen=512, seed=0)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"settings": settings.as_dict(), "figures": {"perplexity": 1.0}}))
    learning_changed = replace(settings, distill=1.0, reconstruct="repick", steps=80)
    assert finished_step(path, "dense", learning_changed) is not None
    assert finished_step(path, "sparsegpt-2of4", learning_changed) is not None
    assert finished_step(path, "patch", learning_changed) is None
    assert finished_step(path, "patch", settings) is not None
    assert finished_step(path, "dense", replace(settings, eval_windows=8)) is None
    assert finished_step(path, "sparsegpt-2of4", replace(settings, calib_windows=64)) is None
    assert finished_step(path, "dense", replace(settings, calib_windows=64)) is not None
    path.write_text("{not json")
    assert finished_step(path, "dense", settings) is None
