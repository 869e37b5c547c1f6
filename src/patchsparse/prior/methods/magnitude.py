"""Magnitude pruning: score |W|; unstructured uses one threshold per layer. Needs no calibration."""

from __future__ import annotations

from patchsparse.prior.methods.base import Pruner
from patchsparse.prior.pruners import magnitude_mask


class Magnitude(Pruner):
    name = "magnitude"

    def mask(self, weight, stat, pattern, options, force_keep=None):
        return magnitude_mask(weight, pattern), None
