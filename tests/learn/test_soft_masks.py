import math

import pytest
import torch

from patchsparse.learn.masked import _AddToLoss
from patchsparse.learn.noise import NoiseTable, gumbel_table, noise_offset
from patchsparse.learn.soft_masks import (
    flush_subnormal,
    hybrid_soft_weight,
    soft_kept,
    soft_nm_mask,
    soft_pattern_weights,
    soft_tile_values,
    tile_lerp,
)
from patchsparse.masks import PATTERNS_2_4, TileGrid


def test_soft_nm_mask_has_density_exactly_half():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 6, generator=g) * 3
    noise = gumbel_table(6 * 5 * 6, seed=1).view(6, 5, 6)
    for tau in (4.0, 1.0, 0.05):
        m = soft_nm_mask(logits, noise, kappa=100.0, tau=tau)
        assert m.shape == (6, 20)
        sums = m.view(6, 5, 4).sum(-1)
        torch.testing.assert_close(sums, torch.full_like(sums, 2.0), atol=1e-6, rtol=0)
        assert 0.0 <= float(m.min()) and float(m.max()) <= 1.0 + 1e-6


def test_soft_pattern_weights_hand_values():
    # equal logits: uniform over six patterns -> every position kept with probability 1/2
    y = soft_pattern_weights(torch.zeros(1, 6), None, kappa=100.0, tau=4.0)
    torch.testing.assert_close(y, torch.full((1, 6), 1 / 6))
    # logits (1, 0, 0, 0, 0, 0), κ = 2, τ = 1: softmax of (2, 0, 0, 0, 0, 0)
    y = soft_pattern_weights(torch.tensor([[1.0, 0, 0, 0, 0, 0]]), None, kappa=2.0, tau=1.0)
    e = math.exp(2.0)
    torch.testing.assert_close(y[0, 0], torch.tensor(e / (e + 5)))
    # the noise is added before scaling by 1/τ: (κΠ + g)/τ, not κΠ/τ + g
    noise = torch.tensor([[0.0, 2.0, 0, 0, 0, 0]])
    y = soft_pattern_weights(torch.tensor([[1.0, 0, 0, 0, 0, 0]]), noise, kappa=2.0, tau=2.0)
    torch.testing.assert_close(y[0, 0], y[0, 1])  # (2 + 0)/2 == (0 + 2)/2



def test_the_temperature_sharpens_the_pattern_softmax():
    # logits (1, 0, 0, 0, 0, 0), κ = 2, τ = 0.5: softmax of (4, 0, 0, 0, 0, 0), not of (2, 0, …)
    e4 = math.exp(4.0)
    y = soft_pattern_weights(torch.tensor([[1.0, 0, 0, 0, 0, 0]]), None, kappa=2.0, tau=0.5)
    torch.testing.assert_close(y, torch.tensor([[e4, 1, 1, 1, 1, 1]]) / (e4 + 5))
    # with noise g = (0, 2, 0, …): (κΠ + g)/τ = (4, 4, 0, 0, 0, 0)
    y = soft_pattern_weights(torch.tensor([[1.0, 0, 0, 0, 0, 0]]), torch.tensor([[0.0, 2.0, 0, 0, 0, 0]]),
                             kappa=2.0, tau=0.5)
    torch.testing.assert_close(y, torch.tensor([[e4, e4, 1, 1, 1, 1]]) / (2 * e4 + 4))
    # the mask: inputs 0 and 1 are in pattern 0 and two others each, inputs 2 and 3 in three others
    m = soft_nm_mask(torch.tensor([[[1.0, 0, 0, 0, 0, 0]]]), None, kappa=2.0, tau=0.5)
    torch.testing.assert_close(m, torch.tensor([[e4 + 2, e4 + 2, 3, 3]]) / (e4 + 5))
    # and a high temperature flattens it towards keeping every input with probability 1/2
    m = soft_nm_mask(torch.tensor([[[1.0, 0, 0, 0, 0, 0]]]), None, kappa=2.0, tau=200.0)
    torch.testing.assert_close(m, torch.full((1, 4), 0.5), atol=2e-3, rtol=0)

def test_hard_patterns_are_one_hot_with_soft_gradient():
    logits = torch.tensor([[0.3, 0.1, -0.2, 0.5, 0.0, 0.05]], requires_grad=True)
    y_hard = soft_pattern_weights(logits, None, kappa=10.0, tau=1.0, hard=True)
    assert y_hard.tolist() == [[0, 0, 0, 1, 0, 0]]
    (y_hard * torch.arange(6.0)).sum().backward()
    g_hard = logits.grad.clone()
    logits.grad = None
    (soft_pattern_weights(logits, None, kappa=10.0, tau=1.0) * torch.arange(6.0)).sum().backward()
    torch.testing.assert_close(g_hard, logits.grad)


def test_soft_tile_values_hand_value():
    # σ((κℓ + g)/τ) with κ = 2, ℓ = 0.5, g = 1, τ = 2 -> σ(1)
    t = soft_tile_values(torch.tensor([[0.5]]), torch.tensor([[1.0]]), kappa=2.0, tau=2.0)
    torch.testing.assert_close(t, torch.sigmoid(torch.tensor([[1.0]])))


@pytest.mark.parametrize("shape,tile", [((8, 16), (4, 8)), ((10, 20), (4, 8)), ((3, 12), (4, 8)), ((7, 4), (2, 4))])
def test_tile_lerp_matches_materialised_tiles(shape, tile):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    grid = TileGrid.for_weight(a, tile)
    t = torch.rand(*grid.shape, generator=g)
    expected = a + grid.expand(t) * (b - a)
    torch.testing.assert_close(tile_lerp(a, b, t, grid), expected)


