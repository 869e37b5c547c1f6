"""Perplexity with the protocol of SparseGPT, Wanda, MaskLLM and PATCH.

Texts are joined with "\\n\\n" and tokenized once, cut into non-overlapping windows of `seqlen`
(remainder dropped); the mean next-token NLL over every predicted token (seqlen - 1 per window)
is exponentiated. Logits are upcast to fp32 before the softmax so bf16 models are scored exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from patchsparse.models.loading import input_device
from patchsparse.utils import progress


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens_scored: int
    windows: int
    seqlen: int

    def as_dict(self) -> dict:
        return asdict(self)


def perplexity_from_nll(total_nll: float, tokens: int) -> float:
    return math.exp(total_nll / tokens)


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window. logits (B, T, V), window (B, T) -> (B,)"""
    shifted = logits[:, :-1].float()  # (B, T-1, V)
    targets = window[:, 1:]           # (B, T-1)
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape).sum(dim=1)


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1,
                        desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of `model` over token windows (n, seqlen)."""
    device = input_device(model)
    total_nll, count = 0.0, 0
    n, seqlen = windows.shape
    bar = progress(total=n, desc=desc, unit="win")
    for start in range(0, n, batch_size):
        batch = windows[start: start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        # With a device map the logits come out on the last layer's device.
        total_nll += window_nll(logits, batch.to(logits.device)).double().sum().item()
        count += batch.shape[0] * (seqlen - 1)
        bar.update(batch.shape[0])
        bar.set_postfix(ppl=f"{perplexity_from_nll(total_nll, count):.3f}")
    bar.close()
    return PerplexityResult(perplexity=perplexity_from_nll(total_nll, count), mean_nll=total_nll / count,
                            tokens_scored=count, windows=n, seqlen=seqlen)
