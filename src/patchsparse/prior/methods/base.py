"""What a one-shot pruning method provides: its calibration statistic and its mask function.

`prune_model` and `compute_prior` (`patchsparse.prior.oneshot`) know pruners only through this
base class and the registry in `patchsparse.prior.methods`: a new method is a new file with a
`Pruner` subclass, plus one line that registers it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from patchsparse.prior.pattern import PrunePattern
from patchsparse.prior.pruners import SparseGPTOptions


class Pruner:
    """One pruning method. Subclasses set `name` and implement `mask`; the rest has defaults."""

    name: str = ""
    needs_statistic: bool = False  # whether `statistic` collects calibration inputs (then windows are required)
    updates_weights: bool = False  # whether `mask` returns an updated weight (SparseGPT's reconstruction)

    def statistic(self, linear: nn.Linear) -> Any:
        """An empty statistic of the inputs of `linear` (fed each calibration batch that reaches it)."""
        raise NotImplementedError(f"{self.name} collects no calibration statistic")

    def check(self, pattern: PrunePattern, options: SparseGPTOptions) -> None:
        """Refuse settings this method cannot run with, before any work."""

    def mask(self, weight: torch.Tensor, stat: Any, pattern: PrunePattern, options: SparseGPTOptions,
             force_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keep-mask bool (out, in) of one linear, and its updated weight (None if it keeps the weight).

        `stat` is the finished statistic (None for a method without one); weights under `force_keep`
        are kept whatever the mask says (the caller adds them), which a reconstructing method may use.
        """
        raise NotImplementedError

    def metadata(self, options: SparseGPTOptions) -> dict[str, Any]:
        """The method's settings worth recording in a mask file."""
        return {}
