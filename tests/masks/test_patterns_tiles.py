import pytest
import torch
from hypothesis import given, settings, strategies as st

from patchsparse.errors import PatchsparseError
from patchsparse.masks import (
    HybridMaskSpec, LayerMask, TileGrid, mask_from_pattern_index, nm_mask_from_scores,
    pattern_index_from_mask, unstructured_mask_from_scores)
from patchsparse.masks.patterns import is_nm


def test_nm_ties_keep_earlier_positions():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0, 2.0, 2.0, 1.0]])
    keep = nm_mask_from_scores(scores, 2, 4)
    assert keep.tolist() == [[True, True, False, False, True, True, False, False]]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 7), extra=st.integers(1, 4), rows=st.integers(1, 5), groups=st.integers(1, 5),
       seed=st.integers(0, 10_000))
def test_nm_masks_are_valid(n, extra, rows, groups, seed):
    m = n + extra
    # quantised scores create many ties, as in the 4-bit default model
    scores = torch.randint(0, 3, (rows, groups * m), generator=torch.Generator().manual_seed(seed)).float()
    keep = nm_mask_from_scores(scores, n, m)
    assert is_nm(keep, n, m)
    # every kept score is >= every pruned score within its group
    g = scores.view(rows, groups, m)
    k = keep.view(rows, groups, m)
    kept_min = torch.where(k, g, torch.full_like(g, float("inf"))).min(-1).values
    pruned_max = torch.where(~k, g, torch.full_like(g, -float("inf"))).max(-1).values
    assert torch.all(kept_min >= pruned_max)


def test_invalid_nm():
    with pytest.raises(PatchsparseError, match="0 < N < M"):
        nm_mask_from_scores(torch.ones(1, 8), 4, 4)


def test_unstructured_per_layer_and_per_row():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [8.0, 7.0, 6.0, 5.0]])
    assert unstructured_mask_from_scores(scores, 0.5).tolist() == [[False] * 4, [True] * 4]
    assert unstructured_mask_from_scores(scores, 0.5, per_row=True).tolist() == [[True, True, False, False]] * 2


def test_pattern_index_round_trip():
    keep = nm_mask_from_scores(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)))
    index = pattern_index_from_mask(keep)
    assert index.shape == (6, 4)
    assert torch.equal(mask_from_pattern_index(index), keep)


def test_ragged_tile_grid_counts_weights():
    grid = TileGrid(5, 12, 2, 8)  # 3 x 2 tiles; last row 1 high, last column 4 wide
    assert grid.shape == (3, 2)
    assert grid.tile_numel().tolist() == [[16, 8], [16, 8], [8, 4]]
    assert int(grid.tile_numel().sum()) == 60
    values = torch.arange(6.0).view(3, 2)
    expanded = grid.expand(values)
    assert expanded.shape == (5, 12)
    assert expanded[4, 11] == 5 and expanded[0, 7] == 0 and expanded[0, 8] == 1
    assert torch.equal(grid.reduce_sum(torch.ones(5, 12)), grid.tile_numel().float())


def test_tile_columns_must_be_multiple_of_4():
    with pytest.raises(PatchsparseError, match="multiple of 4"):
        TileGrid(8, 8, 4, 6)


def test_hybrid_spec_sparsity_and_apply(tiny_model):
    name = "model.layers.0.mlp.down_proj"
    weight = dict(tiny_model.named_modules())[name].weight  # (64, 128)
    keep24 = nm_mask_from_scores(weight.abs())
    dense = torch.zeros(2, 4, dtype=torch.bool)  # tiles of 32 x 32
    dense[0, 0] = True
    spec = HybridMaskSpec({name: LayerMask(keep24, "2:4", (32, 32), dense)})
    # one of eight equal tiles is dense: sparsity 0.5 * 7/8
    assert spec.sparsity() == pytest.approx(0.5 * 7 / 8)
    spec.apply_(tiny_model)
    assert torch.all(weight[:32, :32] != 0)
    assert int((weight == 0).sum()) == int(0.5 * 7 / 8 * weight.numel())
    bad = HybridMaskSpec({"model.layers.0.mlp.nope": LayerMask(keep24, "2:4")})
    with pytest.raises(PatchsparseError, match="does not have"):
        bad.apply_(tiny_model)
