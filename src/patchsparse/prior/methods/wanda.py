"""Wanda: score |W_ij|·‖x_j‖₂ from the inputs' L2 norms; unstructured prunes the same fraction per row."""

from __future__ import annotations

from patchsparse.prior.methods.base import Pruner
from patchsparse.prior.pruners import wanda_mask
from patchsparse.prior.stats import InputNormStat


class Wanda(Pruner):
    name = "wanda"
    needs_statistic = True

    def statistic(self, linear):
        return InputNormStat(linear.in_features, linear.weight.device)

    def mask(self, weight, stat, pattern, options, force_keep=None):
        return wanda_mask(weight, stat.norms(), pattern), None
