"""One-shot pruning on the embedded default model (slower; still runs in CI)."""

import json
import math

import pytest
import torch

from patchsparse.cli.main import main
from patchsparse.data import load_corpus, random_windows, tokenize_texts
from patchsparse.models import load_model
from patchsparse.prior.pattern import PrunePattern
from patchsparse.prior.pruners import magnitude_mask, sparsegpt_prune, wanda_mask
from patchsparse.prior.stats import HessianStat, InputNormStat

pytestmark = pytest.mark.e2e


def test_sparsegpt_2_4_with_eval(tmp_path, capsys):
    record = tmp_path / "r.json"
    argv = ["prune", "--method", "sparsegpt", "--pattern", "2:4", "--eval", "--calib-windows", "2",
            "--seqlen", "128", "--eval-windows", "2", "--device", "cpu", "--json", str(record)]
    assert main(argv) == 0
    assert "pruned smollm2-135m" in capsys.readouterr().out
    figures = json.loads(record.read_text())["figures"]
    assert figures["sparsity"] == pytest.approx(0.5) and figures["weights_updated"]
    assert set(figures["per_projection_sparsity"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"}
    # 2:4 on a 135M model costs a lot of perplexity, but the model must still be a language model
    assert math.isfinite(figures["perplexity"]["perplexity"]) and figures["perplexity"]["perplexity"] < 5000


def test_reconstruction_order_on_a_real_layer():
    """Layer 2 of SmolLM2 on real calibration text: SparseGPT < Wanda < magnitude, per linear."""
    loaded = load_model("smollm2-135m", device="cpu")
    ids = tokenize_texts(loaded.tokenizer, load_corpus("default").train)
    windows = random_windows(ids, 4, 128, seed=0)
    block = loaded.model.model.layers[2]
    linears = {"q_proj": block.self_attn.q_proj, "o_proj": block.self_attn.o_proj,
               "up_proj": block.mlp.up_proj, "down_proj": block.mlp.down_proj}
    inputs = {name: [] for name in linears}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: inputs[n].append(args[0].reshape(-1, args[0].shape[-1])))
               for name, m in linears.items()]
    with torch.no_grad():
        loaded.model(input_ids=windows)
    for h in handles:
        h.remove()
    pattern = PrunePattern.nm(2, 4)
    for name, linear in linears.items():
        X, W = torch.cat(inputs[name]), linear.weight
        hessian, norms = HessianStat(X.shape[1]), InputNormStat(X.shape[1])
        hessian.accumulate(X)
        norms.accumulate(X)

        def error(W_hat):
            return float((X @ W.T - X @ W_hat.T).norm() / (X @ W.T).norm())

        magnitude = error(W * magnitude_mask(W, pattern))
        wanda = error(W * wanda_mask(W, norms.norms(), pattern))
        sparsegpt = error(sparsegpt_prune(W, hessian.hessian, pattern)[1])
        assert sparsegpt < wanda < magnitude, (name, sparsegpt, wanda, magnitude)
