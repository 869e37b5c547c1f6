"""`HybridLinear`: a drop-in `nn.Linear` replacement holding a packed dense/2:4 weight.

Formats ("backends"), chosen once at conversion:

* `cpu`: row-block format with the compiled CPU kernel for decode (few tokens) and decompress +
  GEMM for long prompts; falls back to `reference` when the kernel cannot be built;
* `reference`: the same row-block buffers, expanded in pure PyTorch and multiplied densely: the
  test oracle and the fallback everywhere (any device);
* `stripe` / `split`: 2:4 semi-structured GEMM plus cuBLAS (GPU, prefill), see `split.py`;
* `triton`: tile-walking Triton kernel (GPU, decode), see `triton_tiles.py`.

`auto` picks `cpu` for CPU weights; on CUDA `stripe` (rows wholly dense or 2:4) or `split` when
a 2:4 GEMM really runs there (cuSPARSELt, or CUTLASS on sm8x; fp16/bf16), else `triton` when
installed, else `reference`. Then, per layer, `convert_model` times the packed layer against the
masked dense product at one token and keeps the layer dense (`DenseLinear`) where packing loses
here: small shapes on the CPU, and on GPUs whose 2:4 GEMM costs more per call than the dense one
(docs/KERNELS.md). An explicit GPU backend whose kernel is missing on a CUDA weight is an
error at conversion; wherever a layer ends up multiplying an expanded or emulated weight instead
(CPU tests, a `cpu` layer moved to CUDA) it says so once on stderr, and `kernel_path` tells which
path each layer takes. The packed tensors are buffers: `state_dict()` holds them and `.to()` moves
them (the 2:4 GEMM operand is rebuilt on the new device).
The GPU formats were first run on an H200 (docs/KERNELS.md, "GPU status"): correct, and slower
than dense at every shape measured there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchsparse.errors import PatchsparseError
from patchsparse.kernels import cpu as cpu_kernel
from patchsparse.kernels.packing import RowBlockPacked, pack_rowblocks, unpack_rowblocks
from patchsparse.kernels.split import (SplitPacked, StripePacked, TwoFourOperand, is_row_homogeneous, pack_split,
                                       pack_stripe, semi_structured_backend, semi_structured_supported)
from patchsparse.kernels.timing import time_interleaved
from patchsparse.kernels.triton_tiles import TilePacked, pack_tiles, triton_available
from patchsparse.masks.spec import HybridMaskSpec, LayerMask
from patchsparse.utils import log

BACKENDS = ("auto", "cpu", "reference", "stripe", "split", "triton")

# Above this many tokens the CPU path expands bands of the weight and runs the BLAS GEMM instead
# of the decode kernel (crossovers measured with benchmarks/hybrid_matmul.py, docs/KERNELS.md):
# fp32 BLAS is slow for small batches; bf16 BLAS (AVX512-BF16 dot products) catches up with the
# decode kernel at about 16 tokens.
CPU_DIRECT_MAX_TOKENS = {torch.float32: 64, torch.bfloat16: 16, torch.float16: 64}


def choose_backend(weight: torch.Tensor, mask: LayerMask, dtype: torch.dtype) -> str:
    if weight.device.type != "cuda":
        return "cpu"
    if semi_structured_supported(weight.device, dtype):
        return "stripe" if is_row_homogeneous(mask) else "split"
    return "triton" if triton_available(weight.device) else "reference"


def packed_tensors(packed: Any) -> dict[str, torch.Tensor]:
    """Every tensor of a packed format by name (a 2:4 operand by its portable values and positions)."""
    tensors = {}
    for f in dataclasses.fields(packed):
        value = getattr(packed, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value
        elif isinstance(value, TwoFourOperand):
            tensors[f"{f.name}_values"], tensors[f"{f.name}_positions"] = value.values, value.positions
    return tensors


def rebuild_packed(packed: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`packed` with its tensors replaced by `tensors` (2:4 operands re-prepared on their new device)."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(packed):
        value = getattr(packed, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = tensors[f.name]
        elif isinstance(value, TwoFourOperand):
            changes[f.name] = TwoFourOperand(value.out_features, value.in_features, tensors[f"{f.name}_values"],
                                             tensors[f"{f.name}_positions"])
    return dataclasses.replace(packed, **changes)


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log(f"WARNING: {message}")


class HybridLinear(nn.Module):
    """y = x W^T + b with W stored packed: dense tiles dense, 2:4 tiles compressed.

    Inference only: the packed weight is frozen and the compiled kernels have no backward.
    The packed tensors are buffers named `packed_<field>`, so `state_dict()` keeps them; to load a
    saved state, convert the model under the same mask first, then `load_state_dict`.
    `kernel_path` (and `kernel_path_for(tokens)`) says which code a forward really runs.
    """

    def __init__(self, packed: RowBlockPacked | TilePacked | SplitPacked | StripePacked, backend: str,
                 bias: torch.Tensor | None):
        super().__init__()
        self.packed = packed
        self.backend = backend
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._direct = None  # cached fast path of the CPU kernel (None: not looked up yet, False: none)
        self._buffer_names = {name: f"packed_{name}" for name in packed_tensors(packed)}
        for name, tensor in packed_tensors(packed).items():
            self.register_buffer(self._buffer_names[name], tensor)
        # load_state_dict copies into the buffers in place; the derived 2:4 operand must follow
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_packed(force=True))
        self._announce_fallback()

    def _sync_packed(self, force: bool = False) -> None:
        """Point `packed` at the current buffers (after `.to()` or loading a state dict)."""
        current = {name: getattr(self, buffer) for name, buffer in self._buffer_names.items()}
        old = packed_tensors(self.packed)
        if force or any(current[name] is not old[name] for name in old):
            self.packed = rebuild_packed(self.packed, current)
            self._direct = None

    @classmethod
    @torch.no_grad()
    def from_dense(cls, linear: nn.Linear, mask: LayerMask, backend: str = "auto",
                   dtype: torch.dtype | None = None) -> "HybridLinear":
        """Pack `linear` under `mask` (its 2:4 pattern in sparse tiles, dense tiles kept whole)."""
        if backend not in BACKENDS:
            raise PatchsparseError(f"unknown kernel backend '{backend}' (choose {', '.join(BACKENDS)})")
        weight = linear.weight
        dtype = dtype or weight.dtype
        if backend == "auto":
            backend = choose_backend(weight, mask, dtype)
        reason = _missing_kernel(backend, weight.device, dtype)
        if reason is not None and weight.device.type != "cpu":  # on the CPU the GPU formats are emulated (tests)
            raise PatchsparseError(f"backend '{backend}' cannot run its kernel on {weight.device}: {reason} "
                                   "(choose another backend, or 'auto')")
        if backend in ("cpu", "reference"):
            packed: Any = pack_rowblocks(weight, mask, dtype).to(weight.device)
        elif backend == "triton":
            packed = pack_tiles(weight, mask, dtype).to(weight.device)
        elif backend == "stripe":
            if not is_row_homogeneous(mask):
                raise PatchsparseError("the stripe backend needs output rows that are wholly dense or wholly 2:4")
            packed = pack_stripe(weight, mask, dtype)
        else:
            packed = pack_split(weight, mask, dtype)
        bias = linear.bias.to(dtype) if linear.bias is not None else None
        return cls(packed, backend, bias)

    # -- computation ---------------------------------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        """The masked dense weight (out, in) this layer multiplies by (reference expansion)."""
        if isinstance(self.packed, RowBlockPacked):
            return unpack_rowblocks(self.packed)
        return self.packed.dense_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)                       # (T, in)
        direct = self._direct_call()
        if direct is not None and x2.shape[0] <= direct[2] and x.device.type == "cpu":
            # decode fast path: one call into the compiled kernel (Python overhead matters at 10 us)
            y = direct[0](x2, *direct[1], self.bias, direct[3])
        else:
            y = self._forward2d(x2)                                # (T, out)
        return y.view(*x.shape[:-1], self.out_features)

    def _direct_call(self):
        """(kernel, its layout arguments, max tokens, ISA level) when the CPU decode kernel applies, else None."""
        if self._direct is False:
            return None
        if self._direct is None:
            packed = self.packed
            module = cpu_kernel.load_cpu_kernel() if self.backend == "cpu" else None
            if module is None or packed.values.device.type != "cpu":
                self._direct = False
                return None
            self._direct = (module.hybrid_linear,
                            (packed.values, packed.meta, packed.chunk_cols, packed.n_sparse, packed.value_offsets,
                             packed.meta_offsets, packed.out_features, packed.in_features),
                            CPU_DIRECT_MAX_TOKENS.get(packed.dtype, 64), cpu_kernel.isa_cap())
        return self._direct

    def _forward2d(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "cpu" and x.device.type == "cpu" and cpu_kernel.cpu_kernel_available():
            packed: RowBlockPacked = self.packed
            if x.shape[0] <= CPU_DIRECT_MAX_TOKENS.get(packed.dtype, 64):
                return cpu_kernel.cpu_hybrid_linear(x, packed, self.bias)
            return cpu_kernel.cpu_hybrid_linear_prefill(x, packed, self.bias)
        if self.backend in ("cpu", "reference"):
            return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        dtype = self.packed_dtype
        if self.backend == "triton" and not triton_available(x.device):
            y = F.linear(x.to(dtype), self.dense_weight())
        else:
            y = self.packed.forward(x.to(dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    @property
    def packed_dtype(self) -> torch.dtype:
        p = self.packed
        if isinstance(p, RowBlockPacked):
            return p.dtype
        if isinstance(p, TilePacked):
            return p.dense_values.dtype
        if isinstance(p, SplitPacked):
            return p.row_values.dtype
        return p.dense_weight_rows.dtype

    # -- module plumbing -----------------------------------------------------------------------
    def _packed_device(self) -> torch.device:
        return next(iter(packed_tensors(self.packed).values())).device

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)   # moves the buffers
        self._sync_packed()
        self._announce_fallback()
        return result

    # -- which code runs -----------------------------------------------------------------------
    @property
    def kernel_path(self) -> str:
        """The code a forward runs: 'cpu-kernel', 'reference', 'split/cusparselt', 'split/cutlass',
        'stripe/…', 'split/emulated' (2:4 part multiplied densely), 'triton', or 'expand-fallback'
        (the full weight rebuilt and multiplied densely on every forward)."""
        return self.kernel_path_for(None)

    def kernel_path_for(self, tokens: int | None) -> str:
        """`kernel_path`, with the variant a forward of `tokens` tokens takes where that depends on it."""
        device = self._packed_device()
        if self.backend == "reference":
            return "reference"
        if _missing_kernel(self.backend, device, self.packed_dtype) is not None and self.backend in ("cpu", "triton"):
            return "expand-fallback"
        if self.backend == "cpu":
            if not cpu_kernel.cpu_kernel_available():
                return "expand-fallback"
            if tokens is None:
                return "cpu-kernel"
            decode = tokens <= CPU_DIRECT_MAX_TOKENS.get(self.packed_dtype, 64)
            return "cpu-kernel/decode" if decode else "cpu-kernel/prefill"
        if self.backend == "triton":
            if tokens is None:
                return "triton"
            return f"triton/split-k={self.packed.launch_config(tokens, device, self.packed_dtype)['split_k']}"
        part = self.packed.sparse_part
        return f"{self.backend}/{part.path if part is not None else 'dense-only'}"

    def _announce_fallback(self) -> None:
        """Say once, loudly, when this layer's backend does not run its own kernel where it now lives."""
        reason = _missing_kernel(self.backend, self._packed_device(), self.packed_dtype)
        if reason is not None:
            what = ("multiply the 2:4 part densely (emulated)" if self.backend in ("split", "stripe")
                    else "rebuild the full weight on every forward")
            warn_once(f"'{self.backend}' layers on {self._packed_device().type} {what}: {reason}")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend}, dtype={self.packed_dtype}")


