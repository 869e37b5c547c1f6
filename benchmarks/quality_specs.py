"""The rows of the quality benchmark (`benchmarks/quality.py`): one `MethodSpec` per method and setting."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from patchsparse.errors import PatchsparseError
from patchsparse.prior.methods import pruner_names

FULL_WIDTH = 0            # tile column count meaning "the layer's whole input width" (row stripes)
LEVER_DISTILL = 1.0       # distillation share of the lever rows
LEVER_BLOCKWISE = 64      # steps per block of the block-wise lever rows
LEVER_JOINT_LR = 1e-3     # weight rate of the rows whose weights learn with the masks block by block


# ---- method specs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodSpec:
    """One row of the table. `name` is what `--only` and the results file use."""

    name: str
    kind: str                      # dense | oneshot | learned | blocks
    group: str                     # table section
    label: str
    sparsity: float = 0.0          # target (global, over decoder linears)
    pruner: str = "sparsegpt"      # one-shot pruner, or the prior of a learned method
    pattern: str = "2:4"           # oneshot: 2:4 | unstructured | hybrid (dense tiles + 2:4)
    layers: str = "all"            # oneshot: all | mlp
    mode: str | None = None        # learned: maskllm | patch-tile | patch-joint
    tile: tuple[int, int] | None = None   # learned: None = the preset's; (r, FULL_WIDTH) = row stripes
    seed: int = 0                  # learned: training seed (noise, init, window order)
    allocation: str | None = None  # blocks: edges | owl; learned: the tile prior's start (edges)
    distill: float = 0.0           # learned: share α of the dense-model distillation term
    reconstruct: str | None = None  # weight reconstruction after the masks (learned: repick | fixed | block;
                                    # one-shot: block, from the pruner's own update)
    blockwise: int = 0             # learned: steps per block of block-wise learning (0: end to end)
    blockwise_weight_lr: float = 0.0  # learned block-wise: the weights learn with the masks at this rate
    block_steps: int = 0           # block reconstruction: Adam steps per block (0: BlockFit's default)
    sparse_weights: str = "dense"  # learned: the sparse tiles' weights while learning (dense | fitted)


# Fields added after rows were first recorded, with their defaults: they enter a row's key only when
# set, so the rows recorded before them keep their keys (and their results).
LATER_FIELDS = {"blockwise_weight_lr": 0.0, "block_steps": 0, "sparse_weights": "dense"}


def key_fields(spec: MethodSpec | dict) -> dict:
    """The spec's fields that identify its results (a spec, or one as recorded)."""
    fields = asdict(spec) if isinstance(spec, MethodSpec) else dict(spec)
    return {k: v for k, v in fields.items() if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}


def default_specs(tile_sizes: Iterable[tuple[int, int]] = ((32, 32), (64, 64), (16, FULL_WIDTH))) -> list[MethodSpec]:
    specs = [MethodSpec("dense", "dense", "reference", "dense")]
    for pruner in pruner_names():
        specs.append(MethodSpec(f"{pruner}-2:4", "oneshot", "one-shot 2:4", f"{pruner.capitalize() if pruner != 'sparsegpt' else 'SparseGPT'} 2:4",
                                0.5, pruner))
    specs.append(MethodSpec("maskllm-2:4", "learned", "learned", "MaskLLM 2:4", 0.5, mode="maskllm"))
    for mode, title in (("patch-tile", "PATCH-Tile"), ("patch-joint", "PATCH-Joint")):
        for s in (0.25, 0.35, 0.45):
            specs.append(MethodSpec(f"{mode}-{s:.0%}", "learned", "learned", f"{title} {s:.0%}", s, mode=mode))
    for s in (0.25, 0.35, 0.45):
        specs.append(MethodSpec(f"sparsegpt-unstructured-{s:.0%}", "oneshot", "sparsity-matched baselines",
                                f"SparseGPT unstructured {s:.0%}", s, pattern="unstructured"))
    for s in (0.25, 0.35, 0.45):
        specs.append(MethodSpec(f"sparsegpt-hybrid-{s:.0%}", "oneshot", "sparsity-matched baselines",
                                f"SparseGPT hybrid {s:.0%} (one-shot tiles, weight update)", s, pattern="hybrid"))
    specs.append(MethodSpec("sparsegpt-2:4-mlp", "oneshot", "sparsity-matched baselines",
                            "SparseGPT 2:4, MLP projections only", 0.5, layers="mlp"))
    for s in (0.25, 0.35, 0.45):
        specs.append(MethodSpec(f"blocks-edges-{s:.0%}", "blocks", "sparsity-matched baselines",
                                f"SparseGPT 2:4 on middle blocks (first/last dense) {s:.0%}", s, allocation="edges"))
        specs.append(MethodSpec(f"blocks-owl-{s:.0%}", "blocks", "sparsity-matched baselines",
                                f"SparseGPT 2:4 on OWL-chosen blocks {s:.0%}", s, allocation="owl"))
    for tile in tile_sizes:
        specs.append(MethodSpec(f"patch-joint-35%-tile{tile_label(tile)}", "learned", "tile size (PATCH-Joint 35%)",
                                f"PATCH-Joint 35%, tiles {tile_label(tile)}", 0.35, mode="patch-joint", tile=tile))
    for seed in (1, 2):
        specs.append(MethodSpec(f"patch-joint-35%-seed{seed}", "learned", "seeds (PATCH-Joint 35%)",
                                f"PATCH-Joint 35%, seed {seed}", 0.35, mode="patch-joint", seed=seed))
    return specs + lever_specs()


