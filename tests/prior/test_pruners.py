import pytest
import torch
from hypothesis import given, settings, strategies as st

from patchsparse.errors import PatchsparseError
from patchsparse.masks.patterns import is_nm
from patchsparse.prior.pattern import PrunePattern
from patchsparse.prior.pruners import (
    SparseGPTOptions, magnitude_mask, sparsegpt_prune, wanda_mask, wanda_scores)
from patchsparse.prior.stats import HessianStat, InputNormStat


def norms_of(X):
    stat = InputNormStat(X.shape[-1])
    stat.accumulate(X)
    return stat.norms()


def hessian_of(X):
    stat = HessianStat(X.shape[-1])
    stat.accumulate(X)
    return stat.hessian


# ---------------------------------------------------------------- magnitude

def test_magnitude_unstructured_uses_one_threshold_per_layer():
    W = torch.tensor([[4.0, -3.0, 2.0, 1.0], [8.0, 7.0, -6.0, 5.0]])
    keep = magnitude_mask(W, PrunePattern.unstructured(0.5))
    assert keep.tolist() == [[False] * 4, [True] * 4]  # per row would keep two in each row


def test_magnitude_2_4_by_hand():
    W = torch.tensor([[0.1, -0.9, 0.5, 0.3, 2.0, 1.0, -3.0, 0.0]])
    assert magnitude_mask(W, PrunePattern.nm(2, 4)).tolist() == [[False, True, True, False, True, False, True, False]]


# ---------------------------------------------------------------- Wanda

# Two calibration tokens over four input features a, b, c, d:
#   ‖x‖₂ = (3, 2.83, 4, 1.41), ‖x‖₂² = (9, 8, 16, 2), mean|x| = (1.5, 2, 2, 1)
WANDA_X = torch.tensor([[3.0, 2.0, 4.0, 1.0], [0.0, 2.0, 0.0, 1.0]])
WANDA_W = torch.tensor([[1.0, -1.1, -1.0, 2.5]])


def test_wanda_score_is_abs_weight_times_l2_norm():
    norms = norms_of(WANDA_X)
    torch.testing.assert_close(wanda_scores(WANDA_W, norms),
                               torch.tensor([[3.0, 1.1 * 8 ** 0.5, 4.0, 2.5 * 2 ** 0.5]]))
    # 1:2 makes each pair (a, b), (c, d) a comparison:
    #   |W|·‖x‖₂  = 3 < 3.11 and 4 > 3.54   -> keep b, c   (correct)
    #   |W|·‖x‖₂² = 9 > 8.8  and 16 > 5     -> keep a, c
    #   |W|·mean|x| = 1.5 < 2.2 and 2 < 2.5 -> keep b, d
    #   |W| alone  = 1 < 1.1 and 1 < 2.5    -> keep b, d
    #   W·‖x‖₂ (no abs) = 3 > -3.11, -4 < 3.54 -> keep a, d
    keep = wanda_mask(WANDA_W, norms, PrunePattern.nm(1, 2))
    assert keep.tolist() == [[False, True, True, False]]


def test_wanda_unstructured_prunes_per_row():
    W = torch.tensor([[4.0, 3.0, 2.0, 1.0], [8.0, 7.0, 6.0, 5.0]])
    norms = norms_of(torch.eye(4))  # equal norms: the per-row rule alone decides
    keep = wanda_mask(W, norms, PrunePattern.unstructured(0.5))
    assert keep.tolist() == [[True, True, False, False]] * 2
    # the input norm can overturn the weight order within a row
    norms = norms_of(torch.diag(torch.tensor([1.0, 1.0, 10.0, 1.0])))
    assert wanda_mask(W, norms, PrunePattern.unstructured(0.5)).tolist() == [[True, False, True, False]] * 2


# ---------------------------------------------------------------- SparseGPT

def sparsegpt_2x2_expected(w, H):
    """Hand formulas for two columns, U = upper Cholesky factor of H⁻¹:
    U11² = H22/det and U22² = 1/H22, so the scores are w1²·det/H22 and w2²·H22; pruning
    column 1 moves its error onto column 2 as w2 + w1·H12/H22 (the least-squares optimum),
    pruning column 2 leaves column 1 as it is (no later column to update)."""
    (a, b), (_, c) = H.tolist()
    det = a * c - b * b
    s1, s2 = w[0] ** 2 * det / c, w[1] ** 2 * c
    if s1 >= s2:
        return [True, False], [w[0], 0.0]
    return [False, True], [0.0, w[1] + w[0] * b / c]


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_sparsegpt_two_columns_by_hand(damp):
    H = torch.tensor([[4.0, 1.5], [1.5, 1.0]])
    W = torch.tensor([[1.0, 1.2], [0.5, 1.0]])
    keep, updated = sparsegpt_prune(W, H, PrunePattern.nm(1, 2), SparseGPTOptions(damp=damp, blocksize=2))
    damped = H + damp * H.diagonal().mean() * torch.eye(2)
    for row in range(2):
        exp_keep, exp_w = sparsegpt_2x2_expected(W[row].tolist(), damped)
        assert keep[row].tolist() == exp_keep
        torch.testing.assert_close(updated[row], torch.tensor(exp_w))
    if damp == 0.0:
        # row 1 keeps the smaller weight 1.0 over 1.2 (magnitude would not); row 2 gets 1 + 0.5·1.5
        assert keep.tolist() == [[True, False], [False, True]]
        torch.testing.assert_close(updated, torch.tensor([[1.0, 0.0], [0.0, 1.75]]))