def _missing_kernel(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot run its own kernel on `device` (None when it can)."""
    if backend == "cpu" and device.type != "cpu":
        return "the row-block kernel runs on the CPU only"
    if backend in ("split", "stripe") and not semi_structured_supported(device, dtype):
        return semi_structured_backend(device, dtype)[1]
    if backend == "triton" and not triton_available(device):
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed"
        return f"{device.type} is not a CUDA device (and TRITON_INTERPRET is not set)"
    return None


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


class DenseLinear(nn.Linear):
    """A masked layer kept as a plain dense product because its packed form was measured slower.

    Its weight is the masked weight (pruned entries zero), so its outputs are the hybrid layer's;
    `measured_speedup` is dense time / packed time from the conversion-time measurement.
    """

    backend = "dense"
    kernel_path = "dense (packed was slower)"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.measured_speedup: float | None = None

    @classmethod
    def of(cls, packed: HybridLinear) -> "DenseLinear":
        """The same layer as a plain dense product: the packed layer's masked weight and bias."""
        return cls(packed.dense_weight().contiguous(), packed.bias)

    @property
    def packed_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def kernel_path_for(self, tokens: int | None) -> str:
        return self.kernel_path

    def extra_repr(self) -> str:
        measured = "" if self.measured_speedup is None else f", measured packed speed-up {self.measured_speedup:.2f}x"
        return super().extra_repr() + measured


# The token count at which `auto` conversion decides between packed and dense: decode, one token
# per sequence, where sparsity pays (a prompt runs the packed layers' prefill path either way).
DECISION_TOKENS = 1


@torch.no_grad()
def decode_speedup(packed: nn.Module, dense: nn.Linear, tokens: int = DECISION_TOKENS) -> float:
    """Dense time / packed time of one forward of `tokens` tokens here (best of interleaved rounds)."""
    weight = dense.weight
    x = torch.randn(tokens, weight.shape[1], dtype=weight.dtype, device=weight.device,
                    generator=torch.Generator(weight.device).manual_seed(0))
    times = time_interleaved([lambda: dense(x), lambda: packed(x)], weight.device, rounds=5, budget=0.002)
    return min(times[0]) / min(times[1])


@torch.no_grad()
def convert_model(model: nn.Module, spec: HybridMaskSpec, backend: str = "auto",
                  dtype: torch.dtype | None = None, keep_dense_when_slower: bool | None = None
                  ) -> dict[str, HybridLinear | DenseLinear]:
    """Replace every linear named in `spec` by a `HybridLinear`, or a `DenseLinear` (in place).

    With `keep_dense_when_slower` (default: when `backend` is `auto`), each packed layer is timed
    against its masked dense product at one token (`decode_speedup`, about 50 ms per layer)
    and the layer becomes a `DenseLinear` instead where packing is slower here. Everything is
    checked and packed before the first module is swapped, so a failure leaves the model
    unchanged. Returns the new modules by name.
    """
    found = spec.check_matches(model)
    measure = backend == "auto" if keep_dense_when_slower is None else keep_dense_when_slower
    converted: dict[str, HybridLinear | DenseLinear] = {}
    for name, module in found.items():
        layer = HybridLinear.from_dense(module, spec.layers[name], backend=backend, dtype=dtype)
        if measure:
            dense = DenseLinear.of(layer)
            dense.measured_speedup = decode_speedup(layer, dense)
            if dense.measured_speedup < 1.0:
                layer = dense
        converted[name] = layer
    for name, module in converted.items():
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, module)
    return converted
