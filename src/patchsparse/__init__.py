"""patchsparse: learnable tile-level hybrid (dense / 2:4) sparsity for LLMs."""

from patchsparse.errors import PatchsparseError
from patchsparse.version import __version__

__all__ = ["PatchsparseError", "__version__", "load_sparse"]


def __getattr__(name: str):
    # `load_sparse` pulls in torch and transformers: imported on first use, not with the package.
    if name == "load_sparse":
        from patchsparse.inference import load_sparse

        return load_sparse
    raise AttributeError(f"module 'patchsparse' has no attribute '{name}'")
