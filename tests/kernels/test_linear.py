"""HybridLinear and convert_model: every backend against the masked dense layer and model."""

import copy

import pytest
import torch
import torch.nn as nn

from patchsparse.errors import PatchsparseError
from patchsparse.kernels import HybridLinear, convert_model, synthetic_layer_mask, synthetic_spec
from patchsparse.kernels import cpu as cpu_kernel
from patchsparse.kernels.linear import CPU_DIRECT_MAX_TOKENS
from patchsparse.masks import HybridMaskSpec, LayerMask
from patchsparse.models import select_linears

CPU_BACKENDS = ["cpu", "reference", "split", "triton"]  # triton falls back to the reference here


def masked_linear(linear: nn.Linear, mask: LayerMask) -> nn.Linear:
    out = copy.deepcopy(linear)
    with torch.no_grad():
        out.weight.mul_(mask.keep_mask())
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["stripe"])
@pytest.mark.parametrize("bias", [True, False])
def test_hybrid_linear_matches_masked_linear(backend, bias):
    torch.manual_seed(0)
    linear = nn.Linear(576, 100, bias=bias)                   # ragged: 576 in 128-wide tiles, 100 rows
    tile = (128, 576) if backend == "stripe" else (128, 128)  # stripe needs whole-row tiles
    mask = synthetic_layer_mask(linear.weight, 0.35, (32, 576) if backend == "stripe" else tile)
    hybrid = HybridLinear.from_dense(linear, mask, backend=backend)
    expected_layer = masked_linear(linear, mask)
    for shape in [(1, 576), (2, 3, 576), (70, 576)]:          # 70 tokens: the CPU prefill path
        x = torch.randn(shape)
        torch.testing.assert_close(hybrid(x), expected_layer(x), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hybrid.dense_weight(), expected_layer.weight, rtol=0, atol=0)


def test_prefill_threshold_is_exercised():
    assert CPU_DIRECT_MAX_TOKENS[torch.float32] < 70


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_layer(dtype):
    torch.manual_seed(1)
    linear = nn.Linear(256, 192).to(dtype)
    mask = synthetic_layer_mask(linear.weight, 0.45, (64, 64))
    hybrid = HybridLinear.from_dense(linear, mask, backend="cpu")
    expected = masked_linear(linear.float(), mask)
    for tokens in (1, 2, 5):
        x = torch.randn(tokens, 256).to(dtype)
        got = hybrid(x)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected(x.float()), rtol=2e-2, atol=2e-2)


def test_stripe_refuses_a_mask_with_mixed_rows():
    linear = nn.Linear(64, 64)
    mask = synthetic_layer_mask(linear.weight, 0.35, (16, 16))
    with pytest.raises(PatchsparseError, match="stripe"):
        HybridLinear.from_dense(linear, mask, backend="stripe")
    with pytest.raises(PatchsparseError, match="unknown kernel backend"):
        HybridLinear.from_dense(linear, mask, backend="magic")


def test_auto_picks_cpu_for_cpu_weights():
    linear = nn.Linear(64, 64)
    hybrid = HybridLinear.from_dense(linear, synthetic_layer_mask(linear.weight, 0.25, (16, 16)))
    assert hybrid.backend == "cpu" and "backend=cpu" in repr(hybrid)


def test_module_to_dtype_moves_the_packed_values():
    linear = nn.Linear(64, 32)
    mask = synthetic_layer_mask(linear.weight, 0.45, (16, 16))
    hybrid = HybridLinear.from_dense(linear, mask)
    x = torch.randn(3, 64)
    assert hybrid(x).dtype == torch.float32                   # caches the fp32 fast path, if any
    hybrid = hybrid.to(torch.bfloat16)
    assert hybrid.packed.values.dtype == torch.bfloat16 and hybrid.packed.meta.dtype == torch.uint8
    expected = (linear.weight * mask.keep_mask()).to(torch.bfloat16)
    torch.testing.assert_close(hybrid.dense_weight(), expected)
    torch.testing.assert_close(hybrid(x.to(torch.bfloat16)).float(),
                               x @ expected.float().T + linear.bias.to(torch.bfloat16).float(), rtol=2e-2, atol=2e-2)


def tiny_spec(model, sparsity, tile=(16, 16)):
    return synthetic_spec(select_linears(model), sparsity, tile, seed=5)


