import pytest
import torch

from patchsparse.errors import PatchsparseError
from patchsparse.masks import TileGrid
from patchsparse.extract import exact_tiles
from patchsparse.masks.tiles import choose_dense_tiles, dense_fraction_for_sparsity, initial_dense_tiles


def test_dense_fraction():
    assert dense_fraction_for_sparsity(0.45) == pytest.approx(0.1)
    assert dense_fraction_for_sparsity(0.25) == pytest.approx(0.5)
    with pytest.raises(PatchsparseError, match="outside"):
        dense_fraction_for_sparsity(0.6)


def test_initial_dense_tiles_picks_highest_scores():
    grid = TileGrid(4, 16, 2, 4)  # 2 x 4 equal tiles of 8 weights
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.3], [0.8, 0.4, 0.5, 0.6]])
    dense = initial_dense_tiles(scores, grid, 0.25)  # f = 0.5: 4 of 8 tiles
    assert dense.tolist() == [[False, True, False, False], [True, False, True, True]]


def test_ragged_tiles_counted_by_weights():
    # 576 columns in 128-wide tiles: four full tiles and one 64-wide edge tile
    grid = TileGrid(128, 576, 128, 128)
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.9]])  # the small edge tile scores highest
    dense = initial_dense_tiles(scores, grid, 0.4)  # f = 0.2 -> 115.2 columns' worth of weights
    # edge tile (64 cols) alone is 0.111, edge + one full tile (192 cols) is 0.333: 64 is closer to 115.2
    assert dense.tolist() == [[False, False, False, False, True]]
    weights = (grid.tile_numel() * dense).sum().item()
    assert weights == 128 * 64


def test_choose_dense_tiles_hand_case():
    # ranked 0.9 (w 3), 0.5 (w 1), 0.5 (w 4; the tie goes to the earlier tile), 0.1 (w 2)
    scores = torch.tensor([0.5, 0.9, 0.1, 0.5])
    weights = torch.tensor([1, 3, 2, 4])
    assert choose_dense_tiles(scores, weights, 3.4).tolist() == [False, True, False, False]  # |3-3.4| < |4-3.4|
    assert choose_dense_tiles(scores, weights, 3.6).tolist() == [True, True, False, False]  # 4 is nearest
    assert choose_dense_tiles(scores, weights, 5.9).tolist() == [True, True, False, False]  # 4 beats 8
    assert choose_dense_tiles(scores, weights, 6.5).tolist() == [True, True, False, True]  # 8 beats 4
    assert choose_dense_tiles(scores, weights, 0.4).tolist() == [False] * 4
    assert choose_dense_tiles(scores, weights, 100.0).tolist() == [True] * 4


def _old_initial_dense_tiles(scores, grid, sparsity):
    """The prior's chooser as it was written before it shared `choose_dense_tiles` (reference)."""
    target_weights = (1.0 - 2.0 * sparsity) * grid.out_features * grid.in_features
    flat_scores = scores.reshape(-1).to(torch.float64)
    order = torch.sort(flat_scores, descending=True, stable=True).indices
    sizes = grid.tile_numel().reshape(-1)[order].to(torch.float64)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(sizes, 0)])
    count = int(torch.argmin((cumulative - target_weights).abs()))
    dense = torch.zeros(flat_scores.numel(), dtype=torch.bool)
    dense[order[:count]] = True
    return dense.view(grid.shape)


@pytest.mark.parametrize("seed", range(5))
def test_prior_and_extraction_share_one_chooser(seed):
    """Both callers pick the same tiles as before, and the same tiles as each other on one layer."""
    g = torch.Generator().manual_seed(seed)
    grid = TileGrid(40, 72, 16, 16)  # ragged both ways: 3 x 5 tiles
    # few distinct values, so ties are common and their order matters
    scores = torch.randint(0, 4, grid.shape, generator=g).float()
    for sparsity in (0.0, 0.2, 0.35, 0.5):
        dense = initial_dense_tiles(scores, grid, sparsity)
        assert torch.equal(dense, _old_initial_dense_tiles(scores, grid, sparsity))
        target = (1.0 - 2.0 * sparsity) * grid.out_features * grid.in_features
        (from_extraction,) = exact_tiles([scores], [grid.tile_numel()], target)
        assert torch.equal(from_extraction, dense)