LEVER_LABELS = {"fixed": "least-squares weights", "repick": "SparseGPT re-pick", "distill": "distillation",
                "blockwise": "block-wise", "edges": "edge-block start", "block": "block reconstruction",
                "fitted": "learned on fitted 2:4 weights"}
# Rows that differ only in the reconstruction share one training run.
LEVERS = {"fixed": {"reconstruct": "fixed"}, "repick": {"reconstruct": "repick"},
          "distill": {"distill": LEVER_DISTILL}, "distill-fixed": {"distill": LEVER_DISTILL, "reconstruct": "fixed"},
          "blockwise": {"blockwise": LEVER_BLOCKWISE},
          "blockwise-fixed": {"blockwise": LEVER_BLOCKWISE, "reconstruct": "fixed"},
          "edges": {"allocation": "edges"}, "edges-fixed": {"allocation": "edges", "reconstruct": "fixed"},
          "block": {"reconstruct": "block"}, "edges-block": {"allocation": "edges", "reconstruct": "block"},
          "edges-fitted-block": {"allocation": "edges", "sparse_weights": "fitted", "reconstruct": "block"}}


def lever_specs() -> list[MethodSpec]:
    """PATCH-Tile with distillation and/or weight reconstruction at 25/35/45%, MaskLLM with them at 2:4
    (fixed-mask reconstruction: re-picking 2:4 groups on a pure 2:4 mask is one-shot SparseGPT)."""
    specs = []
    for s in (0.25, 0.35, 0.45):
        for lever, changes in LEVERS.items():
            label = " + ".join(LEVER_LABELS[part] for part in lever.split("-"))
            specs.append(MethodSpec(f"patch-tile-{s:.0%}-{lever}", "learned", "levers",
                                    f"PATCH-Tile {s:.0%} + {label}", s, mode="patch-tile", **changes))
    specs.append(MethodSpec("maskllm-2:4-distill", "learned", "levers", "MaskLLM 2:4 + distill", 0.5,
                            mode="maskllm", distill=LEVER_DISTILL))
    specs.append(MethodSpec("maskllm-2:4-fixed", "learned", "levers", "MaskLLM 2:4 + least-squares weights", 0.5,
                            mode="maskllm", reconstruct="fixed"))
    specs.append(MethodSpec("maskllm-2:4-block", "learned", "levers", "MaskLLM 2:4 + block reconstruction", 0.5,
                            mode="maskllm", reconstruct="block"))
    specs.append(MethodSpec("maskllm-2:4-joint-block", "learned", "levers",
                            "MaskLLM 2:4 learned block-wise with the weights + block reconstruction", 0.5,
                            mode="maskllm", blockwise=LEVER_BLOCKWISE, blockwise_weight_lr=LEVER_JOINT_LR,
                            reconstruct="block"))
    # the same reconstruction on the one-shot baselines, so that learning is judged against them too
    specs.append(MethodSpec("sparsegpt-2:4-block", "oneshot", "levers", "SparseGPT 2:4 + block reconstruction",
                            0.5, reconstruct="block"))
    for s in (0.25, 0.35, 0.45):
        specs.append(MethodSpec(f"maskllm-middle-{s:.0%}-joint-block", "learned", "levers",
                                f"MaskLLM 2:4 on middle blocks {s:.0%}, learned block-wise with the weights "
                                "+ block reconstruction", s, mode="maskllm", allocation="edges",
                                blockwise=LEVER_BLOCKWISE, blockwise_weight_lr=LEVER_JOINT_LR, reconstruct="block"))
        specs.append(MethodSpec(f"blocks-edges-{s:.0%}-block", "blocks", "levers",
                                f"SparseGPT 2:4 on middle blocks {s:.0%} + block reconstruction", s,
                                allocation="edges", reconstruct="block"))
    # the one-shot rows given the learned rows' time: twice the fit steps cost about the prior and 40 steps
    for s in (0.35, 0.45):
        specs.append(MethodSpec(f"blocks-edges-{s:.0%}-block128", "blocks", "levers",
                                f"SparseGPT 2:4 on middle blocks {s:.0%} + block reconstruction, 128 steps a block",
                                s, allocation="edges", reconstruct="block", block_steps=128))
    # and the learned masks given the same longer fit, so that the two are compared at equal fit too
    specs.append(MethodSpec("patch-tile-35%-edges-block128", "learned", "levers",
                            "PATCH-Tile 35% + edge-block start + block reconstruction, 128 steps a block", 0.35,
                            mode="patch-tile", allocation="edges", reconstruct="block", block_steps=128))
    return specs


