"""The sparsity pattern a one-shot pruner produces: N:M (2:4 by default) or unstructured."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from patchsparse.errors import PatchsparseError
from patchsparse.masks.patterns import check_nm, nm_mask_from_scores, unstructured_mask_from_scores


@dataclass(frozen=True)
class PrunePattern:
    """`n` of every `m` consecutive inputs kept (kind "nm"), or a `sparsity` fraction pruned ("unstructured")."""

    kind: str          # "nm" | "unstructured"
    n: int = 0
    m: int = 0
    sparsity: float = 0.0

    def __post_init__(self) -> None:
        if self.kind == "nm":
            check_nm(self.n, self.m)
        elif self.kind == "unstructured":
            if not 0.0 <= self.sparsity < 1.0:
                raise PatchsparseError(f"unstructured sparsity must be in [0, 1), got {self.sparsity}")
        else:
            raise PatchsparseError(f"unknown pattern kind '{self.kind}' (nm or unstructured)")

    @classmethod
    def nm(cls, n: int = 2, m: int = 4) -> "PrunePattern":
        check_nm(n, m)
        return cls("nm", n, m, 1.0 - n / m)

    @classmethod
    def unstructured(cls, sparsity: float) -> "PrunePattern":
        return cls("unstructured", sparsity=sparsity)

    @classmethod
    def parse(cls, text: str, sparsity: float | None = None) -> "PrunePattern":
        """"2:4", "4:8" (the sparsity is implied; a given one must agree) or "unstructured" (needs one)."""
        text = text.strip().lower()
        if text == "unstructured":
            if sparsity is None:
                raise PatchsparseError("the unstructured pattern needs a sparsity in [0, 1)")
            return cls.unstructured(sparsity)
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise PatchsparseError(f"unknown pattern '{text}' (use 2:4, another N:M such as 4:8, or unstructured)")
        pattern = cls.nm(int(match.group(1)), int(match.group(2)))
        pattern.check_sparsity(sparsity)
        return pattern

    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    @property
    def label(self) -> str:
        """The `LayerMask.pattern` string: "2:4", "4:8" or "unstructured"."""
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    def check_sparsity(self, sparsity: float | None) -> None:
        """An N:M pattern fixes its sparsity; a different one is a mistake, not a request."""
        if sparsity is not None and self.is_nm and abs(sparsity - self.sparsity) > 1e-9:
            raise PatchsparseError(
                f"pattern {self.label} means sparsity {self.sparsity:g}, got {sparsity:g} "
                f"(use --tile for a dense/{self.label} mix below {self.sparsity:g}, or the unstructured pattern)")

    def select(self, scores: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        """Keep-mask of the highest scores: per group of m, or the top (1 - s) per layer / per row."""
        if self.is_nm:
            return nm_mask_from_scores(scores, self.n, self.m)
        return unstructured_mask_from_scores(scores, self.sparsity, per_row=per_row)
