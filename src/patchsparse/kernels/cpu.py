"""The compiled CPU kernel (csrc/hybrid_cpu.cpp): built on first use, cached, optional.

Built by `patchsparse.native` with `-O3 -march=native -fopenmp`, so AVX2/FMA/F16C (or AVX-512)
are used where the CPU has them. When it cannot be built, callers fall back to the pure-PyTorch
reference; `cpu_kernel_status()` says why. PATCHSPARSE_NO_KERNELS=1 forces the reference;
PATCHSPARSE_REQUIRE_KERNELS=1 makes a failed build an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch

from patchsparse.errors import PatchsparseError
from patchsparse.kernels.packing import RowBlockPacked
from patchsparse.native import NativeKernel

SOURCE = Path(__file__).resolve().parent / "csrc" / "hybrid_cpu.cpp"
# PATCHSPARSE_CPU_ISA=avx2 (or scalar) caps the kernel's instruction set below what it was built
# for: measuring the AVX2 path on an AVX-512 machine (with ATEN_CPU_CAPABILITY=avx2 and
# MKL_ENABLE_INSTRUCTIONS=AVX2 capping the dense side alike), and tests.
ISA_LEVELS = {"avx512": 2, "avx2": 1, "scalar": 0}
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]
KERNEL = NativeKernel("hybrid_cpu", SOURCE, CFLAGS, label="hybrid CPU")


def load_cpu_kernel() -> ModuleType | None:
    """The compiled module, building it the first time; None when it cannot be built."""
    return KERNEL.load()


def isa_cap() -> int:
    """The instruction-set level the kernel may use (PATCHSPARSE_CPU_ISA; AVX-512 by default)."""
    name = os.environ.get("PATCHSPARSE_CPU_ISA", "avx512").strip().lower()
    if name not in ISA_LEVELS:
        raise PatchsparseError(f"PATCHSPARSE_CPU_ISA={name!r}: choose {', '.join(ISA_LEVELS)}")
    return ISA_LEVELS[name]


def cpu_kernel_status() -> str:
    status = KERNEL.status()
    if status != "built":
        return status
    level = min(KERNEL.load().vector_level(), isa_cap())
    return {2: "vector (AVX-512)", 1: "vector (AVX2+FMA)"}.get(level, "portable scalar loop")


def cpu_kernel_available() -> bool:
    return load_cpu_kernel() is not None


def cpu_hybrid_linear(x: torch.Tensor, packed: RowBlockPacked, bias: torch.Tensor | None,
                      isa: int | None = None) -> torch.Tensor:
    """x (tokens, in) -> (tokens, out) with the compiled kernel. Caller checks availability.

    `isa` caps the instruction set: 2 = AVX-512, 1 = AVX2+FMA, 0 = scalar (default: `isa_cap()`);
    a level the build lacks falls back to the next one.
    """
    module = load_cpu_kernel()
    assert module is not None, "cpu_hybrid_linear called without the compiled kernel"
    return module.hybrid_linear(x, packed.values, packed.meta, packed.chunk_cols, packed.n_sparse,
                                packed.value_offsets, packed.meta_offsets, packed.out_features,
                                packed.in_features, bias, isa_cap() if isa is None else isa)


def cpu_hybrid_linear_prefill(x: torch.Tensor, packed: RowBlockPacked, bias: torch.Tensor | None,
                              band_bytes: int = 2 << 20) -> torch.Tensor:
    """Many tokens: expand bands of rows (about `band_bytes`) into a reused buffer, BLAS GEMM each."""
    module = load_cpu_kernel()
    assert module is not None, "cpu_hybrid_linear_prefill called without the compiled kernel"
    return module.hybrid_linear_prefill(x, packed.values, packed.meta, packed.chunk_cols, packed.n_sparse,
                                        packed.value_offsets, packed.meta_offsets, packed.out_features,
                                        packed.in_features, bias, band_bytes)


def cpu_unpack(packed: RowBlockPacked) -> torch.Tensor:
    """The masked dense weight with the compiled kernel (fast decompression for prefill)."""
    module = load_cpu_kernel()
    assert module is not None, "cpu_unpack called without the compiled kernel"
    return module.hybrid_unpack(packed.values, packed.meta, packed.chunk_cols, packed.n_sparse,
                                packed.value_offsets, packed.meta_offsets, packed.out_features,
                                packed.in_features)
