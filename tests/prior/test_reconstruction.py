"""On a real layer, the better pruners reconstruct the layer's output better: SparseGPT < Wanda < magnitude."""

import pytest
import torch

from patchsparse.prior.pattern import PrunePattern
from patchsparse.prior.pruners import magnitude_mask, sparsegpt_prune, wanda_mask
from patchsparse.prior.stats import HessianStat, InputNormStat


def structured_inputs(d: int, seed: int, tokens: int = 512) -> torch.Tensor:
    """Correlated features with heavy-tailed scales, like LLM activations (a few large channels)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(d, generator=g))
    mix = torch.eye(d) + torch.randn(d, d, generator=g) / d ** 0.5
    return (torch.randn(tokens, d, generator=g) @ mix) * scales  # (tokens, d)


def output_error(X, W, W_hat):
    """‖XWᵀ − XŴᵀ‖ relative to ‖XWᵀ‖"""
    return float((X @ W.T - X @ W_hat.T).norm() / (X @ W.T).norm())


@pytest.mark.parametrize("layer", ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"])
@pytest.mark.parametrize("pattern", [PrunePattern.nm(2, 4), PrunePattern.nm(4, 8), PrunePattern.unstructured(0.5)],
                         ids=lambda p: p.label)
def test_sparsegpt_beats_wanda_beats_magnitude(tiny_model, layer, pattern):
    W = dict(tiny_model.named_modules())[layer].weight
    X = structured_inputs(W.shape[1], seed=0)
    hessian, norms = HessianStat(W.shape[1]), InputNormStat(W.shape[1])
    hessian.accumulate(X)
    norms.accumulate(X)
    magnitude = output_error(X, W, W * magnitude_mask(W, pattern))
    wanda = output_error(X, W, W * wanda_mask(W, norms.norms(), pattern))
    keep, updated = sparsegpt_prune(W, hessian.hessian, pattern)
    sparsegpt = output_error(X, W, updated)
    assert torch.all(updated[~keep] == 0) and 1.0 - keep.float().mean() == pytest.approx(0.5, abs=0.01)
    assert sparsegpt < wanda < magnitude, (sparsegpt, wanda, magnitude)