def test_sparsegpt_with_uncorrelated_inputs_is_magnitude():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 16, generator=g)
    keep, updated = sparsegpt_prune(W, torch.eye(16), PrunePattern.nm(2, 4))
    assert torch.equal(keep, magnitude_mask(W, PrunePattern.nm(2, 4)))
    torch.testing.assert_close(updated, W * keep)  # nothing to compensate without correlations


def test_sparsegpt_force_keep_protects_weights():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(64, 16, generator=g) @ torch.randn(16, 16, generator=g)
    W = torch.randn(8, 16, generator=g)
    protect = torch.zeros(8, 16, dtype=torch.bool)
    protect[:4, :8] = True  # a "dense tile"
    keep, updated = sparsegpt_prune(W, hessian_of(X), PrunePattern.nm(2, 4), force_keep=protect)
    assert is_nm(keep, 2, 4)
    assert torch.all(updated[~keep & ~protect] == 0)
    assert torch.all(updated[protect] != 0)


def test_sparsegpt_blocksize_must_hold_whole_groups():
    with pytest.raises(PatchsparseError, match="multiple of M=4"):
        sparsegpt_prune(torch.ones(2, 8), torch.eye(8), PrunePattern.nm(2, 4), SparseGPTOptions(blocksize=6))


# ---------------------------------------------------------------- SparseGPT across column blocks

def sparsegpt_by_definition(W, H, pattern, damp, blocksize):
    """SparseGPT as defined, in float64, with explicit inverses instead of the Cholesky trick:
    column i is fixed (kept or zeroed) and its error (w - q)/[H_i⁻¹]₀₀ is moved onto every later
    column along row 0 of H_i⁻¹, H_i = H[i:, i:] (the optimal-brain-surgeon update). Selection
    scores are w_j² / U_jj², U_jj² = [H_j⁻¹]₀₀, on the weights as updated so far: per group of m
    when the group starts (N:M), per block of columns pooled over rows (unstructured)."""
    W = W.double().clone()
    H = H.double().clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    in_f = W.shape[1]
    d = torch.stack([torch.linalg.inv(H[j:, j:])[0, 0].sqrt() for j in range(in_f)])  # U_jj
    keep = torch.zeros(W.shape, dtype=torch.bool)
    for i in range(in_f):
        start = i if pattern.is_nm and i % pattern.m == 0 else (i if not pattern.is_nm and i % blocksize == 0 else None)
        if start is not None:
            stop = min(i + (pattern.m if pattern.is_nm else blocksize), in_f)
            scores = (W[:, start:stop] / d[start:stop]).pow(2).float()
            keep[:, start:stop] = pattern.select(scores, per_row=False)
        Hinv = torch.linalg.inv(H[i:, i:])
        q = W[:, i] * keep[:, i]
        W[:, i:] -= ((W[:, i] - q) / Hinv[0, 0])[:, None] * Hinv[0][None, :]
        W[:, i] = q
    return keep, W.float()


def assert_same_selection(keep, expected):
    assert torch.equal(keep, expected), f"{int((keep != expected).sum())} of {keep.numel()} selections differ"


