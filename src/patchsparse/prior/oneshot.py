"""One-shot pruning of a whole model, layer by layer: baselines (`prune_model`) and priors (`compute_prior`).

Both calibrate sequentially (each decoder layer sees the outputs of the already-pruned layers
before it) and share the per-linear step:

1. with a tile size and a target sparsity s: prune the layer unstructured at s with the same
   method; each tile's score is the fraction of its weights kept (PATCH's `distribution_scores`),
   and the highest-scoring tiles start dense until the layer's density is 1 - s;
2. the N:M (or unstructured) mask of the method.

`compute_prior` leaves the model's weights as they were; `prune_model` prunes the model in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from patchsparse.errors import PatchsparseError
from patchsparse.masks.spec import HybridMaskSpec, LayerMask
from patchsparse.masks.tiles import TileGrid, check_hybrid_sparsity, check_tile_size, initial_dense_tiles
from patchsparse.models.layers import LayerSelection, select_linears
from patchsparse.prior.layerwise import calibrate_layer_by_layer
from patchsparse.prior.methods import get_pruner
from patchsparse.prior.pattern import PrunePattern
from patchsparse.prior.pruners import SparseGPTOptions
from patchsparse.prior.types import LayerPrior, PriorMasks
from patchsparse.utils import log

# A linear whose statistic saw fewer calibration tokens than this (in practice a mixture-of-experts
# expert the router rarely picks) has no usable statistic: it is pruned by magnitude instead.
MIN_CALIBRATION_TOKENS = 16


def check_method(method: str) -> None:
    get_pruner(method)


def statistic_factory(method: str) -> Callable[[nn.Linear], Any] | None:
    """The calibration statistic a method needs per linear; None for one that needs none (magnitude)."""
    pruner = get_pruner(method)
    return pruner.statistic if pruner.needs_statistic else None


def method_mask(method: str, weight: torch.Tensor, stat: Any, pattern: PrunePattern,
                options: SparseGPTOptions = SparseGPTOptions(),
                force_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keep-mask of one linear, and the method's updated weight (None for a method that keeps the weight)."""
    return get_pruner(method).mask(weight, stat, pattern, options, force_keep=force_keep)


def method_for(method: str, stat: Any, name: str, fallbacks: list[str]) -> str:
    """`method`, or magnitude for a linear whose statistic saw too few tokens (noted in `fallbacks`)."""
    if stat is not None and stat.tokens < MIN_CALIBRATION_TOKENS:
        fallbacks.append(name)
        return "magnitude"
    return method


def report_fallbacks(method: str, fallbacks: list[str]) -> None:
    if fallbacks:
        log(f"note: {len(fallbacks)} linear(s) saw fewer than {MIN_CALIBRATION_TOKENS} calibration tokens "
            f"(experts the router rarely picks) and were pruned by magnitude instead of {method}: "
            + ", ".join(fallbacks[:4]) + (", …" if len(fallbacks) > 4 else ""))


