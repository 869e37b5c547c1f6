"""The compiled CPU kernel: built on first use with the machine's C++ compiler, cached, optional.

`torch.utils.cpp_extension.load` compiles `csrc/hybrid_cpu.cpp` with `-O3 -march=native -fopenmp`
(so AVX2/FMA/F16C are used where the CPU has them) into a cache folder keyed by the source, the
torch version and the CPU, so a cache shared between machines never runs code built for another
CPU. When no compiler, no ninja or a failing build makes the kernel unavailable, callers fall back
to the pure-PyTorch reference; `cpu_kernel_status()` says why.
Set PATCHSPARSE_NO_CPU_KERNEL=1 to force the reference path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch

from patchsparse.kernels.packing import RowBlockPacked

SOURCE = Path(__file__).resolve().parent / "csrc" / "hybrid_cpu.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]

_lock = threading.Lock()
_module: ModuleType | None = None
_status: str | None = None  # None = not tried yet


def _cpu_identity() -> str:
    """The CPU model and feature flags (Linux), else the platform string."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def build_directory() -> Path:
    from patchsparse.models.builtin import cache_root

    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), torch.__version__.encode(), " ".join(CFLAGS).encode(),
                                     _cpu_identity().encode()])).hexdigest()[:16]
    return cache_root() / "kernels" / f"hybrid_cpu-{key}"


def _put_ninja_on_path() -> None:
    """torch looks for `ninja` on PATH; the PyPI package's binary is not there unless the venv is active."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


def load_cpu_kernel() -> ModuleType | None:
    """The compiled module, building it the first time; None when it cannot be built."""
    global _module, _status
    if _status is not None:  # fast path: called on every forward
        return _module
    with _lock:
        if _status is not None:
            return _module
        if os.environ.get("PATCHSPARSE_NO_CPU_KERNEL", "") not in ("", "0"):
            _status = "disabled by PATCHSPARSE_NO_CPU_KERNEL"
            return None
        try:
            from torch.utils.cpp_extension import load

            from patchsparse.utils import log

            _put_ninja_on_path()
            directory = build_directory()
            directory.mkdir(parents=True, exist_ok=True)
            if not any(directory.glob("*.so")):
                log("building the hybrid CPU kernel (once, about a minute) …")
            _module = load(name="patchsparse_hybrid_cpu", sources=[str(SOURCE)], extra_cflags=CFLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False)
            _status = {2: "vector (AVX-512)", 1: "vector (AVX2+FMA)"}.get(_module.vector_level(),
                                                                         "portable scalar loop")
        except Exception as exc:  # no compiler, no ninja, build error: the reference still works
            _module = None
            _status = f"unavailable ({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''})"
        return _module


def cpu_kernel_status() -> str:
    load_cpu_kernel()
    return _status or "unknown"


def cpu_kernel_available() -> bool:
    return load_cpu_kernel() is not None


def cpu_hybrid_linear(x: torch.Tensor, packed: RowBlockPacked, bias: torch.Tensor | None,
                      isa: int = 2) -> torch.Tensor:
    """x (tokens, in) -> (tokens, out) with the compiled kernel. Caller checks availability.

    `isa` caps the instruction set: 2 = AVX-512, 1 = AVX2+FMA, 0 = scalar (for tests); a level
    the build lacks falls back to the next one.
    """
    module = load_cpu_kernel()
    assert module is not None, "cpu_hybrid_linear called without the compiled kernel"
    return module.hybrid_linear(x, packed.values, packed.meta, packed.chunk_cols, packed.n_sparse,
                                packed.value_offsets, packed.meta_offsets, packed.out_features,
                                packed.in_features, bias, isa)


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
