"""The packed row-block format of a hybrid (dense / 2:4) weight, in pure PyTorch.

The weight (out, in) is cut into row blocks of 8 output rows and chunks of 8 inputs (two groups
of four). Each (row block, chunk) is either

* sparse: every row keeps exactly 2 of each group of 4, stored as 4 values per row (slot-major,
  `(4, 8)`) plus one metadata byte per row holding the four 2-bit positions
  (`p0 | p1 << 2 | q0 << 4 | q1 << 6`: kept positions in the first and in the second group);
* dense: all 64 values, stored input-major `(8, 8)` (pruned weights of a mixed chunk are zeros).

A chunk is sparse only when all of its weights lie in sparse tiles, so any tile size works (a
tile height that is not a multiple of 8 just makes a few boundary chunks dense). Within each row
block the sparse chunks come first, then the dense ones (each in increasing column order), so a
kernel walks two branch-free loops; `chunk_cols` says which input chunk each one reads.
A 2:4 chunk reads 4 values + 1 byte per row instead of 8 values: 0.53x the bytes in fp32 and
0.56x in bf16/fp16, which is what a memory-bound decode kernel gains.

`pack_rowblocks` and `unpack_rowblocks` are exact inverses on the kept weights; `unpack` is the
reference path (and test oracle) of every CPU kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patchsparse.errors import PatchsparseError
from patchsparse.masks.spec import LayerMask

ROWS = 8      # rows per row block (one AVX2 register of fp32 lanes)
CHUNK = 8     # inputs per chunk (two 2:4 groups)
SPARSE_VALUES = 4 * ROWS   # values per sparse chunk
DENSE_VALUES = CHUNK * ROWS  # values per dense chunk


@dataclass(frozen=True)
class RowBlockPacked:
    out_features: int
    in_features: int
    values: torch.Tensor      # (V,) weight dtype: per row block, sparse chunks then dense chunks
    meta: torch.Tensor        # (S * 8,) uint8: one byte per row of every sparse chunk
    chunk_cols: torch.Tensor  # (NB, NC) int32: input chunk of each stored chunk, sparse first
    n_sparse: torch.Tensor    # (NB,) int32: sparse chunks per row block
    value_offsets: torch.Tensor  # (NB,) int64: start of each row block in `values`
    meta_offsets: torch.Tensor   # (NB,) int64: start of each row block in `meta`

    @property
    def n_blocks(self) -> int:
        return self.chunk_cols.shape[0]

    @property
    def n_chunks(self) -> int:
        return self.chunk_cols.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def nbytes(self) -> int:
        """Bytes a forward pass reads for the weight (values and metadata; indices are tiny)."""
        return sum(t.numel() * t.element_size() for t in
                   (self.values, self.meta, self.chunk_cols, self.n_sparse, self.value_offsets, self.meta_offsets))

    def sparse_chunk_fraction(self) -> float:
        return float(self.n_sparse.sum()) / max(1, self.n_blocks * self.n_chunks)

    def to(self, device: torch.device | str) -> "RowBlockPacked":
        return RowBlockPacked(self.out_features, self.in_features,
                              *(t.to(device) for t in (self.values, self.meta, self.chunk_cols, self.n_sparse,
                                                        self.value_offsets, self.meta_offsets)))


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def dense_region(mask: LayerMask) -> torch.Tensor:
    """Weights that lie in dense tiles. -> bool (out, in)"""
    if mask.dense_tiles is None:
        return torch.zeros(mask.shape, dtype=torch.bool)
    return mask.grid.expand(mask.dense_tiles)


def check_packable(weight: torch.Tensor, mask: LayerMask) -> None:
    if mask.pattern != "2:4":
        raise PatchsparseError(f"hybrid kernels need a 2:4 pattern in sparse tiles, this mask has '{mask.pattern}'")
    if tuple(weight.shape) != mask.shape:
        raise PatchsparseError(f"mask shape {mask.shape} does not match weight shape {tuple(weight.shape)}")
    if weight.shape[1] % 4:
        raise PatchsparseError(f"input dimension {weight.shape[1]} is not a multiple of 4, so it cannot be 2:4")
    groups = mask.sparse_keep.reshape(weight.shape[0], -1, 4).sum(-1)            # (out, in/4)
    in_sparse = ~dense_region(mask).reshape(weight.shape[0], -1, 4).any(-1)      # (out, in/4)
    if bool(((groups != 2) & in_sparse).any()):
        raise PatchsparseError("the 2:4 mask does not keep exactly 2 of every 4 weights in its sparse tiles")


def padded_parts(weight: torch.Tensor, mask: LayerMask, dtype: torch.dtype, out_p: int, in_p: int):
    """Zero-padded masked weight (out_p, in_p), its dense region, and the kept positions of every
    group of four in sparse tiles: first and last kept index (out_p, in_p/4), int64.

    Padding counts as sparse, with pattern 1100 and zero values, so every group of a block that
    is sparse keeps exactly two.
    """
    out_f, in_f = weight.shape
    pad = (0, in_p - in_f, 0, out_p - out_f)
    masked = F.pad((weight.detach().cpu() * mask.keep_mask()).to(dtype), pad)     # (out_p, in_p)
    dense = F.pad(dense_region(mask), pad)                                          # (out_p, in_p)
    keep = F.pad(mask.sparse_keep, pad).view(out_p, in_p // 4, 4).to(torch.uint8)
    code = keep[..., 0] | (keep[..., 1] << 1) | (keep[..., 2] << 2) | (keep[..., 3] << 3)  # (out_p, G)
    first = _FIRST_KEPT[code.long()]
    last = _LAST_KEPT[code.long()]
    return masked, dense, first, last


def _kept_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """For each 4-bit keep code: the first and the last kept position; 0 and 1 (the pattern 1100)
    for an empty group (padding), and only meaningful for codes with two bits set."""
    first, last = [], []
    for code in range(16):
        kept = [j for j in range(4) if code >> j & 1] or [0, 1]
        first.append(kept[0])
        last.append(kept[-1] if len(kept) > 1 else 1 if kept[0] == 0 else kept[0])
    return torch.tensor(first), torch.tensor(last)


_FIRST_KEPT, _LAST_KEPT = _kept_tables()


@torch.no_grad()
def pack_rowblocks(weight: torch.Tensor, mask: LayerMask, dtype: torch.dtype | None = None) -> RowBlockPacked:
    """Pack `weight` (out, in) under `mask` into the row-block format (on the CPU)."""
    check_packable(weight, mask)
    out_f, in_f = weight.shape
    out_p, in_p = _ceil_to(out_f, ROWS), _ceil_to(in_f, CHUNK)
    nb, nc = out_p // ROWS, in_p // CHUNK
    masked, dense, first, last = padded_parts(weight, mask, dtype or weight.dtype, out_p, in_p)

    is_sparse = ~dense.view(nb, ROWS, nc, CHUNK).any(dim=(1, 3))           # (NB, NC)
    n_sparse = is_sparse.sum(1)                                              # (NB,)
    block_values = n_sparse * SPARSE_VALUES + (nc - n_sparse) * DENSE_VALUES
    value_offsets = torch.cumsum(block_values, 0) - block_values
    meta_offsets = torch.cumsum(n_sparse * ROWS, 0) - n_sparse * ROWS

    # Stored position of every chunk within its row block: sparse ones first, then dense ones,
    # each in column order. Every size is a multiple of 32 values, so chunks are rows of 32.
    sparse_rank = torch.cumsum(is_sparse, 1) - 1
    dense_rank = torch.cumsum(~is_sparse, 1) - 1
    position = torch.where(is_sparse, sparse_rank, n_sparse[:, None] + dense_rank)   # (NB, NC)
    row32 = (value_offsets // SPARSE_VALUES)[:, None] + torch.where(
        is_sparse, sparse_rank, n_sparse[:, None] + 2 * dense_rank)                   # (NB, NC)
    chunk_cols = torch.empty(nb, nc, dtype=torch.int64).scatter_(
        1, position, torch.arange(nc).expand(nb, nc))

    groups = masked.view(out_p, in_p // 4, 4)
    kept_vals = torch.stack([groups.gather(-1, first[..., None])[..., 0],
                             groups.gather(-1, last[..., None])[..., 0]], dim=-1)  # (out_p, G, 2)
    # (NB, 8 rows, NC, 2 groups, 2 slots) -> (NB, NC, 4 slots, 8 rows); index only the chunks used
    sparse_view = kept_vals.view(nb, ROWS, nc, 4).permute(0, 2, 3, 1)
    dense_view = masked.view(nb, ROWS, nc, CHUNK).permute(0, 2, 3, 1)          # (NB, NC, 8 in, 8 rows)
    values = torch.empty(int(block_values.sum()) // SPARSE_VALUES, SPARSE_VALUES, dtype=masked.dtype)
    values[row32[is_sparse]] = sparse_view[is_sparse].reshape(-1, SPARSE_VALUES)
    dense_chunks = dense_view[~is_sparse].reshape(-1, 2, SPARSE_VALUES)       # (Nd, 2, 32)
    dense_rows = row32[~is_sparse]
    values[dense_rows] = dense_chunks[:, 0]
    values[dense_rows + 1] = dense_chunks[:, 1]

    pos = (first | (last << 2)).view(nb, ROWS, nc, 2)                         # (NB, 8, NC, 2)
    meta_blocks = (pos[..., 0] | (pos[..., 1] << 4)).to(torch.uint8).permute(0, 2, 1)  # (NB, NC, 8)
    meta = torch.empty(int(n_sparse.sum()), ROWS, dtype=torch.uint8)
    meta[((meta_offsets // ROWS)[:, None] + sparse_rank)[is_sparse]] = meta_blocks[is_sparse]
    return RowBlockPacked(out_f, in_f, values.view(-1), meta.view(-1), chunk_cols.to(torch.int32),
                          n_sparse.to(torch.int32), value_offsets.to(torch.int64), meta_offsets.to(torch.int64))


def unpack_rowblocks(packed: RowBlockPacked) -> torch.Tensor:
    """The masked dense weight (out, in) back from the packed buffers: the reference path."""
    nb, nc = packed.n_blocks, packed.n_chunks
    device = packed.values.device
    n_sparse = packed.n_sparse.long()
    sparse_ordered = torch.arange(nc, device=device)[None, :] < n_sparse[:, None]      # (NB, NC)
    valid = (torch.arange(DENSE_VALUES, device=device) < SPARSE_VALUES) | ~sparse_ordered[..., None]
    blocks = torch.zeros(nb, nc, DENSE_VALUES, dtype=packed.dtype, device=device)
    blocks[valid] = packed.values
    meta = torch.zeros(nb, nc, ROWS, dtype=torch.uint8, device=device)
    meta[sparse_ordered] = packed.meta.view(-1, ROWS)

    # Sparse chunks: scatter the four slot values of each row to their positions.
    slot_vals = blocks[..., :SPARSE_VALUES].view(nb, nc, 4, ROWS)                      # (NB, NC, 4, 8)
    m = meta.to(torch.int64)                                                              # (NB, NC, 8)
    positions = torch.stack([m & 3, (m >> 2) & 3, 4 + ((m >> 4) & 3), 4 + ((m >> 6) & 3)], dim=2)  # (NB, NC, 4, 8)
    from_sparse = torch.zeros(nb, nc, CHUNK, ROWS, dtype=packed.dtype, device=device)
    from_sparse.scatter_(2, positions, slot_vals)
    from_dense = blocks.view(nb, nc, CHUNK, ROWS)
    chunks = torch.where(sparse_ordered[..., None, None], from_sparse, from_dense)      # (NB, NC, 8 in, 8 rows)
    # Undo the per-row-block ordering: stored chunk i holds input chunk chunk_cols[b, i].
    unordered = torch.empty_like(chunks)
    unordered.scatter_(1, packed.chunk_cols.long()[..., None, None].expand(-1, -1, CHUNK, ROWS), chunks)
    weight = unordered.permute(0, 3, 1, 2).reshape(nb * ROWS, nc * CHUNK)
    return weight[: packed.out_features, : packed.in_features]
