"""The compiled CPU kernel against the masked dense product (skipped when it cannot be built here,
unless kernels are required: PATCHSPARSE_REQUIRE_KERNELS=1, as in CI, makes a failed build fail them)."""

import pytest
import torch
import torch.nn.functional as F

from patchsparse.kernels import cpu as cpu_kernel
from patchsparse.kernels.packing import pack_rowblocks, unpack_rowblocks
from patchsparse.kernels.synthetic import synthetic_layer_mask
from patchsparse.native import kernels_required

pytestmark = pytest.mark.skipif(not kernels_required() and not cpu_kernel.cpu_kernel_available(),
                                reason=f"CPU kernel: {cpu_kernel.cpu_kernel_status()}")

SHAPES = [(64, 64, (16, 16)), (100, 576, (128, 128)), (37, 44, (5, 12)), (130, 72, (64, 8)), (576, 576, (128, 128))]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2),
             torch.float16: dict(rtol=2e-3, atol=2e-3)}


def test_hand_computed_product():
    # 8 x 8 weight, one 2:4 chunk: row r keeps inputs 0 and 3 (value r+1 and 10) and 5, 6 (2 and -1).
    weight = torch.zeros(8, 8)
    weight[:, 0] = torch.arange(1, 9, dtype=torch.float32)
    weight[:, 3], weight[:, 5], weight[:, 6] = 10.0, 2.0, -1.0
    from patchsparse.masks import LayerMask
    mask = LayerMask(weight != 0, "2:4")
    x = torch.tensor([[1.0, 100.0, 100.0, 0.5, 100.0, 3.0, 4.0, 100.0]])
    y = cpu_kernel.cpu_hybrid_linear(x, pack_rowblocks(weight, mask), torch.full((8,), 0.25))
    # (r+1)*1 + 10*0.5 + 2*3 - 1*4 + 0.25 = r + 8.25; the 100s must never be read
    assert torch.equal(y, (torch.arange(8, dtype=torch.float32) + 8.25)[None])


@pytest.mark.parametrize("out_f,in_f,tile", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.45, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_masked_dense(out_f, in_f, tile, sparsity, dtype):
    torch.manual_seed(out_f * 7 + in_f)
    weight = torch.randn(out_f, in_f)
    bias = torch.randn(out_f)
    packed = pack_rowblocks(weight, synthetic_layer_mask(weight, sparsity, tile), dtype)
    reference_weight = unpack_rowblocks(packed).float()          # the weights rounded to `dtype`
    for tokens in (1, 3, 4, 8, 9):
        x = torch.randn(tokens, in_f).to(dtype)
        expected = F.linear(x.float(), reference_weight, bias)
        for isa in (2, 1, 0):                                   # AVX-512, AVX2, scalar (where built)
            got = cpu_kernel.cpu_hybrid_linear(x, packed, bias.to(dtype), isa)
            assert got.dtype == dtype and got.shape == (tokens, out_f)
            torch.testing.assert_close(got.float(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_unpack_matches_reference(dtype):
    weight = torch.randn(100, 576)
    packed = pack_rowblocks(weight, synthetic_layer_mask(weight, 0.35), dtype)
    assert torch.equal(cpu_kernel.cpu_unpack(packed), unpack_rowblocks(packed))


def test_threads_give_the_same_result():
    weight = torch.randn(512, 512)   # large enough to be split between threads
    packed = pack_rowblocks(weight, synthetic_layer_mask(weight, 0.45))
    x = torch.randn(2, 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpu_kernel.cpu_hybrid_linear(x, packed, None)
        torch.set_num_threads(2)
        double = cpu_kernel.cpu_hybrid_linear(x, packed, None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(single, double)


@pytest.mark.parametrize("out_f,in_f,tile", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_path_matches_masked_dense(out_f, in_f, tile, dtype):
    torch.manual_seed(out_f + 3 * in_f)
    weight = torch.randn(out_f, in_f)
    bias = torch.randn(out_f)
    packed = pack_rowblocks(weight, synthetic_layer_mask(weight, 0.35, tile), dtype)
    reference_weight = unpack_rowblocks(packed)
    x = torch.randn(70, in_f).to(dtype)
    expected = F.linear(x, reference_weight, bias.to(dtype))
    for band_bytes in (1, 4096, 1 << 22):                      # 8-row bands, a few bands, one band
        got = cpu_kernel.cpu_hybrid_linear_prefill(x, packed, bias, band_bytes)
        assert got.dtype == dtype and got.shape == (70, out_f)
        torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])


def test_instruction_set_cap_from_the_environment(monkeypatch):
    from patchsparse.errors import PatchsparseError
    from patchsparse.kernels.cpu import isa_cap

    assert isa_cap() == 2                                    # unset: the best the build has
    monkeypatch.setenv("PATCHSPARSE_CPU_ISA", "AVX2")
    assert isa_cap() == 1
    monkeypatch.setenv("PATCHSPARSE_CPU_ISA", "scalar")
    assert isa_cap() == 0
    monkeypatch.setenv("PATCHSPARSE_CPU_ISA", "sse4")
    with pytest.raises(PatchsparseError, match="PATCHSPARSE_CPU_ISA"):
        isa_cap()
