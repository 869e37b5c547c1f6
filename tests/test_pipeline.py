"""The learned-mask pipeline: one path through prior, learning, extraction and reconstruction."""

import dataclasses

import pytest
import torch

from patchsparse.cli.main import main
from patchsparse.io.maskfile import apply_mask_dir, load_mask_spec, load_updated_weights
from patchsparse.learn.trainer import CHECKPOINT_FILE
from patchsparse.models import select_linears
from patchsparse.pipeline import can_resume, learn_pipeline, masked_perplexity
from tests.conftest import build_tiny_llama
from tests.learn.helpers import tiny_config, tiny_windows


def _dense(model):
    return {n: l.weight.detach().clone() for n, l in select_linears(model).items()}


@pytest.mark.parametrize("reconstruct", [None, "repick", "fixed", "block"])
def test_pipeline_returns_masks_and_leaves_the_dense_weights(tiny_tokenizer, tmp_path, reconstruct):
    vocab = len(tiny_tokenizer)
    model = build_tiny_llama(vocab)
    dense = _dense(model)
    config = tiny_config("patch-tile", steps=2)
    calib = tiny_windows(vocab, n=4, seed=1)
    result = learn_pipeline(model, tiny_windows(vocab), calib, config, "sparsegpt", out_dir=tmp_path / "run",
                            reconstruct=reconstruct)
    assert not any(hasattr(l, "parametrizations") for l in select_linears(model).values())  # masks removed
    assert all(torch.equal(l.weight, dense[n]) for n, l in select_linears(model).items())
    assert result.spec.sparsity() == pytest.approx(0.35, abs=0.05)
    assert set(result.seconds) == {"prior", "learn"} | ({"reconstruct"} if reconstruct else set())
    if reconstruct is None:
        assert result.weights is None
    else:
        assert set(result.weights) == set(result.spec.layers)
        for name, weight in result.weights.items():
            keep = result.spec.layers[name].keep_mask()
            assert torch.equal(weight[~keep], torch.zeros(int((~keep).sum())))
            assert not torch.equal(weight[keep], dense[name][keep])  # the kept weights moved
    assert can_resume(tmp_path / "run")


@pytest.mark.parametrize("reconstruct", [None, "block"])
def test_weights_learned_block_wise_are_returned_under_the_masks_and_start_the_block_fit(tiny_tokenizer, reconstruct,
                                                                                       monkeypatch):
    from patchsparse import reconstruct as reconstruction
    from patchsparse.learn.blockwise import BlockwiseConfig

    vocab = len(tiny_tokenizer)
    model = build_tiny_llama(vocab)
    dense = _dense(model)
    starts = []
    fit_blocks = reconstruction.reconstruct_blocks
    monkeypatch.setattr(reconstruction, "reconstruct_blocks",
                        lambda *args, start=None, **kw: starts.append(start) or fit_blocks(*args, start=start, **kw))
    result = learn_pipeline(model, tiny_windows(vocab), tiny_windows(vocab, n=4, seed=1), tiny_config("maskllm"),
                            "sparsegpt", reconstruct=reconstruct,
                            blockwise=BlockwiseConfig(steps=4, weight_lr=1e-2))
    assert all(torch.equal(l.weight, dense[n]) for n, l in select_linears(model).items())
    assert set(result.weights) == set(result.spec.layers)
    for name, weight in result.weights.items():
        keep = result.spec.layers[name].keep_mask()
        assert torch.equal(weight[~keep], torch.zeros(int((~keep).sum())))
        assert not torch.equal(weight[keep], dense[name][keep])
    if reconstruct == "block":
        assert len(starts) == 1 and set(starts[0]) == set(result.spec.layers)
        assert all(not torch.equal(starts[0][n], dense[n]) for n in starts[0])  # the learned, not the dense, weights
    assert result.spec.metadata["weights_updated"]


def test_learning_on_fitted_2_4_weights_keeps_dense_tiles_dense_and_sparse_tiles_fitted(tiny_tokenizer):
    from patchsparse.pipeline import fitted_sparse_weights
    from patchsparse.reconstruct import BlockFit

    vocab = len(tiny_tokenizer)
    model = build_tiny_llama(vocab)
    dense = _dense(model)
    calib = tiny_windows(vocab, n=4, seed=1)
    fit = BlockFit(steps=4)
    config = tiny_config("patch-tile", steps=2)
    config = dataclasses.replace(config, mask=dataclasses.replace(config.mask, sparse_weights="fitted"))
    result = learn_pipeline(model, tiny_windows(vocab), calib, config, "sparsegpt", sparse_fit=fit)
    assert "fit 2:4" in result.seconds
    assert all(torch.equal(l.weight, dense[n]) for n, l in select_linears(model).items())
    fitted, _ = fitted_sparse_weights(model, result.prior, calib, fit)  # the same fit, done again
    some_dense = False
    for name, layer in result.spec.layers.items():
        in_dense_tiles = layer.grid.expand(layer.dense_tiles)
        keep = layer.keep_mask()
        weight = result.weights[name]
        assert torch.equal(weight[in_dense_tiles], dense[name][in_dense_tiles])
        sparse_kept = keep & ~in_dense_tiles
        assert torch.equal(weight[sparse_kept], fitted[name][sparse_kept])
        assert not torch.equal(weight[sparse_kept], dense[name][sparse_kept])
        assert not weight[~keep].any()
        some_dense |= bool(in_dense_tiles.any())
    assert some_dense


