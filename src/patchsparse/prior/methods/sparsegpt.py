"""SparseGPT: optimal-brain-surgeon pruning with the layer's Hessian, updating the kept weights."""

from __future__ import annotations

from patchsparse.prior.methods.base import Pruner
from patchsparse.prior.pruners import sparsegpt_prune
from patchsparse.prior.stats import HessianStat


class SparseGPT(Pruner):
    name = "sparsegpt"
    needs_statistic = True
    updates_weights = True

    def statistic(self, linear):
        return HessianStat(linear.in_features, linear.weight.device)

    def check(self, pattern, options):
        options.check(pattern)

    def mask(self, weight, stat, pattern, options, force_keep=None):
        return sparsegpt_prune(weight, stat.hessian, pattern, options, force_keep=force_keep)

    def metadata(self, options):
        return {"damp": options.damp, "blocksize": options.blocksize}
