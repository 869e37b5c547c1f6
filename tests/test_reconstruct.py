"""Weight reconstruction with a fixed mask (exact least squares) and with re-picked 2:4 groups."""

import pytest
import torch

from patchsparse.errors import PatchsparseError
from patchsparse.masks import TileGrid
from patchsparse.masks.patterns import is_nm
from patchsparse.masks.spec import HybridMaskSpec, LayerMask
from patchsparse.models import select_linears
from patchsparse.prior.oneshot import prune_model
from patchsparse.prior.pattern import PrunePattern
from patchsparse.prior.pruners import magnitude_mask
from patchsparse.prior.stats import HessianStat
from patchsparse.reconstruct import masked_least_squares, reconstruct_model
from tests.conftest import build_tiny_llama
from tests.prior.test_reconstruction import structured_inputs


def _hessian(X):
    stat = HessianStat(X.shape[1])
    stat.accumulate(X)
    return stat.hessian


def test_masked_least_squares_is_the_direct_solve_per_row():
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 6, 24
    W = torch.randn(out_f, in_f, generator=g)
    X = structured_inputs(in_f, seed=1, tokens=200)
    keep = torch.rand(out_f, in_f, generator=g) < 0.5
    solved = masked_least_squares(W, _hessian(X), keep, damp=0.0, iterations=500, tol=1e-12)
    assert torch.equal(solved[~keep], torch.zeros(int((~keep).sum())))
    for r in range(out_f):
        S = keep[r]
        # min_w' ‖X w' − X w_r‖² over the kept coordinates: a plain least-squares problem
        direct = torch.linalg.lstsq(X[:, S].double(), (X @ W[r]).double()[:, None]).solution[:, 0]
        assert torch.allclose(solved[r, S].double(), direct, rtol=1e-4, atol=1e-4), r


def test_masked_least_squares_is_optimal_on_the_damped_objective():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(32, 64, generator=g)
    X = structured_inputs(64, seed=3)
    H = _hessian(X)
    keep = magnitude_mask(W, PrunePattern.nm(2, 4))
    Hd = H.double() + 0.01 * H.diagonal().mean().double() * torch.eye(64, dtype=torch.float64)

    def objective(W_hat):
        D = (W_hat - W).double()
        return float(((D @ Hd) * D).sum())

    lsq = masked_least_squares(W, H, keep, damp=0.01)
    assert objective(lsq) < 0.9 * objective(W * keep)
    for seed in range(3):  # no move inside the kept set does better
        step = torch.randn(W.shape, generator=torch.Generator().manual_seed(seed)) * keep * 1e-2
        assert objective(lsq) < objective(lsq + step)


def _hybrid_spec(model, tile=(16, 16)):
    layers = {}
    for i, (name, linear) in enumerate(select_linears(model).items()):
        grid = TileGrid(*linear.weight.shape, *tile)
        dense = torch.zeros(grid.shape, dtype=torch.bool)
        dense.view(-1)[i % dense.numel()] = True
        layers[name] = LayerMask(magnitude_mask(linear.weight, PrunePattern.nm(2, 4)).cpu(), "2:4", tile, dense)
    return HybridMaskSpec(layers, {"mode": "patch-tile"})


def _windows(n=4, seqlen=24):
    return torch.randint(0, 320, (n, seqlen), generator=torch.Generator().manual_seed(0))


def test_repick_keeps_the_dense_tiles_and_redoes_the_2of4_groups():
    model = build_tiny_llama(320)
    spec = _hybrid_spec(model)
    new = reconstruct_model(model, spec, _windows(), "repick")
    changed = 0
    for name, linear in select_linears(model).items():
        old, layer = spec.layers[name], new.layers[name]
        assert torch.equal(layer.dense_tiles, old.dense_tiles)
        assert is_nm(layer.sparse_keep, 2, 4)
        changed += int((layer.sparse_keep != old.sparse_keep).sum())
        assert torch.equal(linear.weight != 0, layer.keep_mask() & (linear.weight != 0))  # zero where pruned
    assert changed > 0  # SparseGPT's groups are not magnitude's
    assert new.sparsity() == pytest.approx(spec.sparsity(), abs=1e-9)  # same allocation, same 2:4 density
    assert new.metadata["reconstruction"] == "repick"


def test_repick_with_the_prior_allocation_is_prune_model():
    tile = (16, 16)
    reference = build_tiny_llama(320)
    one_shot = prune_model(reference, _windows(), "sparsegpt", "2:4", 0.3, tile=tile)
    model = build_tiny_llama(320)
    new = reconstruct_model(model, one_shot, _windows(), "repick")
    for name, linear in select_linears(model).items():
        assert torch.equal(new.layers[name].keep_mask(), one_shot.layers[name].keep_mask())
        assert torch.equal(linear.weight, dict(reference.named_modules())[name].weight)


def test_fixed_keeps_the_mask_and_lowers_the_first_layers_output_error():
    model = build_tiny_llama(320)
    spec = _hybrid_spec(model)
    name = "model.layers.0.mlp.down_proj"
    dense_weight = dict(model.named_modules())[name].weight.detach().clone()
    captured = {}

    def capture(module, args):
        captured.setdefault("x", args[0].detach().reshape(-1, args[0].shape[-1]))

    handle = dict(model.named_modules())[name].register_forward_pre_hook(capture)
    with torch.no_grad():
        model(input_ids=_windows(), use_cache=False)  # first block's inputs are the same before and after
    handle.remove()
    new = reconstruct_model(model, spec, _windows(), "fixed")
    assert new.layers is not spec.layers and all(new.layers[n] is spec.layers[n] for n in spec.layers)
    W_hat = dict(model.named_modules())[name].weight.detach()
    keep = spec.layers[name].keep_mask()
    assert torch.equal(W_hat[~keep], torch.zeros(int((~keep).sum())))
    X = captured["x"]
    assert float((X @ (dense_weight - W_hat).T).norm()) < float((X @ (dense_weight - dense_weight * keep).T).norm())


def test_refusals():
    model = build_tiny_llama(320)
    spec = _hybrid_spec(model)
    with pytest.raises(PatchsparseError, match="unknown reconstruction"):
        reconstruct_model(model, spec, _windows(), "best")
    with pytest.raises(PatchsparseError, match="calibration"):
        reconstruct_model(model, spec, _windows()[:0], "repick")
    unstructured = HybridMaskSpec({n: LayerMask(l.sparse_keep, "unstructured") for n, l in spec.layers.items()})
    with pytest.raises(PatchsparseError, match="use fixed"):
        reconstruct_model(model, unstructured, _windows(), "repick")
