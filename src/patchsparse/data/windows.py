"""Tokenisation and fixed-length token windows."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from patchsparse.errors import PatchsparseError


def tokenize_texts(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """Join texts with "\\n\\n" and tokenize once (the SparseGPT/Wanda perplexity protocol). -> (N,)"""
    joined = "\n\n".join(texts)
    ids = tokenizer(joined, return_tensors="pt", add_special_tokens=True).input_ids[0]
    return ids.to(torch.long)


def sequential_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start; the remainder is dropped. -> (n, seqlen)"""
    if seqlen < 2:
        raise PatchsparseError(f"seqlen must be at least 2, got {seqlen}")
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise PatchsparseError(f"the text has {ids.numel()} tokens: not one complete window of {seqlen}")
    return ids[: count * seqlen].view(count, seqlen)


def random_windows(ids: torch.Tensor, count: int, seqlen: int, seed: int) -> torch.Tensor:
    """`count` windows at seeded random offsets (calibration, as in SparseGPT/Wanda). -> (count, seqlen)"""
    if count < 1:
        raise PatchsparseError(f"the number of windows must be at least 1, got {count}")
    if ids.numel() <= seqlen:
        raise PatchsparseError(f"the text has {ids.numel()} tokens: too short for windows of {seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (count,), generator=generator)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])


def shuffled_blocks(ids: torch.Tensor, seqlen: int, seed: int) -> torch.Tensor:
    """All non-overlapping blocks (packing, as PATCH trains), in a seeded random order. -> (n, seqlen)"""
    blocks = sequential_windows(ids, seqlen)
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    return blocks[order]