# The rows of docs/RESULTS.md (`quality.py --set results`, run by benchmarks/results_run.sh): at each
# sparsity the learned pipelines beside the strongest one-shot baselines, with and without the same
# block reconstruction, in sections by sparsity (the sections are the table's only; the rows keep their
# specs, so that their results are shared with the full benchmark's).
RESULTS_SECTIONS = (
    ("reference", ("dense",)),
    ("35%", ("blocks-edges-35%", "blocks-edges-35%-block", "blocks-edges-35%-block128", "patch-tile-35%",
             "patch-tile-35%-edges-block", "patch-tile-35%-edges-block128", "sparsegpt-unstructured-35%")),
    ("45%", ("blocks-edges-45%", "blocks-edges-45%-block", "blocks-edges-45%-block128", "patch-tile-45%",
             "patch-tile-45%-edges-block", "sparsegpt-unstructured-45%")),
    ("25%", ("blocks-edges-25%", "blocks-edges-25%-block", "patch-tile-25%", "patch-tile-25%-edges-block",
             "sparsegpt-unstructured-25%")),
    ("2:4 (50%)", ("magnitude-2:4", "wanda-2:4", "sparsegpt-2:4", "sparsegpt-2:4-block", "maskllm-2:4",
                   "maskllm-2:4-block", "maskllm-2:4-joint-block")),
)
ROW_SETS = ("all", "results")


def row_set(specs: list[MethodSpec], name: str) -> tuple[list[MethodSpec], dict[str, str] | None]:
    """The specs of a named row set in table order, and each one's section (None: the specs' own groups)."""
    if name == "all":
        return specs, None
    if name != "results":
        raise PatchsparseError(f"unknown row set '{name}' (known: {', '.join(ROW_SETS)})")
    by_name = {s.name: s for s in specs}
    sections = {row: title for title, rows in RESULTS_SECTIONS for row in rows}
    missing = [row for row in sections if row not in by_name]
    if missing:
        raise PatchsparseError(f"row set '{name}' needs the full benchmark's rows (no '{missing[0]}' here)")
    return [by_name[row] for row in sections], sections


def tiny_specs() -> list[MethodSpec]:
    """The test-suite configuration: the dense reference and two learned methods."""
    return [MethodSpec("dense", "dense", "reference", "dense"),
            MethodSpec("maskllm-2:4", "learned", "learned", "MaskLLM 2:4", 0.5, mode="maskllm", tile=(16, 16)),
            MethodSpec("patch-joint-35%", "learned", "learned", "PATCH-Joint 35%", 0.35, mode="patch-joint",
                       tile=(16, 16))]


def tile_label(tile: tuple[int, int] | None) -> str:
    if tile is None:
        return "preset"
    return f"{tile[0]}xin" if tile[1] == FULL_WIDTH else f"{tile[0]}x{tile[1]}"


def select_specs(specs: list[MethodSpec], only: str | None) -> list[MethodSpec]:
    if not only:
        return specs
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {s.name for s in specs}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PatchsparseError(f"unknown method '{unknown[0]}' (known: {', '.join(sorted(known))})")
    return [s for s in specs if s.name in names]