def test_fitted_2_4_weights_are_refused_with_block_wise_learning(tiny_tokenizer):
    from patchsparse.errors import PatchsparseError
    from patchsparse.learn.blockwise import BlockwiseConfig
    from patchsparse.reconstruct import BlockFit

    vocab = len(tiny_tokenizer)
    with pytest.raises(PatchsparseError, match="block-wise"):
        config = tiny_config("patch-tile", steps=2)
        config = dataclasses.replace(config, mask=dataclasses.replace(config.mask, sparse_weights="fitted"))
        learn_pipeline(build_tiny_llama(vocab), tiny_windows(vocab), tiny_windows(vocab, n=4, seed=1), config,
                       "magnitude", sparse_fit=BlockFit(steps=2), blockwise=BlockwiseConfig(steps=2))


def test_a_finished_run_resumes_to_the_same_masks_without_a_prior(tiny_tokenizer, tmp_path):
    vocab = len(tiny_tokenizer)
    config = tiny_config("patch-tile", steps=2, checkpoint_every=1)
    first = learn_pipeline(build_tiny_llama(vocab), tiny_windows(vocab), tiny_windows(vocab, n=4, seed=1), config,
                           "magnitude", out_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    again = learn_pipeline(build_tiny_llama(vocab), tiny_windows(vocab), None, config, "magnitude", out_dir=tmp_path)
    assert "prior" not in again.seconds and again.learn.steps_run == 0  # the saved prior, no calibration
    for name, layer in first.prior.items():
        assert torch.equal(layer.nm_keep, again.prior[name].nm_keep)
    for name, layer in first.spec.layers.items():
        assert torch.equal(layer.keep_mask(), again.spec.layers[name].keep_mask())


def test_masked_perplexity_uses_given_weights_and_restores(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    model = build_tiny_llama(vocab)
    dense = _dense(model)
    windows = tiny_windows(vocab, n=2)
    config = tiny_config("patch-tile", steps=1)
    result = learn_pipeline(model, tiny_windows(vocab), tiny_windows(vocab, n=4, seed=1), config, "sparsegpt",
                            reconstruct="repick")
    plain = masked_perplexity(model, result.spec, windows, "plain")
    with_weights = masked_perplexity(model, result.spec, windows, "weights", result.weights)
    assert plain != with_weights
    assert all(torch.equal(l.weight, dense[n]) for n, l in select_linears(model).items())
    # the same figure as applying the weights by hand
    with torch.no_grad():
        for name, linear in select_linears(model).items():
            linear.weight.copy_(result.weights[name])
    assert masked_perplexity(model, None, windows, "by hand") == pytest.approx(with_weights, rel=1e-6)


def test_reconstruct_command_writes_masks_and_weights_that_apply_honours(tiny_model_dir, tmp_path, capsys):
    words = "sparse dense tile mask weight group pattern keep learn model layer".split()
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) + f" {i}."
                                for i in range(60)))
    masks = tmp_path / "pruned"
    common = ["--model", str(tiny_model_dir), "--data", str(text), "--seqlen", "32", "--calib-windows", "2"]
    assert main(["prune", *common, "--method", "wanda", "--tile", "16", "16", "--sparsity", "0.3",
                 "--out", str(masks)]) == 0
    out = tmp_path / "rec"
    assert main(["reconstruct", *common, "--masks", str(masks), "--out", str(out), "--eval",
                 "--eval-windows", "2"]) == 0
    printed = capsys.readouterr().out
    assert "reconstructed" in printed and "before (the masks as saved" in printed
    spec = load_mask_spec(out)
    weights = load_updated_weights(out, spec)
    assert set(weights) == set(spec.layers) and spec.metadata["reconstruction"] == "repick"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_mask_dir(model, out)
    for name, linear in select_linears(model).items():
        assert torch.equal(linear.weight, weights[name] * spec.layers[name].keep_mask())
    # refusals: same directory, existing output
    assert main(["reconstruct", *common, "--masks", str(out), "--out", str(out)]) == 2
    assert main(["reconstruct", *common, "--masks", str(masks), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--out must differ" in err and "exists" in err


def test_reconstruct_before_figure_is_the_masks_with_their_saved_weights(tiny_model_dir, tmp_path):
    """`reconstruct --eval`'s "before" is the mask directory as saved: with SparseGPT's updated
    weights it equals what `prune --eval` measured, not the masks over the original weights."""
    import json

    words = "sparse dense tile mask weight group pattern keep learn model layer".split()
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(" ".join(words[(i * 5 + j) % len(words)] for j in range(40)) + f" {i}."
                                for i in range(60)))
    common = ["--model", str(tiny_model_dir), "--data", str(text), "--seqlen", "32", "--calib-windows", "2",
              "--eval", "--eval-windows", "2"]
    masks = tmp_path / "sgpt"
    assert main(["prune", *common, "--method", "sparsegpt", "--out", str(masks),
                 "--json", str(tmp_path / "prune.json")]) == 0
    assert load_updated_weights(masks, load_mask_spec(masks))           # the update is saved beside the masks
    assert main(["reconstruct", *common, "--masks", str(masks), "--out", str(tmp_path / "rec"), "--mode", "fixed",
                 "--json", str(tmp_path / "rec.json")]) == 0
    pruned = json.loads((tmp_path / "prune.json").read_text())["figures"]["perplexity"]["perplexity"]
    before = json.loads((tmp_path / "rec.json").read_text())["figures"]["perplexity_before"]
    assert before == pytest.approx(pruned, rel=1e-5)


def test_reconstruct_block_continues_from_the_saved_weights(tiny_model_dir, tmp_path, monkeypatch):
    """`reconstruct --mode block` on a SparseGPT directory starts its fit from SparseGPT's weights,
    with the fit's settings from the command line, and the result is saved as masks + weights."""
    import patchsparse.cli.reconstruct as command

    words = "sparse dense tile mask weight group pattern keep learn model layer".split()
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(" ".join(words[(i * 3 + j) % len(words)] for j in range(40)) + f" {i}."
                                for i in range(60)))
    common = ["--model", str(tiny_model_dir), "--data", str(text), "--seqlen", "32", "--calib-windows", "2"]
    masks = tmp_path / "sgpt"
    assert main(["prune", *common, "--method", "sparsegpt", "--out", str(masks)]) == 0
    saved = load_updated_weights(masks, load_mask_spec(masks))
    seen = {}
    real = command.reconstruct_model

    def spy(model, spec, calib, mode, **kwargs):
        seen.update(mode=mode, fit=kwargs["block_fit"], start=kwargs["start"])
        return real(model, spec, calib, mode, **kwargs)

    monkeypatch.setattr(command, "reconstruct_model", spy)
    out = tmp_path / "rec"
    assert main(["reconstruct", *common, "--masks", str(masks), "--out", str(out), "--mode", "block",
                 "--block-steps", "3", "--block-lr", "0.002", "--block-windows", "1"]) == 0
    assert seen["mode"] == "block" and (seen["fit"].steps, seen["fit"].lr, seen["fit"].windows_per_step) == (3, 0.002, 1)
    assert set(seen["start"]) == set(saved) and all(torch.equal(seen["start"][n], saved[n]) for n in saved)
    spec = load_mask_spec(out)
    weights = load_updated_weights(out, spec)
    assert spec.metadata["reconstruction"] == "block" and spec.metadata["reconstruction_steps_per_block"] == 3
    assert any(not torch.equal(weights[n], saved[n]) for n in saved)  # the fit moved SparseGPT's weights
    with pytest.raises(SystemExit) as refused:  # argparse's own one-line error
        main(["reconstruct", *common, "--masks", str(masks), "--out", str(tmp_path / "bad"), "--mode", "block",
              "--block-lr", "0"])
    assert refused.value.code == 2 and not (tmp_path / "bad").exists()


