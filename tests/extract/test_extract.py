import pytest
import torch

from patchsparse.errors import PatchsparseError
from patchsparse.extract import exact_tiles, extract_masks, extraction_report
from patchsparse.learn import attach_masks, learn_masks, remove_masks
from patchsparse.masks.patterns import is_nm

from tests.learn.helpers import tiny_config, tiny_prior, tiny_windows


def test_exact_tiles_hand_case():
    logits = [torch.tensor([[3.0, 1.0], [2.0, 0.0]]), torch.tensor([[2.5, -1.0]])]
    gains = [torch.full((2, 2), 8), torch.tensor([[4, 4]])]
    # ranked: 3.0 (8), 2.5 (4), 2.0 (8), 1.0 (8) …; a target of 12 weights takes the first two
    dense = exact_tiles(logits, gains, target_extra=12)
    assert dense[0].tolist() == [[True, False], [False, False]]
    assert dense[1].tolist() == [[True, False]]
    # 19 is closer to 20 (three tiles) than to 12 or 28
    dense = exact_tiles(logits, gains, target_extra=19)
    assert dense[0].tolist() == [[True, False], [True, False]] and dense[1].tolist() == [[True, False]]
    assert not any(d.any() for d in exact_tiles(logits, gains, target_extra=1))


def _moved_masks(model, mode="patch-joint", sparsity=0.35):
    masked = attach_masks(model, tiny_config(mode, sparsity), tiny_prior(model, sparsity))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in masked.masks.values():
            if m.tile_logits is not None:
                m.tile_logits.copy_(torch.randn(m.tile_logits.shape, generator=g) + 0.3)
            if m.pattern_logits is not None:
                m.pattern_logits.copy_(torch.randn(m.pattern_logits.shape, generator=g))
    return masked


@pytest.mark.parametrize("mode", ["patch-joint", "patch-tile"])
def test_exact_policy_meets_the_target_within_one_tile(tiny_model, mode):
    masked = _moved_masks(tiny_model, mode, 0.35)
    spec = extract_masks(tiny_model, "exact", 0.35, mode)
    largest_tile = max(float(m.tile_numel.max()) for m in masked.masks.values())
    total = sum(m.numel for m in masked.masks.values())
    assert abs(spec.sparsity() - 0.35) <= 0.5 * largest_tile / total + 1e-12
    assert spec.metadata["sparsity"] == spec.sparsity() and spec.metadata["policy"] == "exact"
    # the dense tiles are the highest logits: every dense logit >= every sparse logit
    dense_logits = torch.cat([m.tile_logits.detach()[spec.layers[n].dense_tiles] for n, m in masked.masks.items()])
    sparse_logits = torch.cat([m.tile_logits.detach()[~spec.layers[n].dense_tiles] for n, m in masked.masks.items()])
    assert float(dense_logits.min()) >= float(sparse_logits.max())
    for name, layer in spec.layers.items():
        assert is_nm(layer.sparse_keep, 2, 4) and layer.pattern == "2:4"


def test_threshold_policy_and_two_four_choice(tiny_model):
    masked = _moved_masks(tiny_model)
    spec = extract_masks(tiny_model, "threshold")
    for name, m in masked.masks.items():
        assert torch.equal(spec.layers[name].dense_tiles, m.tile_logits.detach() > 0)
        best = m.pattern_logits.detach().argmax(-1)  # (out, G)
        groups = spec.layers[name].sparse_keep.view(m.shape[0], -1, 4)
        from patchsparse.masks import PATTERNS_2_4
        assert torch.equal(groups, PATTERNS_2_4.bool()[best])


def test_patch_tile_keeps_the_frozen_prior(tiny_model):
    prior = tiny_prior(tiny_model)
    attach_masks(tiny_model, tiny_config("patch-tile"), prior)
    spec = extract_masks(tiny_model, "exact", 0.35)
    for name, layer in spec.layers.items():
        assert torch.equal(layer.sparse_keep, prior[name].nm_keep)


def test_maskllm_has_no_tiles_and_half_sparsity(tiny_model, tiny_tokenizer):
    learn_masks(tiny_model, tiny_windows(len(tiny_tokenizer)), tiny_config("maskllm", steps=2), tiny_prior(tiny_model, 0.5))
    spec = extract_masks(tiny_model, "exact", 0.5, "maskllm")
    assert all(l.tile is None and l.dense_tiles is None for l in spec.layers.values())
    assert spec.sparsity() == 0.5 and spec.metadata["policy"] == "argmax"


def test_report_and_removal_restore_plain_layers(tiny_model):
    weights = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    _moved_masks(tiny_model)
    spec = extract_masks(tiny_model, "exact", 0.35)
    report = extraction_report(spec)
    assert set(report.per_projection) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(report.per_block) == {0, 1} and len(report.per_layer) == 14
    remove_masks(tiny_model)
    now = dict(tiny_model.named_parameters())
    assert now.keys() == weights.keys()
    assert all(torch.equal(now[n], w) for n, w in weights.items())
    spec.apply_(tiny_model)
    kept = sum(int((tiny_model.get_submodule(n).weight != 0).sum()) for n in spec.layers)
    assert kept == spec.kept_and_total()[0]


def test_bad_extraction_requests(tiny_model):
    with pytest.raises(PatchsparseError, match="no learnable masks"):
        extract_masks(tiny_model)
    _moved_masks(tiny_model)
    with pytest.raises(PatchsparseError, match="policy"):
        extract_masks(tiny_model, "greedy", 0.35)
    with pytest.raises(PatchsparseError, match="target sparsity"):
        extract_masks(tiny_model, "exact")
