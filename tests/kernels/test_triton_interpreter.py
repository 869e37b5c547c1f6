"""The Triton kernel's index arithmetic, run by Triton's CPU interpreter (needs `triton` installed).

No GPU is needed: TRITON_INTERPRET=1 executes the kernel with NumPy. It checks what the kernel
computes, not its speed; it is skipped where Triton is not installed (e.g. CPU-only CI).
"""

import pytest

from tests.kernels.interpreter import run_under_interpreter

pytest.importorskip("triton")

CHECK = r"""
import torch
from patchsparse.kernels.synthetic import synthetic_layer_mask
from patchsparse.kernels.triton_tiles import pack_tiles
for out_f, in_f, tile, block in [(100, 576, (128, 128), 64), (37, 44, (5, 12), 16), (96, 128, (32, 32), 32)]:
    for sparsity in (0.0, 0.45, 0.5):
        weight = torch.randn(out_f, in_f)
        mask = synthetic_layer_mask(weight, sparsity, tile)
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):  # relative to max |y|
            packed = pack_tiles(weight, mask, dtype, block_n=block, block_k=block)
            reference = packed.dense_weight().float()
            for tokens in (1, 5, 20):
                x = torch.randn(tokens, in_f).to(dtype)
                got = packed.forward(x).float()
                expected = x.float() @ reference.T
                err = ((got - expected).abs().max() / expected.abs().max()).item()
                assert err < tol, (out_f, in_f, tile, sparsity, dtype, tokens, err)
print("interpreter ok")
"""


def test_triton_kernel_under_interpreter():
    run_under_interpreter(CHECK)
