"""One-shot pruners (magnitude, Wanda, SparseGPT) and the priors they give the learnable masks."""

from patchsparse.prior.tile_prior import dense_fraction_for_sparsity, initial_dense_tiles
from patchsparse.prior.types import LayerPrior, PriorMasks

__all__ = ["LayerPrior", "PriorMasks", "dense_fraction_for_sparsity", "initial_dense_tiles"]
