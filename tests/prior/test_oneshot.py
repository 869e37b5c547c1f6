import pytest
import torch

from patchsparse.errors import PatchsparseError
from patchsparse.masks import TileGrid, unstructured_mask_from_scores
from patchsparse.masks.patterns import is_nm
from patchsparse.masks.tiles import initial_dense_tiles
from patchsparse.models import select_linears
from patchsparse.models.layers import LayerSelection
from patchsparse.prior import LayerPrior
from patchsparse.prior.methods import pruner_names
from patchsparse.prior.oneshot import compute_prior, prune_model
from tests.conftest import build_tiny_llama

METHODS = list(pruner_names())


def windows(n=4, seqlen=24, seed=0):
    return torch.randint(0, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def weights_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(model, saved):
    return all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", METHODS)
def test_compute_prior_leaves_weights_and_gives_tile_scores(method):
    model = build_tiny_llama(320)
    saved = weights_of(model)
    tile = (48, 20)  # ragged on 64 / 128 / 32-sized weights
    priors = compute_prior(model, windows(), method, 0.3, tile)
    assert same_weights(model, saved)
    assert set(priors) == set(select_linears(model))
    for name, prior in priors.items():
        assert isinstance(prior, LayerPrior) and prior.tile == tile
        assert is_nm(prior.nm_keep, 2, 4)
        grid = TileGrid(*prior.nm_keep.shape, *tile)
        assert prior.tile_scores.shape == grid.shape
        assert torch.all((prior.tile_scores >= 0) & (prior.tile_scores <= 1))
        # the weight-weighted mean tile score is the kept fraction of unstructured pruning at 0.3
        kept = float((prior.tile_scores * grid.tile_numel()).sum()) / prior.nm_keep.numel()
        assert kept == pytest.approx(0.7, abs=0.01)


def test_magnitude_tile_scores_by_hand():
    model = build_tiny_llama(320)
    tile = (16, 12)
    priors = compute_prior(model, None, "magnitude", 0.4, tile)
    name = "model.layers.1.mlp.up_proj"
    weight = dict(model.named_modules())[name].weight
    keep = unstructured_mask_from_scores(weight.abs(), 0.4)  # one threshold for the layer
    grid = TileGrid(*weight.shape, *tile)
    expected = grid.reduce_sum(keep.float()) / grid.tile_numel()
    torch.testing.assert_close(priors[name].tile_scores, expected)


def test_prior_without_tiles():
    model = build_tiny_llama(320)
    priors = compute_prior(model, windows(), "wanda", None, None)
    assert all(p.tile_scores is None and p.tile is None for p in priors.values())
    priors = compute_prior(model, windows(), "wanda", 0.5, None, n=4, m=8)
    assert all(is_nm(p.nm_keep, 4, 8) for p in priors.values())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prior_masks_equal_pruned_masks_without_weight_update(method):
    """Both calibrate each layer on the masked outputs of the original weights before it."""
    ids = windows()
    model = build_tiny_llama(320, layers=3)
    priors = compute_prior(model, ids, method, None, None)
    spec = prune_model(model, ids, method, "2:4", update_weights=False)
    for name, prior in priors.items():
        assert torch.equal(prior.nm_keep, spec.layers[name].sparse_keep), name


def test_sparsegpt_update_changes_kept_weights_in_place():
    ids = windows()
    original = build_tiny_llama(320)
    model = build_tiny_llama(320)
    spec = prune_model(model, ids, "sparsegpt", "2:4")
    assert spec.metadata["weights_updated"] and spec.sparsity() == pytest.approx(0.5)
    modules, originals = dict(model.named_modules()), dict(original.named_modules())
    for name, mask in spec.layers.items():
        weight, before = modules[name].weight, originals[name].weight
        assert torch.all(weight[~mask.keep_mask()] == 0)
        assert not torch.equal(weight, before * mask.keep_mask())  # reconstructed, not just masked
    masked_only = build_tiny_llama(320)
    spec = prune_model(masked_only, ids, "sparsegpt", "2:4", update_weights=False)
    for name, mask in spec.layers.items():
        torch.testing.assert_close(dict(masked_only.named_modules())[name].weight,
                                   originals[name].weight * mask.keep_mask())


@pytest.mark.parametrize("method", METHODS)
def test_hybrid_one_shot_spec(method):
    model = build_tiny_llama(320)
    original = weights_of(model)
    spec = prune_model(model, windows(), method, "2:4", 0.35, tile=(16, 16))
    assert spec.sparsity() == pytest.approx(0.35, abs=0.03)
    for name, mask in spec.layers.items():
        assert mask.tile == (16, 16) and mask.dense_tiles is not None and mask.pattern == "2:4"
        assert is_nm(mask.sparse_keep, 2, 4)
        assert mask.sparsity() == pytest.approx(0.35, abs=0.07)  # per layer, up to tile granularity
        weight = dict(model.named_modules())[name].weight
        dense = mask.grid.expand(mask.dense_tiles)
        assert torch.all(weight[~mask.keep_mask()] == 0)
        if method != "sparsegpt":  # dense tiles keep their original weights
            assert torch.equal(weight[dense], original[f"{name}.weight"][dense])


def test_hybrid_dense_tiles_follow_unstructured_scores():
    model = build_tiny_llama(320)
    weight = model.model.layers[0].mlp.down_proj.weight.clone()
    spec = prune_model(model, None, "magnitude", "2:4", 0.25, tile=(16, 32))
    grid = TileGrid(*weight.shape, 16, 32)
    keep = unstructured_mask_from_scores(weight.abs(), 0.25)
    expected = initial_dense_tiles(grid.reduce_sum(keep.float()) / grid.tile_numel(), grid, 0.25)
    assert torch.equal(spec.layers["model.layers.0.mlp.down_proj"].dense_tiles, expected)


def test_unstructured_and_nm_specs():
    spec = prune_model(build_tiny_llama(320), windows(), "wanda", "unstructured", 0.7)
    assert spec.sparsity() == pytest.approx(0.7, abs=0.01)
    assert {m.pattern for m in spec.layers.values()} == {"unstructured"}
    spec = prune_model(build_tiny_llama(320), windows(), "sparsegpt", "4:8")
    assert {m.pattern for m in spec.layers.values()} == {"4:8"}
    assert all(is_nm(m.sparse_keep, 4, 8) for m in spec.layers.values())


def test_layer_selection():
    model = build_tiny_llama(320)
    saved = weights_of(model)
    spec = prune_model(model, windows(), "wanda", "2:4", selection=LayerSelection(include=(r"\.mlp\.",)))
    assert set(spec.layers) == {f"model.layers.{b}.mlp.{p}" for b in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    assert torch.equal(saved["model.layers.0.self_attn.q_proj.weight"], model.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("call, message", [
    (lambda m: prune_model(m, windows(), "wanda", "2:4", 0.3), "2:4 means sparsity 0.5"),
    (lambda m: prune_model(m, windows(), "wanda", "unstructured", 1.0), r"\[0, 1\)"),
    (lambda m: prune_model(m, windows(), "wanda", "unstructured", None), "needs a sparsity"),
    (lambda m: prune_model(m, windows(), "wanda", "2:4", 0.6, tile=(16, 16)), r"outside \[0, 0.5\]"),
    (lambda m: prune_model(m, windows(), "wanda", "4:4"), "0 < N < M"),
    (lambda m: prune_model(m, windows(), "wanda", "5:4"), "0 < N < M"),
    (lambda m: prune_model(m, windows(), "wanda", "2:4", 0.3, tile=(16, 6)), "multiple of 4"),
    (lambda m: prune_model(m, windows(), "wanda", "2:8", 0.3, tile=(16, 16)), "dense"),
    (lambda m: prune_model(m, windows()[:0], "wanda", "2:4"), "needs calibration windows"),
    (lambda m: prune_model(m, None, "sparsegpt", "2:4"), "needs calibration windows"),
    (lambda m: prune_model(m, windows(), "obs", "2:4"), "unknown pruning method"),
    (lambda m: prune_model(m, windows(), "wanda", "3:7"), "not divisible by M=7"),
    (lambda m: prune_model(m, windows(), "wanda", "2:4", selection=LayerSelection(include=("nothing",))),
     "no decoder linear layers"),
    (lambda m: compute_prior(m, windows(), "wanda", None, (16, 16)), "needs a target sparsity"),
    (lambda m: compute_prior(m, windows(), "wanda", 0.3, None), "2:4 means sparsity 0.5"),
])
def test_bad_requests_fail_before_the_model_changes(call, message):
    model = build_tiny_llama(320)
    saved = weights_of(model)
    with pytest.raises(PatchsparseError, match=message):
        call(model)
    assert same_weights(model, saved)