def _layer_fixture(shape=(10, 24), tile=(4, 8)):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(*shape, generator=g, dtype=torch.float64)
    grid = TileGrid.for_weight(weight, tile)  # ragged in both directions: 3 x 3 tiles
    x = torch.randn(5, shape[1], generator=g, dtype=torch.float64)
    r = torch.randn(5, shape[0], generator=g, dtype=torch.float64)
    return weight, grid, x, r


def test_tile_logit_gradient_matches_finite_differences():
    weight, grid, x, r = _layer_fixture()
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    noise = torch.randn(*grid.shape, dtype=torch.float64)
    logits = (torch.randn(*grid.shape, dtype=torch.float64) * 0.1).requires_grad_(True)

    def loss(tile_logits):
        t = soft_tile_values(tile_logits, noise, kappa=5.0, tau=0.7)
        w = hybrid_soft_weight(weight, keep.to(torch.float64), t, grid)
        return (torch.nn.functional.linear(x, w) * r).sum()

    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-6)
    # and an explicit central difference on one ragged edge tile
    loss(logits).backward()
    eps = 1e-6
    plus, minus = logits.detach().clone(), logits.detach().clone()
    plus[2, 2] += eps
    minus[2, 2] -= eps
    numeric = (loss(plus) - loss(minus)) / (2 * eps)
    assert float(logits.grad[2, 2]) == pytest.approx(float(numeric), rel=1e-6, abs=1e-9)


def test_pattern_logit_gradient_matches_finite_differences():
    weight, grid, x, r = _layer_fixture(shape=(4, 8), tile=(2, 4))
    logits = (torch.randn(4, 2, 6, dtype=torch.float64) * 0.1).requires_grad_(True)
    tiles = torch.rand(*grid.shape, dtype=torch.float64)
    noise = torch.randn(4, 2, 6, dtype=torch.float64)

    def loss(pattern_logits):
        m = soft_nm_mask(pattern_logits, noise, kappa=3.0, tau=0.9)
        return (torch.nn.functional.linear(x, hybrid_soft_weight(weight, m, tiles, grid)) * r).sum()

    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-6)


def test_soft_kept_equals_the_sum_of_the_materialised_mask():
    weight, grid, _, _ = _layer_fixture()
    logits = torch.randn(10, 6, 6, dtype=torch.float64)
    m = soft_nm_mask(logits, None, kappa=1.0, tau=1.0)
    t = torch.rand(*grid.shape, dtype=torch.float64)
    full = grid.expand(t) + (1 - grid.expand(t)) * m
    density = torch.full(grid.shape, 0.5, dtype=torch.float64)
    kept = soft_kept(t, density, grid.tile_numel().to(torch.float64))
    torch.testing.assert_close(kept, full.sum())


def test_injected_loss_term_has_the_gradient_of_the_term():
    w = torch.randn(3, 4, dtype=torch.float64)
    p = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    masked = w * torch.sigmoid(p)
    out = _AddToLoss.apply(masked, masked.norm(), -0.7)
    (out * 2.0).sum().backward()
    injected = p.grad.clone()
    p.grad = None
    masked = w * torch.sigmoid(p)
    ((masked * 2.0).sum() - 0.7 * masked.norm()).backward()
    torch.testing.assert_close(injected, p.grad)


def test_noise_windows_are_deterministic_and_gumbel():
    table = NoiseTable(1 << 16, seed=5)
    a, b = table.window(3, 7, 100), table.window(3, 7, 100)
    assert torch.equal(a, b)
    assert not torch.equal(a, table.window(4, 7, 100))
    assert noise_offset(5, 3, 7, 1000) == noise_offset(5, 3, 7, 1000)
    sample = gumbel_table(200_000, seed=0)
    assert float(sample.mean()) == pytest.approx(0.5772, abs=0.01)          # Euler–Mascheroni
    assert float(sample.var()) == pytest.approx(math.pi ** 2 / 6, rel=0.02)
    logistic = NoiseTable(1 << 18, seed=1).logistic(0, 0, 100_000)
    assert float(logistic.var()) == pytest.approx(math.pi ** 2 / 3, rel=0.03)


def test_flush_subnormal_zeroes_only_subnormals():
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([tiny, tiny / 4, -tiny / 2, 0.0, 1e-30, -1.0])
    flushed = flush_subnormal(x)
    assert flushed.tolist() == [tiny, 0.0, 0.0, 0.0, pytest.approx(1e-30), -1.0]


def test_fitted_sparse_weights_fill_the_2_4_part_only():
    """lerp(W_s ⊙ M, W, t) per tile: a dense tile keeps W, a sparse one W_s under the 2:4 mask."""
    grid = TileGrid(2, 8, 2, 4)                       # two tiles side by side
    weight = torch.arange(1.0, 17.0).view(2, 8)
    fitted = -weight                                 # easy to tell apart
    mask = torch.tensor([[1.0, 1, 0, 0] * 2] * 2)
    tiles = torch.tensor([[1.0, 0.0]])
    out = hybrid_soft_weight(weight, mask, tiles, grid, fitted)
    assert torch.equal(out[:, :4], weight[:, :4])
    assert torch.equal(out[:, 4:], (fitted * mask)[:, 4:])
    half = hybrid_soft_weight(weight, mask, torch.tensor([[0.5, 0.5]]), grid, fitted)
    assert torch.equal(half, 0.5 * weight + 0.5 * fitted * mask)
    assert torch.equal(hybrid_soft_weight(weight, mask, tiles, grid), hybrid_soft_weight(weight, mask, tiles, grid, None))
