import json

import pytest
import torch

from patchsparse.cli.main import main
from patchsparse.io.maskfile import load_mask_spec
from tests.conftest import write_random_paragraphs


def _args(model_dir, data, out, *extra):
    return ["learn", "--model", str(model_dir), "--data", str(data), "--device", "cpu", "--seqlen", "32",
            "--tile", "16", "16", "--steps", "3", "--calib-windows", "2", "--eval-windows", "2",
            "--eval-seqlen", "32", "--checkpoint-every", "2", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_random_paragraphs(tmp_path_factory.mktemp("learn-data") / "text.txt", 80, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_learn_writes_masks_metrics_and_record(tiny_model_dir, text_file, tmp_path, capsys):
    out, record = tmp_path / "run", tmp_path / "learn.json"
    assert main(_args(tiny_model_dir, text_file, out, "--mode", "patch-joint", "--json", str(record))) == 0
    printed = capsys.readouterr().out
    assert "sparsity (exact)" in printed and "perplexity learned" in printed
    spec = load_mask_spec(out / "masks")
    assert abs(spec.sparsity() - 0.35) < 0.02
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    figures = json.loads(record.read_text())["figures"]
    assert set(figures["perplexity"]) == {"prior 2:4", "prior hybrid (start)", "learned"}
    assert figures["extraction"]["policy"] == "exact"
    # a finished run resumes to the same masks without training
    assert main(_args(tiny_model_dir, text_file, out, "--mode", "patch-joint", "--resume")) == 0
    again = load_mask_spec(out / "masks")
    assert all(torch.equal(again.layers[n].keep_mask(), spec.layers[n].keep_mask()) for n in spec.layers)


@pytest.mark.parametrize("extra,message", [
    (["--mode", "patch-tile", "--sparsity", "0.6"], "outside [0, 0.5]"),
    (["--mode", "maskllm", "--sparsity", "0.35"], "maskllm mode learns 2:4 masks only"),
    (["--mode", "patch-tile", "--tile", "16", "6"], "tile size 16x6 is invalid"),
    (["--mode", "patch-tile", "--blockwise", "2", "--sparse-weights", "fitted"], "for end-to-end learning"),
])
def test_bad_input_is_one_line(tiny_model_dir, text_file, tmp_path, capsys, extra, message):
    assert main(_args(tiny_model_dir, text_file, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()


def test_existing_output_needs_overwrite(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    assert main(_args(tiny_model_dir, text_file, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "something").exists()


def test_eval_seqlen_too_long_is_refused_by_name_before_the_prior(tiny_model_dir, text_file, tmp_path,
                                                                   capsys, monkeypatch):
    import patchsparse.cli.learn as learn_cli

    def no_prior(*args, **kwargs):
        raise AssertionError("the prior must not be computed before the options are checked")

    monkeypatch.setattr(learn_cli, "learn_prior", no_prior)
    assert main(_args(tiny_model_dir, text_file, tmp_path / "run", "--eval-seqlen", "100000")) == 2
    err = capsys.readouterr().err
    assert "--eval-seqlen 100000 exceeds" in err and "--seqlen 100000" not in err


def test_eval_flag_is_not_ambiguous(tiny_model_dir, text_file, tmp_path, capsys):
    assert main(_args(tiny_model_dir, text_file, tmp_path / "run", "--no-eval", "--steps", "1")) == 0
    assert "perplexity" not in capsys.readouterr().out
    from patchsparse.cli.main import build_parser

    assert build_parser().parse_args(["learn", "--eval", "--out", "x"]).eval is True


def test_blockwise_weight_learning_saves_its_weights_beside_the_masks(tiny_model_dir, text_file, tmp_path):
    from patchsparse.io.maskfile import load_updated_weights
    from patchsparse.models import load_model

    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, text_file, out, "--mode", "maskllm", "--blockwise", "3",
                      "--blockwise-weight-lr", "1e-3", "--no-eval")) == 0
    spec = load_mask_spec(out / "masks")
    weights = load_updated_weights(out / "masks", spec)
    dense = load_model(str(tiny_model_dir), device="cpu").model
    assert set(weights) == set(spec.layers)
    for name, weight in weights.items():
        keep = spec.layers[name].keep_mask()
        assert not weight[~keep].any()
        assert not torch.equal(weight[keep], dense.get_submodule(name).weight.detach()[keep])


def test_block_steps_set_the_block_reconstruction_after_learning(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, text_file, out, "--reconstruct", "block", "--block-steps", "2",
                      "--no-eval")) == 0
    assert load_mask_spec(out / "masks").metadata["reconstruction_steps_per_block"] == 2


@pytest.mark.parametrize("value", ["-1e-3", "nan", "fast"])
def test_blockwise_weight_lr_must_be_a_number_at_least_zero(tiny_model_dir, text_file, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(_args(tiny_model_dir, text_file, tmp_path / "run", "--blockwise", "2", f"--blockwise-weight-lr={value}"))
    assert exit_.value.code == 2 and ">= 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_learning_on_fitted_2_4_weights_saves_dense_tiles_and_fitted_ones(tiny_model_dir, text_file, tmp_path):
    from patchsparse.io.maskfile import load_updated_weights
    from patchsparse.models import load_model

    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, text_file, out, "--mode", "patch-tile", "--sparse-weights", "fitted",
                      "--no-eval")) == 0
    spec = load_mask_spec(out / "masks")
    weights = load_updated_weights(out / "masks", spec)
    dense = load_model(str(tiny_model_dir), device="cpu").model
    assert set(weights) == set(spec.layers)
    for name, layer in spec.layers.items():
        in_dense_tiles = layer.grid.expand(layer.dense_tiles)
        original = dense.get_submodule(name).weight.detach()
        assert torch.equal(weights[name][in_dense_tiles], original[in_dense_tiles])
        sparse_kept = layer.keep_mask() & ~in_dense_tiles
        assert not torch.equal(weights[name][sparse_kept], original[sparse_kept])  # fitted, not dense


def test_resuming_with_other_sparse_weights_is_refused_in_one_line(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, text_file, out, "--mode", "patch-tile", "--no-eval")) == 0
    capsys.readouterr()
    assert main(_args(tiny_model_dir, text_file, out, "--mode", "patch-tile", "--no-eval", "--resume",
                      "--sparse-weights", "fitted")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mask.sparse_weights" in err[0]