def greedy(model, ids, steps):
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("backend", ["cpu", "reference", "split"])
def test_converted_model_generates_the_masked_models_tokens(tiny_model, backend):
    spec = tiny_spec(tiny_model, 0.45)
    masked = copy.deepcopy(tiny_model)
    spec.apply_(masked)
    converted = convert_model(tiny_model, spec, backend=backend)
    assert len(converted) == len(spec.layers) == 14
    assert all(isinstance(tiny_model.get_submodule(n), HybridLinear) for n in spec.layers)
    ids = torch.tensor([[5, 17, 42, 9, 101, 7]])
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(ids).logits, masked(ids).logits, rtol=1e-4, atol=1e-4)
        assert greedy(tiny_model, ids, 12) == greedy(masked, ids, 12)


def test_convert_model_checks_everything_before_changing_anything(tiny_model):
    spec = tiny_spec(tiny_model, 0.25)
    layers = dict(spec.layers)
    name = next(iter(layers))
    layers["model.layers.9.mlp.up_proj"] = layers[name]     # a layer the model does not have
    with pytest.raises(PatchsparseError, match="does not have"):
        convert_model(tiny_model, HybridMaskSpec(layers))
    bad = dict(spec.layers)
    bad[name] = LayerMask(torch.ones(bad[name].shape, dtype=torch.bool), "unstructured")
    with pytest.raises(PatchsparseError, match="2:4"):
        convert_model(tiny_model, HybridMaskSpec(bad))
    assert not any(isinstance(m, HybridLinear) for m in tiny_model.modules())


def test_reference_fallback_when_kernel_unavailable(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "load_cpu_kernel", lambda: None)
    linear = nn.Linear(64, 48)
    mask = synthetic_layer_mask(linear.weight, 0.45, (16, 16))
    hybrid = HybridLinear.from_dense(linear, mask, backend="cpu")
    x = torch.randn(2, 64)
    torch.testing.assert_close(hybrid(x), masked_linear(linear, mask)(x))
    assert hybrid._direct is False                             # the compiled path was not taken


@pytest.mark.parametrize("packed_speedup", [0.5, 2.0])
def test_auto_conversion_keeps_a_layer_dense_where_packing_is_measured_slower(tiny_model, monkeypatch,
                                                                               packed_speedup):
    import patchsparse.kernels.linear as linear_module
    from patchsparse.inference import kernel_paths
    from patchsparse.kernels import DenseLinear

    measured = []
    monkeypatch.setattr(linear_module, "decode_speedup",
                        lambda packed, dense: measured.append(type(packed)) or packed_speedup)
    spec = tiny_spec(tiny_model, 0.45)
    masked = copy.deepcopy(tiny_model)
    spec.apply_(masked)
    dense_before = {n: tiny_model.get_submodule(n).weight.detach().clone() for n in spec.layers}
    convert_model(tiny_model, spec)                                   # auto: measured per layer
    assert measured == [HybridLinear] * len(spec.layers)
    kept = DenseLinear if packed_speedup < 1 else HybridLinear
    assert all(type(tiny_model.get_submodule(n)) is kept for n in spec.layers)
    if kept is DenseLinear:
        assert kernel_paths(tiny_model) == {"dense (packed was slower)": len(spec.layers)}
        for name, weight in dense_before.items():                     # the mask is applied, not the raw weight
            layer = tiny_model.get_submodule(name)
            torch.testing.assert_close(layer.weight, weight * spec.layers[name].keep_mask())
            assert layer.measured_speedup == packed_speedup
    ids = torch.tensor([[5, 17, 42, 9, 101, 7]])
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(ids).logits, masked(ids).logits, rtol=1e-4, atol=1e-4)


def test_explicit_backend_converts_without_measuring(tiny_model, monkeypatch):
    import patchsparse.kernels.linear as linear_module

    def fail(*args):
        raise AssertionError("an explicit backend must not be second-guessed")

    monkeypatch.setattr(linear_module, "decode_speedup", fail)
    spec = tiny_spec(tiny_model, 0.45)
    convert_model(tiny_model, spec, backend="reference")
    assert all(isinstance(tiny_model.get_submodule(n), HybridLinear) for n in spec.layers)


def test_decode_speedup_is_the_ratio_of_the_two_timings():
    from patchsparse.kernels.linear import decode_speedup

    fast, slow = nn.Linear(64, 64), nn.Linear(64, 64)
    with torch.no_grad():
        slow_forward = slow.forward
        slow.forward = lambda x: [slow_forward(x) for _ in range(20)][-1]    # 20 products per call
        assert decode_speedup(fast, slow) > 2.0        # (packed, dense): the packed side is the fast one
        assert decode_speedup(slow, fast) < 0.5
