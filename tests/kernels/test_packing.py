"""The packed formats: hand-checked layout and exact round trips, ragged shapes included."""

import pytest
import torch

from patchsparse.errors import PatchsparseError
from patchsparse.kernels.packing import pack_rowblocks, unpack_rowblocks
from patchsparse.kernels.split import is_row_homogeneous, pack_split, pack_stripe
from patchsparse.kernels.synthetic import synthetic_layer_mask
from patchsparse.kernels.triton_tiles import pack_tiles
from patchsparse.masks import LayerMask, nm_mask_from_scores

# (out, in, tile): divisible, ragged like the default model (576 with 128 tiles, 100 rows), odd tiles
SHAPES = [(64, 64, (16, 16)), (100, 576, (128, 128)), (37, 44, (5, 12)), (24, 52, (24, 52)), (130, 72, (64, 8))]
SPARSITIES = [0.0, 0.25, 0.45, 0.5]


def hand_mask() -> tuple[torch.Tensor, LayerMask]:
    """8 x 16 weight: chunk 0 is 2:4 (row r keeps positions 1,3 and 0,2), chunk 1 is a dense tile."""
    weight = torch.arange(8 * 16, dtype=torch.float32).view(8, 16) + 1
    keep = torch.zeros(8, 16, dtype=torch.bool)
    keep[:, [1, 3, 4, 6]] = True
    keep[:, 8:] = torch.tensor([True, True, False, False] * 2)  # inside the dense tile: irrelevant
    mask = LayerMask(keep, "2:4", tile=(8, 8), dense_tiles=torch.tensor([[False, True]]))
    return weight, mask


def test_rowblock_layout_matches_hand_computation():
    weight, mask = hand_mask()
    packed = pack_rowblocks(weight, mask)
    assert packed.n_sparse.tolist() == [1]
    assert packed.chunk_cols.tolist() == [[0, 1]]            # sparse chunk first, then the dense one
    # metadata byte: p0=1, p1=3, q0=0, q1=2 -> 1 | 3<<2 | 0<<4 | 2<<6 = 141 for every row
    assert packed.meta.tolist() == [141] * 8
    slots = packed.values[:32].view(4, 8)                     # slot-major (4 slots, 8 rows)
    assert torch.equal(slots[0], weight[:, 1]) and torch.equal(slots[1], weight[:, 3])
    assert torch.equal(slots[2], weight[:, 4]) and torch.equal(slots[3], weight[:, 6])
    dense = packed.values[32:].view(8, 8)                     # input-major (8 inputs, 8 rows)
    assert torch.equal(dense, weight[:, 8:].T)
    assert packed.values.numel() == 32 + 64


@pytest.mark.parametrize("out_f,in_f,tile", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_round_trips_are_exact(out_f, in_f, tile, sparsity):
    torch.manual_seed(out_f + in_f)
    weight = torch.randn(out_f, in_f)
    mask = synthetic_layer_mask(weight, sparsity, tile, seed=3)
    expected = weight * mask.keep_mask()
    assert torch.equal(unpack_rowblocks(pack_rowblocks(weight, mask)), expected)
    assert torch.equal(pack_tiles(weight, mask, block_n=16, block_k=16).dense_weight(), expected)
    assert torch.equal(pack_split(weight, mask).dense_weight(), expected)
    if is_row_homogeneous(mask):
        assert torch.equal(pack_stripe(weight, mask).dense_weight(), expected)


def test_bytes_shrink_with_sparsity():
    weight = torch.randn(256, 512)
    sizes = {s: pack_rowblocks(weight, synthetic_layer_mask(weight, s)).values.numel() for s in SPARSITIES}
    assert sizes[0.0] == 256 * 512
    assert sizes[0.5] == 256 * 512 // 2
    assert sizes[0.0] > sizes[0.25] > sizes[0.45] > sizes[0.5]


def test_all_dense_and_all_sparse_layers():
    weight = torch.randn(48, 96)
    keep = nm_mask_from_scores(weight.abs())
    all_sparse = LayerMask(keep, "2:4")                                  # no tile grid: pure 2:4
    all_dense = LayerMask(keep, "2:4", tile=(16, 32), dense_tiles=torch.ones(3, 3, dtype=torch.bool))
    sparse_packed = pack_rowblocks(weight, all_sparse)
    dense_packed = pack_rowblocks(weight, all_dense)
    assert int(sparse_packed.n_sparse.sum()) == 6 * 12 and sparse_packed.values.numel() == 48 * 48
    assert int(dense_packed.n_sparse.sum()) == 0 and dense_packed.values.numel() == 48 * 96
    assert torch.equal(unpack_rowblocks(sparse_packed), weight * keep)
    assert torch.equal(unpack_rowblocks(dense_packed), weight)


def test_rejects_masks_that_are_not_2_4():
    weight = torch.randn(8, 16)
    keep = torch.ones(8, 16, dtype=torch.bool)
    with pytest.raises(PatchsparseError, match="2:4"):
        pack_rowblocks(weight, LayerMask(keep, "unstructured"))
    with pytest.raises(PatchsparseError, match="exactly 2"):
        pack_rowblocks(weight, LayerMask(keep, "2:4"))


def test_low_precision_storage_rounds_once():
    weight = torch.randn(64, 128)
    mask = synthetic_layer_mask(weight, 0.35, (32, 32))
    for dtype in (torch.bfloat16, torch.float16):
        packed = pack_rowblocks(weight, mask, dtype)
        assert packed.values.dtype == dtype
        assert torch.equal(unpack_rowblocks(packed), (weight * mask.keep_mask()).to(dtype))
