"""Tile format for the Triton kernel: blocks of (BLOCK_N rows, BLOCK_K inputs), 2:4 or dense.

Per row of blocks, the 2:4 blocks come first, then the dense ones (STOICC's inspector order), so
the kernel runs two loops without branches. Buffers:

* `sparse_values` (S, BN, BK/2): the two kept values of every group, in position order;
* `sparse_meta` (S, BN, BK/8) uint8: per pair of groups `p0 | p1 << 2 | q0 << 4 | q1 << 6`;
* `dense_values` (D, BN, BK);
* `block_cols` (NB, NK) int32, `n_sparse`, `sparse_start`, `dense_start` (NB,) int32.

A block is 2:4 only when all its weights lie in sparse tiles, so any mask tile size works; with
PATCH's 128 x 128 tiles and 64 x 64 blocks every block is homogeneous.
`unpack` (pure PyTorch) is the reference and the fallback when Triton or CUDA is missing.
**Status: the kernel has been checked only under Triton's CPU interpreter, never on a GPU.**
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from patchsparse.kernels.packing import _ceil_to, check_packable, padded_parts
from patchsparse.masks.spec import LayerMask

BLOCK_N = 64
BLOCK_K = 64


def triton_available(device: torch.device | None = None) -> bool:
    """Triton importable and either a CUDA device or Triton's interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    interpreting = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
    if interpreting:
        return True
    return torch.cuda.is_available() and (device is None or device.type == "cuda")


def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a typical count elsewhere (the interpreter)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