def test_a_saved_learning_run_with_other_settings_is_discarded_not_resumed(tiny_tokenizer, tmp_path):
    """`run` redoing its PATCH step with other learning settings (say a new default) starts that
    run afresh instead of failing to resume it; the same settings keep it; other files stay."""
    from dataclasses import replace as dc_replace

    from patchsparse.errors import PatchsparseError
    from patchsparse.learn.trainer import PRIOR_FILE, RUN_FILE
    from patchsparse.pipeline import discard_other_run
    from tests.learn.helpers import tiny_prior

    model = build_tiny_llama(len(tiny_tokenizer))
    config = tiny_config("patch-tile", steps=2, checkpoint_every=1)
    learn_pipeline(model, tiny_windows(len(tiny_tokenizer)), None, config, "magnitude",
                   prior=tiny_prior(model), out_dir=tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "dense.json").write_text("{}")
    assert (tmp_path / CHECKPOINT_FILE).is_file() and (tmp_path / PRIOR_FILE).is_file()
    assert not discard_other_run(tmp_path, config)                       # same settings: kept
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    other = dc_replace(config, mask=dc_replace(config.mask, init_allocation="edges"))
    with pytest.raises(PatchsparseError, match="init_allocation"):      # what resuming it would do
        learn_pipeline(model, tiny_windows(len(tiny_tokenizer)), None, other, "magnitude", out_dir=tmp_path)
    assert discard_other_run(tmp_path, other)
    assert not any((tmp_path / n).exists() for n in (CHECKPOINT_FILE, PRIOR_FILE, RUN_FILE))
    assert (tmp_path / "results" / "dense.json").is_file()