def tile_scores_from_mask(keep: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Fraction of each tile's weights that `keep` keeps, counted by the tile's real size. -> (R, C)"""
    return grid.reduce_sum(keep.float()) / grid.tile_numel().to(keep.device, torch.float32)


@dataclass(frozen=True)
class TilePrior:
    scores: torch.Tensor  # float (R, C)
    dense: torch.Tensor   # bool (R, C): the tiles that start dense


def tile_prior(method: str, weight: torch.Tensor, stat: Any, tile: tuple[int, int], sparsity: float,
               options: SparseGPTOptions) -> TilePrior:
    """Score tiles by what unstructured pruning at `sparsity` keeps; mark the best dense to reach it."""
    grid = TileGrid(weight.shape[0], weight.shape[1], *tile)
    keep, _ = method_mask(method, weight, stat, PrunePattern.unstructured(sparsity), options)
    scores = tile_scores_from_mask(keep, grid).cpu()
    return TilePrior(scores, initial_dense_tiles(scores, grid, sparsity))


def check_request(model: nn.Module, selection: LayerSelection, method: str, pattern: PrunePattern,
                  tile: tuple[int, int] | None, sparsity: float | None, calib_windows: torch.Tensor | None,
                  options: SparseGPTOptions) -> dict[str, nn.Linear]:
    """Every check that can fail, run before the model is touched. -> the selected linears"""
    get_pruner(method).check(pattern, options)
    if tile is not None:
        check_tile_size(*tile)
        if not (pattern.is_nm and 2 * pattern.n == pattern.m):
            raise PatchsparseError(f"tiles mix dense with a 50% N:M pattern such as 2:4, not {pattern.label}")
        if sparsity is None:
            raise PatchsparseError("a tile prior needs a target sparsity in [0, 0.5]")
        check_hybrid_sparsity(sparsity)
    if statistic_factory(method) is not None and (calib_windows is None or calib_windows.shape[0] == 0):
        raise PatchsparseError(f"{method} needs calibration windows; got none")
    linears = select_linears(model, selection)
    if pattern.is_nm:
        for name, linear in linears.items():
            if linear.in_features % pattern.m:
                raise PatchsparseError(
                    f"{name} has {linear.in_features} inputs, not divisible by M={pattern.m} of {pattern.label}")
    return linears


def check_dense_tiles(linears: dict[str, nn.Linear], dense_tiles: Mapping[str, torch.Tensor],
                      tile: tuple[int, int]) -> None:
    """A given allocation names every selected linear (and no other) with its tile grid's shape."""
    missing = sorted(set(linears) - set(dense_tiles))
    extra = sorted(set(dense_tiles) - set(linears))
    if missing or extra:
        raise PatchsparseError(f"the dense-tile allocation does not match the selected layers "
                               f"(missing {missing[:3]}, unknown {extra[:3]})")
    for name, linear in linears.items():
        grid = TileGrid(*linear.weight.shape, *tile)
        if tuple(dense_tiles[name].shape) != grid.shape:
            raise PatchsparseError(f"dense tiles of '{name}' have shape {tuple(dense_tiles[name].shape)}, "
                                   f"its tile grid {grid.shape}")


def compute_prior(model: nn.Module, calib_windows: torch.Tensor | None, method: str, sparsity: float | None,
                  tile: tuple[int, int] | None, selection: LayerSelection = LayerSelection(), n: int = 2, m: int = 4,
                  *, options: SparseGPTOptions = SparseGPTOptions(), batch_size: int = 1) -> PriorMasks:
    """One-shot masks that learnable masks start from. The model's weights are left unchanged.

    Every selected linear gets its N:M mask (the method's own; SparseGPT's without its weight
    update); with `tile` and `sparsity` also its tile scores. Layers are calibrated on the
    outputs of the earlier layers with the starting mask applied to the original weights
    (the N:M mask, plus the initial dense tiles when tiles are given).
    """
    pattern = PrunePattern.nm(n, m)
    if tile is None:
        pattern.check_sparsity(sparsity)
    check_request(model, selection, method, pattern, tile, sparsity, calib_windows, options)
    priors: PriorMasks = {}
    fallbacks: list[str] = []

    def prune_layer(index: int, block: dict[str, nn.Linear], stats: dict[str, Any]) -> None:
        for name, linear in block.items():
            weight = linear.weight
            used = method_for(method, stats.get(name), name, fallbacks)
            keep, _ = method_mask(used, weight, stats.get(name), pattern, options)
            start = keep
            scores = None
            if tile is not None:
                prior = tile_prior(used, weight, stats.get(name), tile, sparsity, options)
                scores = prior.scores
                start = keep | TileGrid(*weight.shape, *tile).expand(prior.dense.to(keep.device))
            priors[name] = LayerPrior(nm_keep=keep.cpu(), tile_scores=scores, tile=tile)
            weight.mul_(start.to(weight.dtype))  # restored by the driver once the outputs are passed on

    calibrate_layer_by_layer(model, calib_windows, statistic_factory(method), prune_layer, selection=selection,
                             restore_weights=True, batch_size=batch_size, desc=f"{method} prior")
    report_fallbacks(method, fallbacks)
    return priors


def prune_model(model: nn.Module, calib_windows: torch.Tensor | None, method: str,
                pattern: PrunePattern | str = "2:4", sparsity: float | None = None, *,
                tile: tuple[int, int] | None = None, selection: LayerSelection = LayerSelection(),
                update_weights: bool = True, options: SparseGPTOptions = SparseGPTOptions(),
                batch_size: int = 1, dense_tiles: Mapping[str, torch.Tensor] | None = None) -> HybridMaskSpec:
    """One-shot prune `model` IN PLACE and return the masks as a `HybridMaskSpec`.

    Afterwards every selected linear holds its pruned weight: the original weight times the mask,
    or, for SparseGPT with `update_weights`, its reconstructed weight times the mask. In the
    second case the mask alone does not reproduce the model; save the linears' weights too.

    Patterns: N:M (`sparsity` may be omitted; it is 1 - N/M), unstructured (`sparsity` in
    [0, 1)), or, with `tile`, a 50% N:M pattern mixed with dense tiles at `sparsity` in [0, 0.5]
    (the one-shot PATCH prior: each layer's best tiles dense, the rest N:M; SparseGPT then never
    prunes inside dense tiles).

    `dense_tiles` (with `tile`): each layer's dense tiles, bool (R, C), given instead of chosen by
    the layer's own scores — e.g. a learned allocation, whose sparse tiles SparseGPT then prunes
    with its weight update (`patchsparse.reconstruct`). `sparsity` is then ignored.
    """
    if dense_tiles is not None:
        if tile is None:
            raise PatchsparseError("given dense tiles need the tile size they were cut with")
        sparsity = 0.0 if sparsity is None else sparsity  # only checked: the allocation is given
    if isinstance(pattern, str):
        pattern = PrunePattern.parse(pattern, sparsity if (tile is None or pattern.strip().lower() == "unstructured") else None)
    elif tile is None:
        pattern.check_sparsity(sparsity)
    linears = check_request(model, selection, method, pattern, tile, sparsity, calib_windows, options)
    if dense_tiles is not None:
        check_dense_tiles(linears, dense_tiles, tile)
    layers: dict[str, LayerMask] = {}
    fallbacks: list[str] = []

    def prune_layer(index: int, block: dict[str, nn.Linear], stats: dict[str, Any]) -> None:
        for name, linear in block.items():
            weight = linear.weight
            used = method_for(method, stats.get(name), name, fallbacks)
            dense = force = None
            if dense_tiles is not None:
                dense = dense_tiles[name].cpu().bool()
            elif tile is not None:
                dense = tile_prior(used, weight, stats.get(name), tile, sparsity, options).dense
            if dense is not None:
                force = TileGrid(*weight.shape, *tile).expand(dense).to(weight.device)
            keep, updated = method_mask(used, weight, stats.get(name), pattern, options, force_keep=force)
            layers[name] = LayerMask(keep.cpu(), pattern.label, tile, dense)
            final = keep if force is None else keep | force
            new = updated if (updated is not None and update_weights) else weight.float()
            weight.copy_((new * final).to(weight.dtype))

    calibrate_layer_by_layer(model, calib_windows, statistic_factory(method), prune_layer, selection=selection,
                             restore_weights=False, batch_size=batch_size, desc=f"{method} {pattern.label}")
    report_fallbacks(method, fallbacks)
    spec = HybridMaskSpec(layers, metadata={
        "mode": "oneshot",
        "method": method,
        "pattern": pattern.label,
        "target_sparsity": (None if dense_tiles is not None else sparsity) if tile is not None else pattern.sparsity,
        "allocation": "given" if dense_tiles is not None else ("tile scores" if tile is not None else None),
        "tile": list(tile) if tile is not None else None,
        "weights_updated": bool(get_pruner(method).updates_weights and update_weights),
        **({"magnitude_fallback": fallbacks, "min_calibration_tokens": MIN_CALIBRATION_TOKENS} if fallbacks else {}),
        "calibration_windows": 0 if calib_windows is None else int(calib_windows.shape[0]),
        "calibration_seqlen": None if calib_windows is None else int(calib_windows.shape[1]),
        **get_pruner(method).metadata(options),
    })
    spec.metadata["sparsity"] = spec.sparsity()
    return spec