@dataclass
class TilePacked:
    out_features: int
    in_features: int
    block_n: int
    block_k: int
    sparse_values: torch.Tensor   # (S, BN, BK/2)
    sparse_meta: torch.Tensor     # (S, BN, BK/8) uint8
    dense_values: torch.Tensor    # (D, BN, BK)
    block_cols: torch.Tensor      # (NB, NK) int32
    n_sparse: torch.Tensor        # (NB,) int32
    sparse_start: torch.Tensor    # (NB,) int32
    dense_start: torch.Tensor     # (NB,) int32

    def to(self, device: torch.device | str) -> "TilePacked":
        fields = (self.sparse_values, self.sparse_meta, self.dense_values, self.block_cols, self.n_sparse,
                  self.sparse_start, self.dense_start)
        return TilePacked(self.out_features, self.in_features, self.block_n, self.block_k,
                          *(t.to(device) for t in fields))

    def launch_config(self, tokens: int, device: torch.device, dtype: torch.dtype,
                      split_k: int | None = None) -> dict:
        """Block size, split-K factor and dot precision of a forward of `tokens` tokens.

        Few tokens give few programs (one per 64 output rows): split-K cuts each row of weight
        blocks into `split_k` slices, so the grid fills the GPU, and the slices add into an fp32
        output. fp32 uses IEEE products, not TF32, so it matches a full-precision dense baseline.
        """
        block_m = 16 if tokens <= 16 else (32 if tokens <= 32 else 64)   # tl.dot needs >= 16
        n_blocks, n_k = self.block_cols.shape
        programs = n_blocks * -(-tokens // block_m)
        if split_k is None:
            target = 2 * _multiprocessors(device)
            split_k = 1 if programs >= target else -(-target // programs)
        split_k = max(1, min(split_k, n_k))
        return {"block_m": block_m, "split_k": split_k, "ieee": dtype == torch.float32}

    def forward(self, x: torch.Tensor, split_k: int | None = None) -> torch.Tensor:
        """x (M, in) -> (M, out) with the Triton kernel (caller checks `triton_available`)."""
        import triton

        from patchsparse.kernels.triton_kernel import hybrid_tile_kernel

        x = x.contiguous()
        tokens = x.shape[0]
        config = self.launch_config(tokens, x.device, x.dtype, split_k)
        # split-K slices add into fp32 (atomics); one slice stores the result directly
        out_dtype = torch.float32 if config["split_k"] > 1 else x.dtype
        y = (torch.zeros if config["split_k"] > 1 else torch.empty)(tokens, self.out_features, dtype=out_dtype,
                                                                   device=x.device)
        grid = (self.block_cols.shape[0], triton.cdiv(tokens, config["block_m"]), config["split_k"])
        hybrid_tile_kernel[grid](
            x, y, self.sparse_values, self.sparse_meta, self.dense_values,
            self.block_cols, self.n_sparse, self.sparse_start, self.dense_start,
            tokens, self.in_features, self.out_features, x.stride(0), y.stride(0), self.block_cols.shape[1],
            BLOCK_M=config["block_m"], BLOCK_N=self.block_n, BLOCK_K=self.block_k,
            SPLIT_K=config["split_k"], IEEE=config["ieee"],
        )
        return y.to(x.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The masked dense weight (out, in): the reference path."""
        nb, nk = self.block_cols.shape
        bn, bk = self.block_n, self.block_k
        device = self.dense_values.device
        sparse_ordered = torch.arange(nk, device=device)[None, :] < self.n_sparse.long()[:, None]  # (NB, NK)
        blocks = torch.zeros(nb, nk, bn, bk, dtype=self.dense_values.dtype, device=device)
        if self.sparse_values.shape[0]:
            meta = self.sparse_meta.long()                                             # (S, BN, BK/8)
            pos = torch.stack([meta & 15, meta >> 4], dim=-1).reshape(meta.shape[0], bn, bk // 4)  # (S, BN, G)
            first, last = pos & 3, pos >> 2
            group_base = 4 * torch.arange(bk // 4, device=device)
            idx = torch.stack([group_base + first, group_base + last], dim=-1).reshape(-1, bn, bk // 2)
            expanded = torch.zeros(meta.shape[0], bn, bk, dtype=blocks.dtype, device=device)
            expanded.scatter_(2, idx, self.sparse_values)
            blocks[sparse_ordered] = expanded
        blocks[~sparse_ordered] = self.dense_values
        unordered = torch.empty_like(blocks)
        unordered.scatter_(1, self.block_cols.long()[..., None, None].expand(-1, -1, bn, bk), blocks)
        weight = unordered.permute(0, 2, 1, 3).reshape(nb * bn, nk * bk)
        return weight[: self.out_features, : self.in_features]


@torch.no_grad()
def pack_tiles(weight: torch.Tensor, mask: LayerMask, dtype: torch.dtype | None = None,
               block_n: int = BLOCK_N, block_k: int = BLOCK_K) -> TilePacked:
    check_packable(weight, mask)
    if block_k % 8 or block_n < 16 or block_k < 16:
        raise ValueError("blocks need at least 16 rows and 16 inputs, inputs a multiple of 8")
    out_f, in_f = weight.shape
    out_p, in_p = _ceil_to(out_f, block_n), _ceil_to(in_f, block_k)
    nb, nk = out_p // block_n, in_p // block_k
    masked, dense, first, last = padded_parts(weight, mask, dtype or weight.dtype, out_p, in_p)

    is_sparse = ~dense.view(nb, block_n, nk, block_k).any(dim=(1, 3))                  # (NB, NK)
    order = torch.sort((~is_sparse).to(torch.int8), dim=1, stable=True).indices         # sparse first
    sparse_ordered = torch.gather(is_sparse, 1, order)

    groups = masked.view(out_p, in_p // 4, 4)
    kept = torch.stack([groups.gather(-1, first[..., None])[..., 0],
                        groups.gather(-1, last[..., None])[..., 0]], dim=-1)              # (out_p, G, 2)
    sparse_blocks = kept.view(nb, block_n, nk, block_k // 2).permute(0, 2, 1, 3)        # (NB, NK, BN, BK/2)
    pos = (first | (last << 2)).view(out_p, in_p // 8, 2)
    meta = (pos[..., 0] | (pos[..., 1] << 4)).to(torch.uint8)                            # (out_p, in_p/8)
    meta_blocks = meta.view(nb, block_n, nk, block_k // 8).permute(0, 2, 1, 3)          # (NB, NK, BN, BK/8)
    dense_blocks = masked.view(nb, block_n, nk, block_k).permute(0, 2, 1, 3)            # (NB, NK, BN, BK)

    take = order.long()
    rows = torch.arange(nb)[:, None]
    n_sparse = is_sparse.sum(1)
    n_dense = nk - n_sparse
    return TilePacked(
        out_f, in_f, block_n, block_k,
        sparse_values=sparse_blocks[rows, take][sparse_ordered].contiguous(),
        sparse_meta=meta_blocks[rows, take][sparse_ordered].contiguous(),
        dense_values=dense_blocks[rows, take][~sparse_ordered].contiguous(),
        block_cols=order.to(torch.int32).contiguous(),
        n_sparse=n_sparse.to(torch.int32),
        sparse_start=(torch.cumsum(n_sparse, 0) - n_sparse).to(torch.int32),
        dense_start=(torch.cumsum(n_dense, 0) - n_dense).to(torch.int32),
    )
