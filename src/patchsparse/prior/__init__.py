"""One-shot pruners (magnitude, Wanda, SparseGPT; the registry in `prior.methods`) and the priors they give the learnable masks."""

from patchsparse.prior.types import LayerPrior, PriorMasks

__all__ = ["LayerPrior", "PriorMasks"]
