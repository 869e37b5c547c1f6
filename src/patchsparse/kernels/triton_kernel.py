"""The Triton kernel of the tile format (imported only when Triton is installed).

One program computes a (BLOCK_M tokens) x (BLOCK_N output rows) block of y = x @ W^T. It walks
its row of weight blocks (or, with SPLIT_K > 1, its slice of that row: the third grid axis, for few
tokens, the slices adding into an fp32 output with atomics): first the 2:4 blocks, whose values
(BLOCK_N, BLOCK_K/2) and metadata bytes (BLOCK_N, BLOCK_K/8) are read compressed and expanded to a dense (BLOCK_N, BLOCK_K) block
in registers, then the dense blocks; every block goes through `tl.dot` with fp32 accumulation
(IEEE products for fp32 inputs: Triton's default would be TF32).
Memory traffic for 2:4 blocks is 0.56x of dense, which is what decode (few tokens) is limited by;
the math is dense, so prefill gains nothing here (the split format in `split.py` is for prefill).

Each compressed value is loaded by the four positions of its group: the repeats hit the same
cache lines, so DRAM/L2 traffic stays compressed while the code needs no register reshapes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def hybrid_tile_kernel(
    x_ptr, y_ptr, sparse_vals_ptr, sparse_meta_ptr, dense_vals_ptr,
    block_cols_ptr, n_sparse_ptr, sparse_start_ptr, dense_start_ptr,
    tokens, in_features, out_features, stride_xm, stride_ym, n_kblocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)            # (BM,)
    offs_n = tl.arange(0, BLOCK_N)                              # (BN,) rows within the block
    offs_k = tl.arange(0, BLOCK_K)                              # (BK,) inputs within the block
    group = offs_k // 4
    position = offs_k % 4

    n_sparse = tl.load(n_sparse_ptr + pid_n)
    n_dense = n_kblocks - n_sparse
    # this program's slice of the sparse blocks and of the dense blocks (all of them when SPLIT_K == 1)
    sparse_lo = n_sparse * pid_k // SPLIT_K
    sparse_hi = n_sparse * (pid_k + 1) // SPLIT_K
    dense_lo = n_sparse + n_dense * pid_k // SPLIT_K
    dense_hi = n_sparse + n_dense * (pid_k + 1) // SPLIT_K
    sparse_start = tl.load(sparse_start_ptr + pid_n).to(tl.int64)
    dense_start = tl.load(dense_start_ptr + pid_n).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for i in range(sparse_lo, sparse_hi):                       # 2:4 blocks, expanded in registers
        kb = tl.load(block_cols_ptr + pid_n * n_kblocks + i)
        cols = kb * BLOCK_K + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                    mask=(offs_m[:, None] < tokens) & (cols[None, :] < in_features), other=0.0)  # (BM, BK)
        tile = sparse_start + i
        vals = sparse_vals_ptr + tile * (BLOCK_N * BLOCK_K // 2) + offs_n[:, None] * (BLOCK_K // 2)
        v0 = tl.load(vals + 2 * group[None, :])                             # (BN, BK), repeated per group
        v1 = tl.load(vals + 2 * group[None, :] + 1)
        meta = tl.load(sparse_meta_ptr + tile * (BLOCK_N * BLOCK_K // 8)
                       + offs_n[:, None] * (BLOCK_K // 8) + (group // 2)[None, :]).to(tl.int32)
        shift = ((group % 2) * 4)[None, :]
        p0 = (meta >> shift) & 3
        p1 = (meta >> (shift + 2)) & 3
        zero = tl.zeros((BLOCK_N, BLOCK_K), dtype=v0.dtype)
        w = tl.where(position[None, :] == p0, v0, tl.where(position[None, :] == p1, v1, zero))
        if IEEE:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    for i in range(dense_lo, dense_hi):                         # dense blocks
        kb = tl.load(block_cols_ptr + pid_n * n_kblocks + i)
        cols = kb * BLOCK_K + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                    mask=(offs_m[:, None] < tokens) & (cols[None, :] < in_features), other=0.0)
        tile = dense_start + (i - n_sparse)
        w = tl.load(dense_vals_ptr + tile * (BLOCK_N * BLOCK_K) + offs_n[:, None] * BLOCK_K + offs_k[None, :])
        if IEEE:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))

    rows = pid_n * BLOCK_N + offs_n
    out = y_ptr + offs_m[:, None] * stride_ym + rows[None, :]
    inside = (offs_m[:, None] < tokens) & (rows[None, :] < out_features)
    if SPLIT_K == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=inside)
    else:                                                       # y is fp32 and zeroed: slices add up
        tl.atomic_add(out, acc, mask=inside)