def correlated_layer(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(in_f) + 0.4 * torch.randn(in_f, in_f, generator=g)
    X = torch.randn(4 * in_f, in_f, generator=g) @ mixing
    return torch.randn(out_f, in_f, generator=g), hessian_of(X)


@pytest.mark.parametrize("blocksize", [4, 8, 128])
def test_sparsegpt_nm_over_several_blocks_matches_the_definition(blocksize):
    # 40 inputs: 10 blocks of 4, 5 of 8, or one of 128. N:M selection per group of the updated
    # weights makes the result independent of the block size; the oracle has no blocks at all.
    W, H = correlated_layer(12, 40, seed=3)
    pattern = PrunePattern.nm(2, 4)
    keep, updated = sparsegpt_prune(W, H, pattern, SparseGPTOptions(damp=0.01, blocksize=blocksize))
    exp_keep, exp_updated = sparsegpt_by_definition(W, H, pattern, 0.01, blocksize)
    assert_same_selection(keep, exp_keep)
    torch.testing.assert_close(updated, exp_updated, rtol=1e-4, atol=1e-4)


def test_sparsegpt_nm_does_not_depend_on_the_block_size():
    W, H = correlated_layer(16, 64, seed=4)
    pattern = PrunePattern.nm(2, 4)
    keep4, updated4 = sparsegpt_prune(W, H, pattern, SparseGPTOptions(blocksize=4))
    keep128, updated128 = sparsegpt_prune(W, H, pattern, SparseGPTOptions(blocksize=128))
    assert_same_selection(keep4, keep128)
    torch.testing.assert_close(updated4, updated128, rtol=1e-4, atol=1e-5)
    # and the compensation did something: the kept weights moved away from the originals
    assert (updated128 - W * keep128).abs().max() > 0.1


def test_sparsegpt_unstructured_over_several_blocks_matches_the_definition():
    W, H = correlated_layer(8, 24, seed=5)
    pattern = PrunePattern.unstructured(0.5)
    keep, updated = sparsegpt_prune(W, H, pattern, SparseGPTOptions(damp=0.01, blocksize=8))
    exp_keep, exp_updated = sparsegpt_by_definition(W, H, pattern, 0.01, 8)
    assert_same_selection(keep, exp_keep)
    torch.testing.assert_close(updated, exp_updated, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("blocksize", [4, 128])
def test_sparsegpt_inputs_that_are_always_zero(blocksize):
    # inputs 4..7 (a whole 2:4 group) and 9 are never non-zero: a zero row and column in H. With
    # no damping the live inputs must be pruned exactly as the layer without input group 4..7 is
    # (input 9 is then pruned in its group, no error to spread); the dead ones end at zero.
    g = torch.Generator().manual_seed(6)
    X = torch.randn(96, 16, generator=g) @ (torch.eye(16) + 0.4 * torch.randn(16, 16, generator=g))
    X[:, 4:8] = 0.0
    X[:, 9] = 0.0
    W = torch.randn(8, 16, generator=g)
    H = hessian_of(X)
    assert torch.all(H.diagonal()[4:8] == 0) and H[9, 9] == 0
    pattern = PrunePattern.nm(2, 4)
    keep, updated = sparsegpt_prune(W, H, pattern, SparseGPTOptions(damp=0.0, blocksize=blocksize))
    assert torch.isfinite(updated).all() and is_nm(keep, 2, 4)
    assert torch.all(updated[:, 4:8] == 0) and torch.all(updated[:, 9] == 0)
    assert not keep[:, 9].any()  # a weight on a dead input is worth nothing
    live = [c for c in range(16) if not 4 <= c < 8]
    sub_keep, sub_updated = sparsegpt_prune(W[:, live], H[live][:, live], pattern,
                                            SparseGPTOptions(damp=0.0, blocksize=blocksize))
    assert_same_selection(keep[:, live], sub_keep)
    torch.testing.assert_close(updated[:, live], sub_updated, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- properties

def prune_all(W, X, pattern, blocksize=8):
    return {
        "magnitude": magnitude_mask(W, pattern),
        "wanda": wanda_mask(W, norms_of(X), pattern),
        "sparsegpt": sparsegpt_prune(W, hessian_of(X), pattern, SparseGPTOptions(blocksize=blocksize)),
    }


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), extra=st.integers(1, 3), rows=st.integers(1, 6), groups=st.integers(1, 4),
       seed=st.integers(0, 10_000), quantised=st.booleans())
def test_every_method_gives_valid_nm_masks(n, extra, rows, groups, seed, quantised):
    m = n + extra
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, groups * m, generator=g)
    if quantised:  # few distinct values: many ties, as in the 4-bit default model
        W = torch.round(W * 2) / 2
    X = torch.randn(3, 5, groups * m, generator=g)
    results = prune_all(W, X, PrunePattern.nm(n, m), blocksize=m * 2)
    for method, result in results.items():
        keep = result[0] if method == "sparsegpt" else result
        assert keep.dtype == torch.bool and keep.shape == W.shape
        assert is_nm(keep, n, m), method
    keep, updated = results["sparsegpt"]
    assert torch.all(updated[~keep] == 0)


@settings(max_examples=20, deadline=None)
@given(sparsity=st.floats(0.0, 0.95), rows=st.integers(1, 5), cols=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_unstructured_counts(sparsity, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randint(-2, 3, (rows, cols), generator=g).float()  # ties
    X = torch.randn(7, cols, generator=g)
    results = prune_all(W, X, PrunePattern.unstructured(sparsity), blocksize=cols)
    total = rows * cols
    assert int((~results["magnitude"]).sum()) == round(sparsity * total)        # one count per layer
    assert (~results["wanda"]).sum(1).tolist() == [round(sparsity * cols)] * rows  # one per row
    assert int((~results["sparsegpt"][0]).sum()) == round(sparsity * total)      # one block = the layer
