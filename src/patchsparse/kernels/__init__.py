"""Accelerated inference for hybrid (dense / 2:4) tile masks.

`HybridLinear.from_dense(linear, layer_mask)` packs one layer, `convert_model(model, spec)` a
whole model. Every kernel has a pure-PyTorch reference (`backend="reference"`) that is its test
oracle and its fallback. See docs/KERNELS.md for the formats, the measurements and the status of
the GPU paths.
"""

from patchsparse.kernels.cpu import cpu_kernel_available, cpu_kernel_status
from patchsparse.kernels.linear import BACKENDS, DenseLinear, HybridLinear, choose_backend, convert_model
from patchsparse.kernels.packing import RowBlockPacked, pack_rowblocks, unpack_rowblocks
from patchsparse.kernels.synthetic import synthetic_layer_mask, synthetic_spec

__all__ = [
    "BACKENDS",
    "DenseLinear",
    "HybridLinear",
    "RowBlockPacked",
    "choose_backend",
    "convert_model",
    "cpu_kernel_available",
    "cpu_kernel_status",
    "pack_rowblocks",
    "synthetic_layer_mask",
    "synthetic_spec",
    "unpack_rowblocks",
]
