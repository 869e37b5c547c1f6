import pytest
import torch

from patchsparse.errors import PatchsparseError
from patchsparse.masks import TileGrid
from patchsparse.prior import dense_fraction_for_sparsity, initial_dense_tiles


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