def test_oneshot_blocks_prunes_the_middle_blocks_and_fits_from_the_pruners_update(tiny_tokenizer, monkeypatch):
    from patchsparse import reconstruct as reconstruction
    from patchsparse.pipeline import oneshot_blocks
    from patchsparse.prior.oneshot import prune_model
    from patchsparse.reconstruct import BlockFit

    vocab = len(tiny_tokenizer)
    model = build_tiny_llama(vocab, layers=4)
    dense = _dense(model)
    calib = tiny_windows(vocab, n=4, seed=1)
    fits = []
    fit_blocks = reconstruction.reconstruct_blocks
    monkeypatch.setattr(reconstruction, "reconstruct_blocks", lambda model, spec, windows, fit, start=None:
                        fits.append((fit, start)) or fit_blocks(model, spec, windows, fit, start=start))
    # 4 equal blocks: 2 at 2:4 give 25% (nearest 0.3); the first and last stay dense
    result = oneshot_blocks(model, calib, 0.3, block_fit=BlockFit(steps=3))
    assert result.sparse_blocks == [1, 2] and result.sparsity == pytest.approx(0.25)
    assert {n.split(".")[2] for n in result.spec.layers} == {"1", "2"}
    assert all(torch.equal(l.weight, dense[n]) for n, l in select_linears(model).items())  # dense weights back
    [(fit, start)] = fits
    assert fit.steps == 3 and result.spec.metadata["reconstruction_steps_per_block"] == 3
    # the fit starts from SparseGPT's own update of those blocks, not from the dense weights under the masks
    from patchsparse.prior.allocation import block_selection
    pruned = prune_model(model, calib, "sparsegpt", "2:4", selection=block_selection("model.layers", [1, 2]))
    for name, linear in select_linears(model, block_selection("model.layers", [1, 2])).items():
        assert torch.equal(start[name], linear.weight.detach().cpu())
        assert torch.equal(pruned.layers[name].keep_mask(), result.spec.layers[name].keep_mask())
        keep = result.spec.layers[name].keep_mask()
        assert not result.weights[name][~keep].any() and not torch.equal(result.weights[name], start[name])


def test_oneshot_blocks_refuses_a_target_nearer_no_block_than_one(tiny_tokenizer):
    from patchsparse.errors import PatchsparseError
    from patchsparse.pipeline import oneshot_blocks

    model = build_tiny_llama(len(tiny_tokenizer), layers=4)
    with pytest.raises(PatchsparseError, match="closer to no 2:4 block"):
        oneshot_blocks(model, tiny_windows(len(tiny_tokenizer), n=2), 0.05)


def test_learn_pipeline_hands_its_block_fit_to_the_reconstruction(tiny_tokenizer, monkeypatch):
    from patchsparse import reconstruct as reconstruction
    from patchsparse.reconstruct import BlockFit

    vocab = len(tiny_tokenizer)
    fits = []
    fit_blocks = reconstruction.reconstruct_blocks
    monkeypatch.setattr(reconstruction, "reconstruct_blocks", lambda model, spec, windows, fit, start=None:
                        fits.append(fit) or fit_blocks(model, spec, windows, fit, start=start))
    result = learn_pipeline(build_tiny_llama(vocab), tiny_windows(vocab), tiny_windows(vocab, n=4, seed=1),
                            tiny_config("patch-tile", steps=2), "sparsegpt", reconstruct="block",
                            block_fit=BlockFit(steps=5))
    assert [f.steps for f in fits] == [5] and result.spec.metadata["reconstruction_steps_per_block"] == 5


def test_masks_without_learning_take_over_a_folder_from_a_learning_run(tmp_path):
    from patchsparse.learn.trainer import METRICS_FILE, PRIOR_FILE
    from patchsparse.pipeline import discard_other_run

    assert not discard_other_run(tmp_path, None)  # nothing there
    (tmp_path / PRIOR_FILE).write_bytes(b"x")
    (tmp_path / METRICS_FILE).write_text("{}\n")
    (tmp_path / "summary.md").write_text("kept")
    assert discard_other_run(tmp_path, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]
