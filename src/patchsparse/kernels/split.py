"""GPU decompositions of a hybrid layer into standard kernels: a 2:4 GEMM plus a dense remainder.

Both formats here use only maintained pieces: torch's cuSPARSELt ops (`torch._cslt_compress`,
`torch._cslt_sparse_mm`) or, on sm8x without cuSPARSELt, torch's CUTLASS semi-structured tensor
for the 2:4 part (fp16/bf16), and cuBLAS (`F.linear`, `torch.bmm`) for the rest.

* **split** (any tile layout): W⊙M = A + B. A is a full 2:4 matrix: the kept 2:4 values in sparse
  tiles and positions 0 and 1 of every group in dense tiles. B holds positions 2 and 3 of every
  group of the dense tiles only. Per row of tiles, the dense tiles' values are laid side by side
  (r, k·c/2, zero-padded to the row with the most dense tiles), so one batched GEMM over the tile
  rows sums each row's tiles inside the GEMM: its result has the size of the output, and the
  gathered inputs are processed in token chunks of bounded size. FLOPs: 0.5 + 0.5·f of dense
  (f the dense-tile share), plus the padding of the shorter tile rows.
* **stripe** (every output row wholly dense or wholly 2:4, e.g. tiles of (r, in_features)): one
  dense GEMM over the dense rows, one 2:4 GEMM over the sparse rows, outputs put back in place.

The 2:4 operand (`TwoFourOperand`) keeps a portable copy (kept values + 2-bit positions) that is
saved and moved, and derives the device's compressed operand from it. Off CUDA (and in the CPU
tests) it multiplies the same 2:4 matrix densely ("emulated"), so every index of the
decomposition is tested on the CPU. **Status: the semi-structured path has not been run on a GPU
yet** (see docs/KERNELS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from patchsparse.errors import PatchsparseError
from patchsparse.kernels.packing import _FIRST_KEPT, _LAST_KEPT, check_packable, dense_region
from patchsparse.masks.spec import LayerMask

_PAD = 64       # both sides of the compressed operand padded to this (CUTLASS fp16 needs 32 x 64)
_PAD_TOKENS = 8  # cuSPARSELt's minimum for the dense operand's dimensions (fp16/bf16)
# Most bytes of gathered inputs the split remainder holds at once; longer inputs run in token chunks.
SPLIT_GATHER_BYTES = 64 << 20


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The device's compute capability, None off CUDA (the one place the CPU tests substitute)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def semi_structured_backend(device: torch.device, dtype: torch.dtype) -> tuple[str | None, str]:
    """("cusparselt" | "cutlass" | None, why): the 2:4 GEMM this device and dtype would really run.

    cuSPARSELt wherever torch has it; torch's CUTLASS 2:4 kernels are built for sm8x only, so on
    sm90+ without cuSPARSELt there is no 2:4 GEMM at all.
    """
    capability = _cuda_capability(device)
    if capability is None:
        return None, f"{device.type} is not a CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return None, f"2:4 GEMMs need float16 or bfloat16 weights, not {str(dtype).replace('torch.', '')}"
    if tuple(capability) < (8, 0):
        return None, f"compute capability {capability[0]}.{capability[1]} is below 8.0"
    if torch.backends.cusparselt.is_available():
        return "cusparselt", "cuSPARSELt"
    if tuple(capability) < (9, 0):
        return "cutlass", "CUTLASS (this torch has no cuSPARSELt)"
    return None, (f"compute capability {capability[0]}.{capability[1]} needs cuSPARSELt (torch's CUTLASS 2:4 "
                  "kernels are sm8x only) and this torch has none")


def semi_structured_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True where a 2:4 GEMM really runs (see `semi_structured_backend`)."""
    return semi_structured_backend(device, dtype)[0] is not None


