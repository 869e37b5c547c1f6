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
from patchsparse.models.layers import decoder_layers
from patchsparse.prior.layerwise import capture_layer_inputs, relative_block_error
from patchsparse.reconstruct import BlockFit, masked_least_squares, reconstruct_blocks, reconstruct_model
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


def _dense_stream_targets(model, windows):
    """What each dense decoder block outputs on the dense model's activations, and its input."""
    _, layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, windows, layers, batch_size=2)
    x, pairs = inputs.hidden, []
    for index, layer in enumerate(layers):
        y = inputs.outputs(layer, index, x)
        pairs.append((x, y))
        x = y
    return inputs, pairs


def _all_kept(spec, names):
    return HybridMaskSpec({n: (LayerMask(torch.ones_like(l.sparse_keep), "unstructured") if n in names else l)
                           for n, l in spec.layers.items()}, spec.metadata)


def test_block_fit_keeps_the_mask_and_lowers_each_blocks_error_against_the_dense_model():
    model = build_tiny_llama(320)
    spec = _hybrid_spec(model)
    inputs, pairs = _dense_stream_targets(model, _windows())
    _, layers = decoder_layers(model)
    # the masks alone, over the dense weights: the first block's error against the dense block
    masked = build_tiny_llama(320)
    spec.apply_(masked)
    x0, y0 = pairs[0]
    before = float(relative_block_error(inputs.outputs(decoder_layers(masked)[1][0], 0, x0), y0, x0))
    metrics = reconstruct_blocks(model, spec, _windows(), BlockFit(steps=40, lr=3e-3, windows_per_step=2))
    for name, linear in select_linears(model).items():
        keep = spec.layers[name].keep_mask()
        assert torch.equal(linear.weight[~keep], torch.zeros(int((~keep).sum())))
    after = float(relative_block_error(inputs.outputs(layers[0], 0, x0), y0, x0))
    assert after < 0.5 * before
    assert [m["block"] for m in metrics] == [0, 1]
    assert metrics[0]["relative_error"] == pytest.approx(after, rel=1e-4)
    assert all(m["relative_error"] < m["first_step_error"] for m in metrics)


def test_block_fit_corrects_the_error_of_the_blocks_before_not_only_its_own():
    # Block 1 keeps every weight. Fitted to the dense block on its own (pruned-model) inputs it would
    # have nothing to change; fitted to the dense model's activations it must absorb block 0's error.
    model = build_tiny_llama(320)
    block_1 = {n for n in select_linears(model) if n.startswith("model.layers.1.")}
    spec = _all_kept(_hybrid_spec(model), block_1)
    dense = {n: l.weight.detach().clone() for n, l in select_linears(model).items()}
    inputs, pairs = _dense_stream_targets(model, _windows())
    _, layers = decoder_layers(model)
    reconstruct_blocks(model, spec, _windows(), BlockFit(steps=40, lr=3e-4, windows_per_step=2))
    linears = select_linears(model)
    assert sum(float((linears[n].weight - dense[n]).abs().max()) for n in block_1) > 1e-4
    (x0, _), (x1, y1) = pairs
    x1_pruned = inputs.outputs(layers[0], 0, x0)  # what the reconstructed block 0 hands block 1
    fitted = float(relative_block_error(inputs.outputs(layers[1], 1, x1_pruned), y1, x1))
    with torch.no_grad():
        for n in block_1:
            linears[n].weight.copy_(dense[n])
    assert fitted < 0.9 * float(relative_block_error(inputs.outputs(layers[1], 1, x1_pruned), y1, x1))


def test_block_fit_with_nothing_pruned_changes_nothing():
    # every block already reproduces the dense model exactly: zero loss, zero gradient, no Adam move
    model = build_tiny_llama(320)
    before = {n: l.weight.detach().clone() for n, l in select_linears(model).items()}
    spec = _all_kept(_hybrid_spec(model), set(before))
    metrics = reconstruct_blocks(model, spec, _windows(), BlockFit(steps=5, lr=1e-2, windows_per_step=2))
    for name, linear in select_linears(model).items():
        assert torch.equal(linear.weight, before[name])
    assert all(m["relative_error"] == 0.0 for m in metrics)


def test_block_mode_through_reconstruct_model_and_its_refusals():
    model = build_tiny_llama(320)
    spec = _hybrid_spec(model)
    new = reconstruct_model(model, spec, _windows(), "block", block_fit=BlockFit(steps=2))
    assert new.metadata["reconstruction"] == "block" and new.metadata["reconstruction_steps_per_block"] == 2
    assert all(torch.equal(new.layers[n].keep_mask(), spec.layers[n].keep_mask()) for n in spec.layers)
    with pytest.raises(PatchsparseError, match="at least one step"):
        reconstruct_model(model, spec, _windows(), "block", block_fit=BlockFit(steps=0))
    with pytest.raises(PatchsparseError, match="positive learning rate"):
        reconstruct_model(model, spec, _windows(), "block", block_fit=BlockFit(lr=0.0))


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
