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
    keep_sparse = F.pad(mask.sparse_keep, pad).reshape(out_p, in_p // 4, 4)
    keep_sparse[keep_sparse.sum(-1) == 0] = torch.tensor([True, True, False, False])
    first = keep_sparse.to(torch.int8).argmax(-1).long()
    last = 3 - keep_sparse.flip(-1).to(torch.int8).argmax(-1).long()
    return masked, dense, first, last


@torch.no_grad()
def pack_rowblocks(weight: torch.Tensor, mask: LayerMask, dtype: torch.dtype | None = None) -> RowBlockPacked:
    """Pack `weight` (out, in) under `mask` into the row-block format (on the CPU)."""
    check_packable(weight, mask)
    out_f, in_f = weight.shape
    out_p, in_p = _ceil_to(out_f, ROWS), _ceil_to(in_f, CHUNK)
    nb, nc = out_p // ROWS, in_p // CHUNK
    masked, dense, first, last = padded_parts(weight, mask, dtype or weight.dtype, out_p, in_p)

    is_sparse = ~dense.view(nb, ROWS, nc, CHUNK).any(dim=(1, 3))           # (NB, NC)
    # Sparse first, then dense, each in column order (stable sort on "is dense").
    order = torch.sort((~is_sparse).to(torch.int8), dim=1, stable=True).indices  # (NB, NC)
    sparse_ordered = torch.gather(is_sparse, 1, order)                      # (NB, NC)

    groups = masked.view(out_p, in_p // 4, 4)
    kept_vals = torch.stack([groups.gather(-1, first[..., None])[..., 0],
                             groups.gather(-1, last[..., None])[..., 0]], dim=-1)  # (out_p, G, 2)
    # (NB, 8 rows, NC, 2 groups, 2 slots) -> (NB, NC, 4 slots, 8 rows)
    sparse_blocks = kept_vals.view(nb, ROWS, nc, 4).permute(0, 2, 3, 1).reshape(nb, nc, SPARSE_VALUES)
    dense_blocks = masked.view(nb, ROWS, nc, CHUNK).permute(0, 2, 3, 1).reshape(nb, nc, DENSE_VALUES)
    pos = (first | (last << 2)).view(nb, ROWS, nc, 2)  # (NB, 8, NC, 2)
    meta_blocks = (pos[..., 0] | (pos[..., 1] << 4)).to(torch.uint8).permute(0, 2, 1)  # (NB, NC, 8)

    # One padded (NB, NC, 64) buffer in stored order; a sparse chunk uses its first 32 entries.
    blocks = torch.where(is_sparse[..., None],
                         torch.nn.functional.pad(sparse_blocks, (0, DENSE_VALUES - SPARSE_VALUES)), dense_blocks)
    blocks = torch.gather(blocks, 1, order[..., None].expand(-1, -1, DENSE_VALUES))
    used = torch.arange(DENSE_VALUES) < SPARSE_VALUES
    valid = used | ~sparse_ordered[..., None]                                # (NB, NC, 64)
    values = blocks[valid]                                                    # row-major = concatenation
    meta = torch.gather(meta_blocks, 1, order[..., None].expand(-1, -1, ROWS))[sparse_ordered].reshape(-1)

    n_sparse = is_sparse.sum(1)                                              # (NB,)
    block_values = n_sparse * SPARSE_VALUES + (nc - n_sparse) * DENSE_VALUES
    value_offsets = torch.cumsum(block_values, 0) - block_values
    meta_offsets = torch.cumsum(n_sparse * ROWS, 0) - n_sparse * ROWS
    return RowBlockPacked(out_f, in_f, values.contiguous(), meta.contiguous(), order.to(torch.int32).contiguous(),
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