def compress_24(weight: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (out, in/2), positions (out, in/4) uint8 `p0 | p1 << 2`) of a 2:4 `keep` (two per group)."""
    out_f, in_f = weight.shape
    keep4 = keep.reshape(out_f, in_f // 4, 4).to(torch.uint8)
    code = (keep4[..., 0] | keep4[..., 1] << 1 | keep4[..., 2] << 2 | keep4[..., 3] << 3).long().cpu()
    first, last = _FIRST_KEPT[code].to(weight.device), _LAST_KEPT[code].to(weight.device)
    groups = weight.reshape(out_f, in_f // 4, 4)
    values = torch.stack([groups.gather(-1, first[..., None])[..., 0], groups.gather(-1, last[..., None])[..., 0]], -1)
    return values.reshape(out_f, in_f // 2).contiguous(), (first | last << 2).to(torch.uint8)


def expand_24(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The dense 2:4 matrix (out, in) back from `compress_24`'s output."""
    out_f, groups = positions.shape
    p = positions.long()
    index = torch.stack([p & 3, p >> 2], -1)                                   # (out, G, 2)
    dense = torch.zeros(out_f, groups, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(2, index, values.view(out_f, groups, 2))
    return dense.view(out_f, groups * 4)


@dataclass(eq=False)
class TwoFourOperand:
    """x (M, in) -> x @ w^T for a 2:4 matrix w.

    `values` and `positions` are the portable form (saved in the state dict, moved by `.to()`);
    the operand the GEMM reads is derived from them on their device by `prepare()`:
    cuSPARSELt's compressed tensor, CUTLASS's semi-structured tensor, or, where neither exists
    ("emulated"), the dense 2:4 matrix.
    """

    out_features: int
    in_features: int
    values: torch.Tensor      # (out, in/2)
    positions: torch.Tensor   # (out, in/4) uint8
    path: str = field(init=False, default="")
    reason: str = field(init=False, default="")

    def __post_init__(self):
        self.prepare()

    @classmethod
    def from_masked(cls, weight: torch.Tensor, keep: torch.Tensor) -> "TwoFourOperand":
        values, positions = compress_24(weight, keep)
        return cls(weight.shape[0], weight.shape[1], values, positions)

    @property
    def accelerated(self) -> bool:
        return self.path in ("cusparselt", "cutlass")

    def prepare(self) -> None:
        """(Re)build the GEMM operand on the values' device; a failure on CUDA is an error, not a silent fallback."""
        kind, self.reason = semi_structured_backend(self.values.device, self.values.dtype)
        dense = self.dense()
        if kind is None:
            self.path, self._operand = "emulated", dense
            return
        padded = F.pad(dense, (0, -self.in_features % _PAD, 0, -self.out_features % _PAD)).contiguous()
        try:
            if kind == "cusparselt":
                self._operand = torch._cslt_compress(padded)
            else:
                from torch.sparse import SparseSemiStructuredTensorCUTLASS

                self._operand = SparseSemiStructuredTensorCUTLASS.from_dense(padded)
        except (RuntimeError, NotImplementedError) as exc:
            raise PatchsparseError(f"the {kind} 2:4 GEMM failed to compress a {tuple(padded.shape)} "
                                   f"{padded.dtype} operand ({type(exc).__name__}: {exc})") from exc
        self.path = kind

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()  # the GEMMs read x (or its transpose) with the strides of a whole matrix
        if self.path == "emulated":
            return F.linear(x, self._operand)
        tokens = x.shape[0]
        pad_in = -self.in_features % _PAD
        if self.path == "cutlass":
            y = F.linear(F.pad(x, (0, pad_in)) if pad_in else x, self._operand)
            return y[:, : self.out_features]
        pad_m = -tokens % _PAD_TOKENS
        xp = F.pad(x, (0, pad_in, 0, pad_m)) if pad_in or pad_m else x
        # as torch's own wrapper does for F.linear: A (out, in) @ x^T, written transposed, i.e. (M, out)
        y = torch._cslt_sparse_mm(self._operand, xp.t(), transpose_result=True)
        return y[:tokens, : self.out_features]

    def dense(self) -> torch.Tensor:
        return expand_24(self.values, self.positions)


def _first_pair(shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """bool (out, in): positions 0 and 1 of every group of four (the pattern 1100)."""
    return (torch.arange(shape[1], device=device) % 4 < 2).expand(shape)


@dataclass(eq=False)
class SplitPacked:
    out_features: int
    in_features: int
    sparse_part: TwoFourOperand   # A (out, in), 2:4 everywhere
    row_values: torch.Tensor      # (R, r, K): positions 2,3 of the dense tiles of each tile row, side by side
    row_cols: torch.Tensor        # (R, K) int64: input column of each value (in_features = padding)
    row_rows: torch.Tensor        # (R, r) int64: output row of each tile row (out_features = padding)

    def token_chunk(self, dtype: torch.dtype) -> int:
        """Tokens per batched GEMM so that the gathered inputs stay under SPLIT_GATHER_BYTES."""
        per_token = self.row_cols.numel() * torch.empty(0, dtype=dtype).element_size()
        return max(1, SPLIT_GATHER_BYTES // max(1, per_token))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, in) -> (M, out)."""
        x = x.contiguous()
        y = self.sparse_part(x)                                               # (M, out)
        n_rows, r, k = self.row_values.shape
        if n_rows == 0:
            return y
        x_ext = F.pad(x, (0, 1))                                              # (M, in + 1), last column 0
        y_ext = F.pad(y, (0, 1))                                              # (M, out + 1)
        cols, rows = self.row_cols.reshape(-1), self.row_rows.reshape(-1)
        step = self.token_chunk(x.dtype)
        for start in range(0, x.shape[0], step):
            xs = x_ext[start:start + step]
            m = xs.shape[0]
            gathered = xs.index_select(1, cols).view(m, n_rows, k).permute(1, 2, 0)  # (R, K, m)
            partial = torch.bmm(self.row_values, gathered)                    # (R, r, m): tiles summed in the GEMM
            y_ext[start:start + m].t().index_add_(0, rows, partial.view(n_rows * r, m))
        return y_ext[:, : self.out_features]

    def dense_weight(self) -> torch.Tensor:
        w = F.pad(self.sparse_part.dense().clone(), (0, 1, 0, 1))             # (out + 1, in + 1)
        n_rows, r, k = self.row_values.shape
        rows = self.row_rows[:, :, None].expand(n_rows, r, k)
        cols = self.row_cols[:, None, :].expand(n_rows, r, k)
        w.index_put_((rows.reshape(-1), cols.reshape(-1)), self.row_values.reshape(-1), accumulate=True)
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
    sparse_part = TwoFourOperand.from_masked(w * keep_a, keep_a)

    if mask.dense_tiles is None or not bool(mask.dense_tiles.any()):
        return SplitPacked(out_f, in_f, sparse_part, torch.zeros(0, 1, 2, dtype=dtype, device=device),
                           torch.zeros(0, 2, dtype=torch.long, device=device),
                           torch.zeros(0, 1, dtype=torch.long, device=device))
    r, c = mask.tile
    tiles = mask.dense_tiles.to(device)                                       # (TR, TC) bool
    counts = tiles.sum(1)                                                     # dense tiles per tile row
    tile_rows = counts.nonzero()[:, 0]                                        # (R,) rows with any
    most = int(counts.max())
    order = torch.sort((~tiles).to(torch.int8), dim=1, stable=True).indices[tile_rows, :most]  # dense first
    used = torch.arange(most, device=device) < counts[tile_rows, None]        # (R, most)
    local_cols = torch.arange(c, device=device).view(-1, 4)[:, 2:].reshape(-1)  # positions 2,3: (c/2,)
    cols = order[:, :, None] * c + local_cols                                 # (R, most, c/2)
    cols = torch.where(used[:, :, None] & (cols < in_f), cols, in_f).reshape(len(tile_rows), -1)  # (R, K)
    rows = tile_rows[:, None] * r + torch.arange(r, device=device)            # (R, r)
    rows = torch.where(rows < out_f, rows, out_f)
    w_ext = F.pad(w, (0, 1, 0, 1))                                            # padding reads 0
    values = w_ext[rows[:, :, None], cols[:, None, :]]                        # (R, r, K)
    return SplitPacked(out_f, in_f, sparse_part, values.contiguous(), cols, rows)


def is_row_homogeneous(mask: LayerMask) -> bool:
    """Every output row lies wholly in dense tiles or wholly in sparse ones."""
    if mask.dense_tiles is None:
        return True
    tile_rows_dense = mask.dense_tiles.all(1)
    tile_rows_sparse = ~mask.dense_tiles.any(1)
    return bool((tile_rows_dense | tile_rows_sparse).all())


@dataclass(eq=False)
class StripePacked:
    out_features: int
    in_features: int
    dense_rows: torch.Tensor      # (nd,) int64
    dense_weight_rows: torch.Tensor  # (nd, in)
    sparse_rows: torch.Tensor     # (ns,) int64
    sparse_part: TwoFourOperand | None  # (ns, in), 2:4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
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
    keep = mask.sparse_keep.to(device)[sparse_rows]
    sparse_part = TwoFourOperand.from_masked(w[sparse_rows] * keep, keep) if sparse_rows.numel() else None
    return StripePacked(weight.shape[0], weight.shape[1], dense_rows, w[dense_rows].contiguous(),
                        sparse_rows, sparse_part)
