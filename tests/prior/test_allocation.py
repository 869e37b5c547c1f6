import pytest
import torch

from patchsparse.errors import PatchsparseError
from patchsparse.models import select_linears
from patchsparse.prior.allocation import (allocate_blocks, edge_dense_blocks, owl_outlier_ratio, owl_sparse_blocks,
                                          owl_sparsities, sparse_block_count)
from tests.conftest import build_tiny_llama


def test_block_allocations():
    assert sparse_block_count(30, 0.35) == 21 and sparse_block_count(30, 0.45) == 27
    assert edge_dense_blocks(30, 21) == list(range(5, 26))      # 9 dense: first 5, last 4
    assert edge_dense_blocks(4, 4) == [0, 1, 2, 3]
    ratios = torch.tensor([0.05, 0.01, 0.03, 0.02])
    # two 2:4 blocks at 25%: the ones with the fewest outliers
    assert owl_sparse_blocks(ratios, 0.25) == [1, 3]
    s = owl_sparsities(ratios, 0.25, lam=0.08)
    assert float(s.mean()) == pytest.approx(0.25) and float(s.max() - s.min()) == pytest.approx(0.16)
    assert int(s.argmax()) == 1
    scores = torch.tensor([1.0] * 9 + [100.0])          # mean 10.9; only 100 > 5 × mean
    assert owl_outlier_ratio(scores, 5.0) == pytest.approx(0.1)


def test_allocate_blocks_selects_the_chosen_blocks_linears():
    model = build_tiny_llama(320, layers=4)
    n = len([k for k in select_linears(model) if k.endswith("q_proj")])
    selection, blocks, ratios = allocate_blocks(model, "edges", 0.25)
    assert ratios is None and blocks == [1, 2]  # round(2 · 0.25 · 4) = 2 blocks at 2:4; first and last dense
    chosen = select_linears(model, selection)
    assert chosen and all(any(f".layers.{b}." in name for b in blocks) for name in chosen)
    assert len(chosen) == len(select_linears(model)) * len(blocks) // n
    with pytest.raises(PatchsparseError, match="needs calibration windows"):
        allocate_blocks(model, "owl", 0.25)
    with pytest.raises(PatchsparseError, match="unknown block allocation 'middle'"):
        allocate_blocks(model, "middle", 0.25)
    windows = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    _, blocks, ratios = allocate_blocks(model, "owl", 0.25, windows)
    assert ratios.shape == (n,) and torch.all((ratios >= 0) & (ratios <= 1))
    assert blocks == owl_sparse_blocks(ratios, 0.25)
