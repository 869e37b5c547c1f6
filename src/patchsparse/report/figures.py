"""Report figures: density bars, tile maps, training curves. Each function returns a Figure.

Uses matplotlib's object-oriented API with the Agg canvas (no pyplot, no display, no global state).
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from patchsparse.masks import HybridMaskSpec
from patchsparse.models.layers import block_index, projection_type
from patchsparse.report.inputs import Metrics

SPARSE_COLOR, DENSE_COLOR = "#d0d4da", "#1f4e79"


def png_bytes(figure: Figure, dpi: int = 110) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def projection_order(spec: HybridMaskSpec) -> list[str]:
    """Projection types in the order the model has them (q, k, v, o, gate, up, down for Llama)."""
    return list(dict.fromkeys(projection_type(name) for name in spec.layers))


def _density_floor(values: list[float]) -> float:
    # Hybrid 2:4 masks keep at least half of every layer; start the axis below that so the
    # differences between layers are visible. Any sparser layer brings the axis back to zero.
    return 0.4 if values and min(values) >= 0.5 else 0.0


def density_per_layer_figure(spec: HybridMaskSpec, kinds_per_panel: int = 4) -> Figure:
    """Bars of kept fraction per decoder block, one bar per projection type within each block.

    Projection types are split over stacked panels (for Llama: q/k/v/o, then gate/up/down) so
    that a 30-block model stays readable at page width.
    """
    kinds = projection_order(spec)
    panels = [kinds[i: i + kinds_per_panel] for i in range(0, len(kinds), kinds_per_panel)]
    blocks = sorted({block_index(name) for name in spec.layers})
    density = {(block_index(n), projection_type(n)): 1.0 - m.sparsity() for n, m in spec.layers.items()}
    overall = 1.0 - spec.sparsity()
    floor = _density_floor(list(density.values()))
    figure = Figure(figsize=(max(7.0, min(15.0, 0.42 * len(blocks) + 2.5)), 1.2 + 2.9 * len(panels)),
                    layout="constrained")
    x = np.arange(len(blocks))
    for p, panel_kinds in enumerate(panels):
        axes = figure.add_subplot(len(panels), 1, p + 1)
        width = 0.84 / len(panel_kinds)
        for i, kind in enumerate(panel_kinds):
            values = [density.get((b, kind), np.nan) for b in blocks]
            axes.bar(x - 0.42 + width * (i + 0.5), values, width, label=kind, color=f"C{kinds.index(kind) % 10}")
        axes.axhline(overall, color="black", linestyle="--", linewidth=1, label=f"overall {overall:.1%}")
        if floor > 0:
            axes.axhline(0.5, color="grey", linestyle=":", linewidth=1.2, label="2:4 only (50%)")
        axes.set_xticks(x, [str(b) for b in blocks], fontsize=8 if len(blocks) > 20 else 10)
        axes.set_xlim(-0.6, len(blocks) - 0.4)
        axes.set_ylim(floor, 1.0)
        axes.set_ylabel("density")
        axes.grid(axis="y", alpha=0.3)
        # above the axes, so that it never hides a bar near full density
        axes.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=len(panel_kinds) + 2, fontsize=8,
                    frameon=False, borderaxespad=0.2)
        if p == len(panels) - 1:
            axes.set_xlabel("decoder block")
    figure.suptitle("Density per layer (fraction of weights kept)", fontsize=11)
    return figure


def density_per_projection_figure(spec: HybridMaskSpec) -> Figure:
    """Stacked bars per projection type: weights kept in sparse tiles, and weights in dense tiles."""
    kinds = projection_order(spec)
    in_dense, in_sparse = [], []
    for kind in kinds:
        masks = [m for n, m in spec.layers.items() if projection_type(n) == kind]
        total = sum(m.numel() for m in masks)
        dense_weights = sum(m.dense_tile_fraction() * m.numel() for m in masks)
        kept = sum(m.kept() for m in masks)
        in_dense.append(dense_weights / total)
        in_sparse.append((kept - dense_weights) / total)
    figure = Figure(figsize=(max(5.5, 0.9 * len(kinds) + 2), 4.0), layout="constrained")
    axes = figure.add_subplot()
    x = np.arange(len(kinds))
    axes.bar(x, in_sparse, 0.6, color="#7fa7c9", label="kept inside sparse tiles")
    axes.bar(x, in_dense, 0.6, bottom=in_sparse, color=DENSE_COLOR, label="in dense tiles")
    for xi, (s, d) in enumerate(zip(in_sparse, in_dense)):
        axes.text(xi, s + d + 0.01, f"{s + d:.1%}", ha="center", va="bottom", fontsize=9)
    axes.set_xticks(x, kinds)
    axes.set_ylim(0, 1.08)
    axes.set_ylabel("fraction of weights kept")
    axes.set_xlabel("projection type")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=8, ncols=2, frameon=False, borderaxespad=0.2)
    figure.suptitle("Density per projection type", fontsize=11)
    return figure


def select_tile_map_layers(spec: HybridMaskSpec, count: int = 4) -> list[str]:
    """Tiled layers with the most, the fewest and in-between dense tiles (at most `count`)."""
    tiled = sorted((m.dense_tile_fraction(), name) for name, m in spec.layers.items() if m.dense_tiles is not None)
    if len(tiled) <= count:
        return [name for _, name in reversed(tiled)]
    picks = np.linspace(len(tiled) - 1, 0, count).round().astype(int)
    return [tiled[i][1] for i in dict.fromkeys(picks.tolist())]


def tile_map_figure(spec: HybridMaskSpec, names: list[str]) -> Figure:
    """Dense (dark) and 2:4 (light) tiles of each named layer, drawn at their true extent in the weight."""
    figure = Figure(figsize=(3.8 * len(names) + 0.5, 4.6), layout="constrained")
    cmap = ListedColormap([SPARSE_COLOR, DENSE_COLOR])
    for i, name in enumerate(names):
        mask = spec.layers[name]
        grid = mask.grid
        row_edges = np.concatenate([[0], grid.row_sizes().cumsum(0).numpy()])  # (R+1,)
        col_edges = np.concatenate([[0], grid.col_sizes().cumsum(0).numpy()])  # (C+1,)
        axes = figure.add_subplot(1, len(names), i + 1)
        # thin white edges separate neighbouring tiles; ragged edge tiles come out smaller
        axes.pcolormesh(col_edges, row_edges, mask.dense_tiles.float().numpy(), cmap=cmap, vmin=0, vmax=1,
                        edgecolors="white", linewidth=0.3 if max(grid.shape) <= 64 else 0.0)
        axes.set_xlim(0, mask.shape[1])
        axes.set_ylim(mask.shape[0], 0)  # row 0 at the top, as in the weight matrix
        axes.set_aspect("equal")
        short = name.split("layers.")[-1]
        axes.set_title(f"{short}  ({mask.shape[0]}x{mask.shape[1]}, tiles {mask.tile[0]}x{mask.tile[1]})\n"
                       f"{mask.dense_tile_fraction():.1%} of weights in dense tiles", fontsize=9)
        axes.set_xlabel("input index", fontsize=8)
        axes.set_ylabel("output index", fontsize=8)
        axes.tick_params(labelsize=7)
    figure.legend(handles=[Patch(color=DENSE_COLOR, label="dense tile"), Patch(color=SPARSE_COLOR, label="2:4 tile")],
                  loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    figure.suptitle("Tile maps", fontsize=11)
    return figure


# Panels of the training-curve figure: title, y label, metric keys (as `patchsparse learn` logs them,
# plus common aliases). A panel is drawn when any of its keys has a number.
CURVE_PANELS = (
    ("Loss", "loss", ("loss", "lm_loss")),
    ("Density", "density", ("soft_density", "density", "hard_density")),
    ("Temperature τ", "τ", ("tau_nm", "tau_24", "tau_tile", "tau")),
    ("Learning rate", "learning rate", ("lr",)),
    ("Sparsity regulariser", "value", ("sparse_reg", "reg_loss")),
    ("Logit scale κ", "κ", ("kappa_nm", "kappa_tile")),
)


def training_curves_figure(metrics: Metrics, target_density: float | None = None) -> Figure | None:
    """One panel per kind of curve that the metrics hold; None when they hold none."""
    available = set(metrics.keys())
    panels = [(title, ylabel, [k for k in keys if k in available]) for title, ylabel, keys in CURVE_PANELS]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    columns = min(2, len(panels))
    rows = (len(panels) + 1) // 2
    figure = Figure(figsize=(5.2 * columns, 3.4 * rows), layout="constrained")
    for i, (title, ylabel, keys) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, i + 1)
        for key in keys:
            steps, values = metrics.series(key)
            axes.plot(steps, values, label=key, marker="." if len(values) < 30 else None)
        if title == "Density" and target_density is not None:
            axes.axhline(target_density, color="black", linestyle="--", linewidth=1,
                         label=f"target {target_density:.1%}")
        if title == "Learning rate":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("Training curves", fontsize=11)
    return figure
