"""The one-shot pruning methods, one file each behind `Pruner`, and the registry that names them.

Adding a method: a file here with a `Pruner` subclass, and its line in `_BUILT_IN` below (or, from
outside the package, `register(MyPruner())`).
"""

from __future__ import annotations

from patchsparse.errors import PatchsparseError
from patchsparse.prior.methods.base import Pruner
from patchsparse.prior.methods.magnitude import Magnitude
from patchsparse.prior.methods.sparsegpt import SparseGPT
from patchsparse.prior.methods.wanda import Wanda

_BUILT_IN: tuple[Pruner, ...] = (
    Magnitude(),
    Wanda(),
    SparseGPT(),
)
PRUNERS: dict[str, Pruner] = {p.name: p for p in _BUILT_IN}


def register(pruner: Pruner) -> Pruner:
    """Make `pruner` available by its name (to `prune_model`, `compute_prior` and the CLI built after)."""
    if not pruner.name or pruner.name in PRUNERS:
        raise PatchsparseError(f"a pruner needs a new name, got '{pruner.name}'")
    PRUNERS[pruner.name] = pruner
    return pruner


def pruner_names() -> tuple[str, ...]:
    return tuple(PRUNERS)


def get_pruner(name: str) -> Pruner:
    if name not in PRUNERS:
        raise PatchsparseError(f"unknown pruning method '{name}' (choose {', '.join(PRUNERS)})")
    return PRUNERS[name]


__all__ = ["PRUNERS", "Pruner", "get_pruner", "pruner_names", "register"]
