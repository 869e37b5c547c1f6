import json

import pytest
import torch

from patchsparse.cli.main import main
from patchsparse.data import load_corpus, sequential_windows, tokenize_texts
from patchsparse.evaluate import evaluate_perplexity
from patchsparse.io.maskfile import WEIGHTS_TENSORS, apply_mask_dir, load_mask_spec
from patchsparse.models import load_model

BASE = ["prune", "--seqlen", "32", "--calib-windows", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_text_file(tmp_path_factory):
    """Distinct paragraphs, so that the training split (calibration) is not empty."""
    from tests.conftest import TINY_TEXT

    sentences = [p for p in TINY_TEXT.split("\n\n") if p.strip()][:3]
    path = tmp_path_factory.mktemp("data") / "numbered.txt"
    path.write_text("\n\n".join(f"Note {i}. {sentences[i % 3]}" for i in range(120)))
    return path


def fresh_model_perplexity(model_dir, text_file, prepare):
    loaded = load_model(str(model_dir), device="cpu")
    prepare(loaded.model)
    ids = tokenize_texts(loaded.tokenizer, load_corpus(str(text_file)).eval)
    return evaluate_perplexity(loaded.model, sequential_windows(ids, 32, 2)).perplexity


@pytest.mark.parametrize("update", [True, False])
def test_prune_saves_what_reproduces_the_evaluated_model(update, tiny_model_dir, tiny_text_file, tmp_path, capsys):
    out, record = tmp_path / "masks", tmp_path / "r.json"
    argv = BASE + ["--model", str(tiny_model_dir), "--data", str(tiny_text_file), "--method", "sparsegpt",
                   "--pattern", "2:4", "--out", str(out), "--eval", "--eval-windows", "2", "--json", str(record)]
    assert main(argv + ([] if update else ["--no-update"])) == 0
    printed = capsys.readouterr().out
    assert "sparsity 0.5000" in printed and "perplexity" in printed
    figures = json.loads(record.read_text())["figures"]
    assert figures["sparsity"] == pytest.approx(0.5) and figures["weights_updated"] is update
    assert (out / WEIGHTS_TENSORS).is_file() is update

    def prepare(model):
        spec = apply_mask_dir(model, out)  # checks the fingerprint of the original weights
        assert spec.metadata["method"] == "sparsegpt" and spec.sparsity() == pytest.approx(0.5)

    reproduced = fresh_model_perplexity(tiny_model_dir, tiny_text_file, prepare)
    assert reproduced == pytest.approx(figures["perplexity"]["perplexity"], rel=1e-5)
    # and through the CLI: `eval --masks` on the base model gives the same perplexity
    again = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tiny_text_file), "--seqlen", "32",
                 "--max-windows", "2", "--device", "cpu", "--masks", str(out), "--json", str(again)]) == 0
    assert json.loads(again.read_text())["figures"]["perplexity"] == pytest.approx(reproduced, rel=1e-5)


def test_prune_hybrid_tiles_and_overwrite(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "hybrid"
    argv = BASE + ["--model", str(tiny_model_dir), "--data", str(tiny_text_file), "--method", "wanda",
                   "--tile", "16", "16", "--sparsity", "0.3", "--out", str(out)]
    assert main(argv) == 0
    spec = load_mask_spec(out)
    assert spec.sparsity() == pytest.approx(0.3, abs=0.03)
    assert all(m.tile == (16, 16) and m.dense_tiles is not None for m in spec.layers.values())
    assert not (out / WEIGHTS_TENSORS).exists()  # Wanda keeps the original weights
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--method", "magnitude"]) == 0
    assert load_mask_spec(out).metadata["method"] == "magnitude"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_tokenizer):
    """GPT-2 keeps its projections in Conv1D modules: it has decoder blocks but no decoder nn.Linear."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("extra, message", [
    (["--pattern", "2:4", "--sparsity", "0.3"], "2:4 means sparsity 0.5"),
    (["--pattern", "unstructured", "--sparsity", "1.0"], "[0, 1)"),
    (["--pattern", "unstructured"], "needs a sparsity"),
    (["--tile", "16", "16", "--sparsity", "0.6"], "outside [0, 0.5]"),
    (["--tile", "16", "16"], "--tile needs --sparsity"),
    (["--pattern", "4:4"], "0 < N < M"),
    (["--pattern", "5:4"], "0 < N < M"),
    (["--pattern", "2-4"], "unknown pattern"),
    (["--tile", "16", "6", "--sparsity", "0.3"], "multiple of 4"),
    (["--calib-windows", "0"], "--calib-windows must be at least 1"),
    (["--method", "obs"], "unknown pruning method"),
    (["--pattern", "3:7", "--method", "wanda"], "not divisible by M=7"),
    (["--pattern", "3:7"], "block size 128 must be a multiple of M=7"),
    (["--damp", "-1"], "damping must be >= 0"),
    (["--model", "{gpt2}"], "no decoder linear layers"),
    (["--allocation", "owl"], "--allocation needs --sparsity"),
    (["--allocation", "edges", "--sparsity", "0.6"], "outside [0, 0.5]"),
    (["--allocation", "edges", "--sparsity", "0.3", "--tile", "16", "16"], "choose one"),
    (["--allocation", "edges", "--pattern", "unstructured", "--sparsity", "0.3"], "50% N:M pattern"),
    (["--allocation", "edges", "--sparsity", "0.1"], "closer to no 2:4 block"),  # 2 blocks: round(0.4) = 0
])
def test_bad_input_is_one_line(extra, message, tiny_model_dir, tiny_text_file, gpt2_dir, tmp_path, capsys):
    out = tmp_path / "never"
    argv = BASE + ["--model", str(tiny_model_dir), "--data", str(tiny_text_file), "--out", str(out)] + extra
    code = main([str(gpt2_dir) if a == "{gpt2}" else a for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("patchsparse: error:") and message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("allocation", ["edges", "owl"])
def test_prune_whole_blocks_by_allocation(allocation, tiny_model_dir, tiny_text_file, tmp_path, capsys):
    out, record = tmp_path / allocation, tmp_path / "r.json"
    argv = BASE + ["--model", str(tiny_model_dir), "--data", str(tiny_text_file), "--method", "wanda",
                   "--allocation", allocation, "--sparsity", "0.25", "--out", str(out), "--json", str(record)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    figures = json.loads(record.read_text())["figures"]
    # two equal blocks: one at 2:4 gives exactly 25% over the model; edges keeps the first dense
    assert len(figures["sparse_blocks"]) == 1 and figures["model_sparsity"] == pytest.approx(0.25)
    assert figures["sparsity"] == pytest.approx(0.5) and "over all decoder linears: 0.2500" in printed
    if allocation == "edges":
        assert figures["sparse_blocks"] == [1]
    block = figures["sparse_blocks"][0]
    spec = load_mask_spec(out)
    assert spec.layers and all(f".layers.{block}." in name for name in spec.layers)
    assert spec.metadata["block_allocation"] == allocation and spec.metadata["sparse_blocks"] == [block]
    assert apply_mask_dir(load_model(str(tiny_model_dir), device="cpu").model, out).sparsity() == pytest.approx(0.5)
