"""GPU formats on a real GPU (marked `gpu`: skipped without CUDA)."""

import copy

import pytest
import torch
import torch.nn as nn

from patchsparse.kernels import HybridLinear, convert_model, synthetic_layer_mask, synthetic_spec
from patchsparse.kernels.split import semi_structured_supported
from patchsparse.kernels.triton_tiles import triton_available
from patchsparse.models import select_linears

pytestmark = pytest.mark.gpu


UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def rounding_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What fp16/bf16 rounding allows in x @ Wᵀ + b, per output. (tokens, out)

    Products and sums are fp32 (exact enough); what rounds to `dtype` is the output and at most a
    few partial sums on the way (the 2:4 part, the dense tiles, a split-K slice, the bias add),
    each by at most u·|value|. A partial sum of the products x_k·w_k stays within a few times
    their ‖·‖₂ (and |y| is about ‖x ⊙ w‖₂), so u·(2|y| + |b| + 12‖x ⊙ w‖₂), about 14u‖x ⊙ w‖₂,
    holds with margin. One wrong weight in a row of n kept weights shifts it by |x_j·Δw|, about
    ‖x ⊙ w‖₂/√n per token and a few times that at the largest |x_j| of 2048 tokens: for n = 370
    (576 inputs) 7-25 times the fp16 bound and 1-3 times the bf16 one. The former tolerance
    (3% of |y| plus 0.05·√max|y|, about 0.2‖x ⊙ w‖₂) let a wrong weight through.
    """
    u = UNIT_ROUNDOFF[dtype]
    x, weight, bias = x.double(), weight.double(), bias.double()
    spread = ((x * x) @ (weight * weight).T).sqrt()
    return u * (2 * (x @ weight.T + bias).abs() + bias.abs() + 12 * spread)


def assert_within_rounding(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == (x.shape[0], weight.shape[0])
    assert torch.isfinite(got).all(), "a result is missing (NaN or inf)"
    expected = x.double() @ weight.double().T + bias.double()
    error = (got.double() - expected).abs()
    ratio = error / rounding_bound(x, weight, bias, dtype)
    bad = ratio > 1
    rows = sorted(set(bad.nonzero()[:, 1].tolist()))
    assert not bad.any(), (f"{int(bad.sum())} outputs beyond {dtype} rounding (worst {float(ratio.max()):.1f}x "
                           f"the bound) in rows {rows[:10]}")


def backend_or_skip(backend: str, dtype: torch.dtype) -> None:
    """Skip, visibly, a backend this GPU or this install cannot run; never drop it silently."""
    device = torch.device("cuda")
    if backend in ("split", "stripe") and not semi_structured_supported(device, dtype):
        pytest.skip(f"{backend}: no semi-structured 2:4 here (compute capability "
                    f"{torch.cuda.get_device_capability(device)})")
    if backend == "triton" and not triton_available(device):
        pytest.skip("triton: not installed")


@pytest.mark.parametrize("backend", ["reference", "split", "stripe", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f", [(576, 576), (1536, 576), (100, 576), (4096, 4096)])
def test_gpu_backends_match_masked_dense(backend, dtype, out_f, in_f):
    backend_or_skip(backend, dtype)
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, device="cuda", dtype=dtype)
    tile = (128, in_f) if backend == "stripe" else (128, 128)
    mask = synthetic_layer_mask(linear.weight, 0.35, tile)
    hybrid = HybridLinear.from_dense(linear, mask, backend=backend)
    if backend in ("split", "stripe"):
        part = hybrid.packed.sparse_part
        assert part is not None and part.accelerated, "semi-structured 2:4 was not used"
    weight = linear.weight.float() * mask.keep_mask().cuda()      # the dtype's values, masked
    for tokens in (1, 16, 128, 2048):
        x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
        with torch.no_grad():
            got = hybrid(x)
        assert_within_rounding(got, x, weight, linear.bias.detach(), dtype)


def test_converted_tiny_model_on_gpu(tiny_model):
    model = tiny_model.to("cuda", torch.float16)
    spec = synthetic_spec(select_linears(model), 0.45, (16, 16))
    masked = copy.deepcopy(model)
    spec.apply_(masked)
    convert_model(model, spec)
    ids = torch.tensor([[5, 17, 42, 9]], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), masked(ids).logits.float(), rtol=2e-2, atol=2e-2)
