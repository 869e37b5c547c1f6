import torch

from patchsparse.prior.stats import HessianStat, InputNormStat


def batches():
    g = torch.Generator().manual_seed(0)
    # uneven batch shapes (B, T, in), as layer calls see them
    return [torch.randn(2, 5, 6, generator=g), torch.randn(1, 5, 6, generator=g) * 3, torch.randn(3, 2, 6, generator=g)]


def test_hessian_is_two_over_n_xtx():
    stat = HessianStat(6)
    for x in batches():
        stat.accumulate(x)
    X = torch.cat([x.reshape(-1, 6) for x in batches()]).double()  # (n, in), n = 10 + 5 + 6 tokens
    n = X.shape[0]
    assert stat.tokens == n == 21
    expected = 2.0 / n * X.T @ X
    torch.testing.assert_close(stat.hessian.double(), expected, rtol=1e-5, atol=1e-6)
    # not XᵀX/n, not the unnormalised sum, not 2/(number of windows)·XᵀX
    assert not torch.allclose(stat.hessian.double(), X.T @ X / n, rtol=1e-2)


def test_hessian_by_hand():
    stat = HessianStat(2)
    stat.accumulate(torch.tensor([[1.0, 2.0]]))
    stat.accumulate(torch.tensor([[[3.0, 0.0], [0.0, 1.0]]]))
    # XᵀX = [[1+9, 2], [2, 4+1]], n = 3 tokens
    assert torch.allclose(stat.hessian, 2.0 / 3.0 * torch.tensor([[10.0, 2.0], [2.0, 5.0]]))


def test_input_norms_are_l2_over_all_tokens():
    stat = InputNormStat(6)
    for x in batches():
        stat.accumulate(x)
    X = torch.cat([x.reshape(-1, 6) for x in batches()])
    assert stat.tokens == 21
    torch.testing.assert_close(stat.norms(), X.norm(dim=0))
    hand = InputNormStat(2)
    hand.accumulate(torch.tensor([[3.0, 1.0], [4.0, 1.0]]))
    assert torch.allclose(hand.norms(), torch.tensor([5.0, 2.0 ** 0.5]))
