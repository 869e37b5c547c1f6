"""GPU decompositions of a hybrid layer into standard kernels: a 2:4 GEMM plus a dense remainder.

Both formats here use only maintained pieces: `torch.sparse.to_sparse_semi_structured`
(cuSPARSELt or CUTLASS 2:4 on sm80+, fp16/bf16) for the 2:4 part and cuBLAS (`F.linear`,
`torch.bmm`) for the rest.

* **split** (any tile layout): W⊙M = A + B. A is a full 2:4 matrix: the kept 2:4 values in sparse
  tiles and positions 0 and 1 of every group in dense tiles. B holds positions 2 and 3 of every
  group of the dense tiles only, stored compressed per tile (r, c/2) and multiplied by the
  matching gathered inputs in one batched GEMM. FLOPs: 0.5 + 0.5·f of dense, where f is the
  dense-tile share, i.e. exactly (1 − s) of dense, the ideal.
* **stripe** (every output row wholly dense or wholly 2:4, e.g. tiles of (r, in_features)): one
  dense GEMM over the dense rows, one 2:4 GEMM over the sparse rows, outputs put back in place.

The 2:4 operand is an interface: on a CUDA device that supports it, the semi-structured tensor;
elsewhere (and in the CPU tests) the same 2:4 matrix multiplied densely. So every index of the
decomposition is tested on the CPU; only the semi-structured call itself needs a GPU.
**Status: the semi-structured path has not been run on a GPU yet** (see docs/KERNELS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patchsparse.kernels.packing import check_packable, dense_region
from patchsparse.masks.spec import LayerMask
from patchsparse.utils import log

_PAD = 64  # both sides of a semi-structured operand padded to this (CUTLASS fp16 needs 32 x 64)
_warned: set[str] = set()


def semi_structured_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True on CUDA devices of compute capability >= 8.0 with fp16/bf16 weights."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or not torch.cuda.is_available():
        return False
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


class TwoFourOperand:
    """x (M, in) -> x @ w^T for a 2:4 matrix w; semi-structured on a GPU that has it, else dense."""

    def __init__(self, weight_24: torch.Tensor):
        self.out_features, self.in_features = weight_24.shape
        self.accelerated = False
        self.weight = weight_24
        if semi_structured_supported(weight_24.device, weight_24.dtype):
            try:
                padded = F.pad(weight_24, (0, -self.in_features % _PAD, 0, -self.out_features % _PAD))
                self.weight = torch.sparse.to_sparse_semi_structured(padded.contiguous())
                self.accelerated = True
            except (RuntimeError, NotImplementedError) as exc:  # e.g. a build without cuSPARSELt/CUTLASS
                key = f"{type(exc).__name__}: {exc}"
                if key not in _warned:
                    _warned.add(key)
                    log(f"2:4 semi-structured GEMM unavailable, multiplying the 2:4 part densely ({key})")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.accelerated:
            return F.linear(x, self.weight)
        pad_in = -self.in_features % _PAD
        y = F.linear(F.pad(x, (0, pad_in)) if pad_in else x, self.weight)
        return y[:, : self.out_features]

    def dense(self) -> torch.Tensor:
        if not self.accelerated:
            return self.weight
        return self.weight.to_dense()[: self.out_features, : self.in_features]


def _first_pair(shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """bool (out, in): positions 0 and 1 of every group of four (the pattern 1100)."""
    return (torch.arange(shape[1], device=device) % 4 < 2).expand(shape)


@dataclass
class SplitPacked:
    out_features: int
    in_features: int
    sparse_part: TwoFourOperand   # A (out, in), 2:4 everywhere
    tile_values: torch.Tensor     # (T, r, c/2): positions 2,3 of each group of each dense tile
    tile_cols: torch.Tensor       # (T, c/2) int64: input column of each value (in_features = padding)
    tile_rows: torch.Tensor       # (T, r) int64: output row of each tile row (out_features = padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, in) -> (M, out)."""
        y = self.sparse_part(x)                                               # (M, out)
        if self.tile_values.shape[0] == 0:
            return y
        tokens = x.shape[0]
        x_ext = F.pad(x, (0, 1))                                              # (M, in + 1), last column 0
        gathered = x_ext[:, self.tile_cols].permute(1, 0, 2)                  # (T, M, c/2)
        partial = torch.bmm(gathered, self.tile_values.transpose(1, 2))       # (T, M, r)
        y_ext = F.pad(y, (0, 1))                                              # (M, out + 1)
        y_ext.index_add_(1, self.tile_rows.reshape(-1), partial.permute(1, 0, 2).reshape(tokens, -1))
        return y_ext[:, : self.out_features]

    def dense_weight(self) -> torch.Tensor:
        w = F.pad(self.sparse_part.dense().clone(), (0, 1, 0, 1))             # (out + 1, in + 1)
        t, r, half = self.tile_values.shape
        rows = self.tile_rows[:, :, None].expand(t, r, half)
        cols = self.tile_cols[:, None, :].expand(t, r, half)
        w.index_put_((rows.reshape(-1), cols.reshape(-1)), self.tile_values.reshape(-1), accumulate=True)
        return w[: self.out_features, : self.in_features]


