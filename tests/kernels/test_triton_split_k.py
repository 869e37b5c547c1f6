"""The Triton kernel at 33–130 tokens, in bf16 and with split-K, under Triton's CPU interpreter.

Needs `triton` importable (skipped otherwise, as in CPU-only CI). The interpreter multiplies
bf16 `tl.dot` operands as their raw 16-bit patterns (it stores bf16 as uint16), so the check
widens them to fp32 inside the interpreter's dot first: what is tested is the kernel's loads,
2:4 expansion, split-K slices, masks and stores in bf16, not the interpreter's arithmetic.
"""

import pytest

from tests.kernels.interpreter import run_under_interpreter

pytest.importorskip("triton")

CHECK = r"""
import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

original_dot = interpreter.InterpreterBuilder.create_dot

def widened_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h
    return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

interpreter.InterpreterBuilder.create_dot = widened_dot

from patchsparse.kernels.synthetic import synthetic_layer_mask
from patchsparse.kernels.triton_tiles import pack_tiles
torch.manual_seed(0)
for out_f, in_f, tile, block in [(100, 192, (32, 32), 32), (37, 44, (5, 12), 16)]:
    weight = torch.randn(out_f, in_f)
    mask = synthetic_layer_mask(weight, 0.45, tile)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):   # relative to max |y|
        packed = pack_tiles(weight, mask, dtype, block_n=block, block_k=block)
        reference = packed.dense_weight().float()
        for tokens in (33, 130):
            for split_k in (1, 3):
                x = torch.randn(tokens, in_f).to(dtype)
                got = packed.forward(x, split_k=split_k)
                assert got.dtype == dtype and got.shape == (tokens, out_f)
                expected = x.float() @ reference.T
                err = ((got.float() - expected).abs().max() / expected.abs().max()).item()
                assert err < tol, (out_f, in_f, dtype, tokens, split_k, err)
        sliced = torch.randn(33, 2 * in_f).to(dtype)[:, ::2]         # a strided view: made contiguous first
        err = ((packed.forward(sliced).float() - sliced.float() @ reference.T).abs().max()).item()
        assert err < 1e-2 * (sliced.float() @ reference.T).abs().max().item(), err
print("interpreter ok")
"""


def test_triton_kernel_tokens_bf16_split_k_under_interpreter():
    run_under_interpreter(CHECK)
