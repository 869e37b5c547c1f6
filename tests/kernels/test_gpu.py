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


def gpu_backends(dtype):
    backends = ["reference"]
    if semi_structured_supported(torch.device("cuda"), dtype):
        backends += ["split", "stripe"]
    if triton_available(torch.device("cuda")):
        backends.append("triton")
    return backends


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f", [(576, 576), (1536, 576), (100, 576), (4096, 4096)])
def test_gpu_backends_match_masked_dense(dtype, out_f, in_f):
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, device="cuda", dtype=dtype)
    for backend in gpu_backends(dtype):
        tile = (128, in_f) if backend == "stripe" else (128, 128)
        mask = synthetic_layer_mask(linear.weight, 0.35, tile)
        hybrid = HybridLinear.from_dense(linear, mask, backend=backend)
        if backend in ("split", "stripe"):
            part = hybrid.packed.sparse_part
            assert part is None or part.accelerated, "semi-structured 2:4 was not used"
        weight = (linear.weight.float() * mask.keep_mask().cuda())
        for tokens in (1, 16, 128, 2048):
            x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
            expected = x.float() @ weight.T + linear.bias.float()
            got = hybrid(x).float()
            torch.testing.assert_close(got, expected, rtol=3e-2, atol=5e-2 * expected.abs().max().item() ** 0.5)


def test_converted_tiny_model_on_gpu(tiny_model):
    model = tiny_model.to("cuda", torch.float16)
    spec = synthetic_spec(select_linears(model), 0.45, (16, 16))
    masked = copy.deepcopy(model)
    spec.apply_(masked)
    convert_model(model, spec)
    ids = torch.tensor([[5, 17, 42, 9]], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), masked(ids).logits.float(), rtol=2e-2, atol=2e-2)