@torch.no_grad()
def pack_split(weight: torch.Tensor, mask: LayerMask, dtype: torch.dtype | None = None) -> SplitPacked:
    check_packable(weight, mask)
    dtype = dtype or weight.dtype
    device = weight.device
    out_f, in_f = weight.shape
    w = weight.detach().to(dtype)
    dense = dense_region(mask).to(device)
    keep_a = torch.where(dense, _first_pair(w.shape, device), mask.sparse_keep.to(device))
    a = w * keep_a

    if mask.dense_tiles is None or not bool(mask.dense_tiles.any()):
        empty = torch.zeros(0, 1, 2, dtype=dtype, device=device)
        return SplitPacked(out_f, in_f, TwoFourOperand(a), empty,
                           torch.zeros(0, 2, dtype=torch.long, device=device),
                           torch.zeros(0, 1, dtype=torch.long, device=device))
    r, c = mask.tile
    tiles = mask.dense_tiles.nonzero().to(device)                             # (T, 2): tile row, tile col
    local_rows = torch.arange(r, device=device)
    local_cols = torch.arange(c, device=device).view(-1, 4)[:, 2:].reshape(-1)  # positions 2,3: (c/2,)
    rows = tiles[:, :1] * r + local_rows                                      # (T, r)
    cols = tiles[:, 1:] * c + local_cols                                      # (T, c/2)
    rows = torch.where(rows < out_f, rows, out_f)
    cols = torch.where(cols < in_f, cols, in_f)
    w_ext = F.pad(w, (0, 1, 0, 1))                                            # padding reads 0
    values = w_ext[rows[:, :, None], cols[:, None, :]]                        # (T, r, c/2)
    return SplitPacked(out_f, in_f, TwoFourOperand(a), values.contiguous(), cols, rows)


def is_row_homogeneous(mask: LayerMask) -> bool:
    """Every output row lies wholly in dense tiles or wholly in sparse ones."""
    if mask.dense_tiles is None:
        return True
    tile_rows_dense = mask.dense_tiles.all(1)
    tile_rows_sparse = ~mask.dense_tiles.any(1)
    return bool((tile_rows_dense | tile_rows_sparse).all())


@dataclass
class StripePacked:
    out_features: int
    in_features: int
    dense_rows: torch.Tensor      # (nd,) int64
    dense_weight_rows: torch.Tensor  # (nd, in)
    sparse_rows: torch.Tensor     # (ns,) int64
    sparse_part: TwoFourOperand | None  # (ns, in), 2:4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_empty(x.shape[0], self.out_features)
        if self.dense_rows.numel():
            y.index_copy_(1, self.dense_rows, F.linear(x, self.dense_weight_rows))
        if self.sparse_part is not None:
            y.index_copy_(1, self.sparse_rows, self.sparse_part(x))
        return y

    def dense_weight(self) -> torch.Tensor:
        w = self.dense_weight_rows.new_zeros(self.out_features, self.in_features)
        w[self.dense_rows] = self.dense_weight_rows
        if self.sparse_part is not None:
            w[self.sparse_rows] = self.sparse_part.dense()
        return w


@torch.no_grad()
def pack_stripe(weight: torch.Tensor, mask: LayerMask, dtype: torch.dtype | None = None) -> StripePacked:
    check_packable(weight, mask)
    if not is_row_homogeneous(mask):
        raise ValueError("stripe format needs rows that are wholly dense or wholly 2:4")
    dtype = dtype or weight.dtype
    device = weight.device
    w = weight.detach().to(dtype)
    row_dense = dense_region(mask).all(1).to(device)                          # (out,)
    dense_rows = row_dense.nonzero()[:, 0]
    sparse_rows = (~row_dense).nonzero()[:, 0]
    sparse_w = (w * mask.sparse_keep.to(device))[sparse_rows]
    sparse_part = TwoFourOperand(sparse_w.contiguous()) if sparse_rows.numel() else None
    return StripePacked(weight.shape[0], weight.shape[1], dense_rows, w[dense_rows].contiguous(),
                        sparse_rows, sparse_part)
