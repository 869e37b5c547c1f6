"""Zero-shot accuracy through lm-evaluation-harness on the in-memory (possibly masked) model.

The paper's protocol: `simple_evaluate` with the HF wrapper, 0-shot, metric `acc` (not
`acc_norm`) on MMLU, PIQA, ARC-Easy, ARC-Challenge, WinoGrande, OpenBookQA, RACE and HellaSwag,
averaged over tasks. Those tasks load their data from the Hugging Face hub; offline, the local
tasks of `patchsparse.evaluate.local_tasks` run through the very same harness code path.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from patchsparse.errors import PatchsparseError
from patchsparse.evaluate.local_tasks import LOCAL_TASKS, write_local_tasks

PAPER_TASKS = ("mmlu", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa", "race", "hellaswag")
TASK_ALIASES = {"paper": PAPER_TASKS, "local": LOCAL_TASKS}
REPORTED_METRICS = ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte")


@dataclass(frozen=True)
class TaskScore:
    task: str
    metrics: dict[str, float]  # metric name (filter suffix dropped) -> value
    samples: int | None        # documents scored (after --limit)


@dataclass(frozen=True)
class ZeroShotResult:
    scores: tuple[TaskScore, ...]
    num_fewshot: int
    limit: int | None
    lm_eval_version: str
    local_task_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def average_acc(self) -> float | None:
        """Mean of `acc` over the tasks that report it (the paper's average)."""
        accs = [s.metrics["acc"] for s in self.scores if "acc" in s.metrics]
        return sum(accs) / len(accs) if accs else None

    def as_dict(self) -> dict[str, Any]:
        return {"tasks": {s.task: {**s.metrics, "samples": s.samples} for s in self.scores},
                "average_acc": self.average_acc, "num_fewshot": self.num_fewshot, "limit": self.limit,
                "lm_eval_version": self.lm_eval_version, "local_task_sizes": self.local_task_sizes}


def parse_task_list(text: str) -> list[str]:
    """"piqa,arc_easy" -> names; `paper` and `local` expand; duplicates dropped, order kept."""
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        for expanded in TASK_ALIASES.get(name, (name,) if name else ()):
            if expanded not in names:
                names.append(expanded)
    if not names:
        raise PatchsparseError("--tasks needs at least one task name (e.g. patchsparse_mc, piqa, or 'paper')")
    return names


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PatchsparseError("zero-shot tasks need lm-evaluation-harness: pip install 'patchsparse[eval]'") from None
    return lm_eval, HFLM, TaskManager


def _metrics_of(entry: dict[str, Any]) -> dict[str, float]:
    """{"acc,none": 0.5, "acc_stderr,none": ...} -> {"acc": 0.5, "acc_stderr": ...} (default filter only)."""
    metrics: dict[str, float] = {}
    for key, value in entry.items():
        name, _, filt = key.partition(",")
        base = name.removesuffix("_stderr")
        if filt == "none" and base in REPORTED_METRICS and isinstance(value, (int, float)):
            metrics[name] = float(value)
    return metrics


def _samples_of(task: str, out: dict[str, Any]) -> int | None:
    """Documents scored for a task, summed over the leaves of a group such as mmlu."""
    n = out.get("n-samples", {})
    if task in n:
        return int(n[task]["effective"])
    children = out.get("group_subtasks", {}).get(task)
    if not children:
        return None
    counts = [_samples_of(child, out) for child in children]
    return sum(c for c in counts if c is not None)


def run_zeroshot(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], local_texts: Sequence[str],
                 limit: int | None = None, batch_size: int = 1, num_fewshot: int = 0,
                 seed: int = 0) -> ZeroShotResult:
    """Run harness tasks on `model`; local tasks are built from `local_texts` (held-out texts)."""
    from patchsparse.network import hub_reachable

    lm_eval, HFLM, TaskManager = _import_lm_eval()
    local = [t for t in tasks if t in LOCAL_TASKS]
    hub = [t for t in tasks if t not in LOCAL_TASKS]
    if hub and not hub_reachable():
        raise PatchsparseError(
            f"task(s) {', '.join(hub)} load their data from the Hugging Face hub, which is unreachable "
            f"(offline); the local tasks {', '.join(LOCAL_TASKS)} run offline")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings about passing a model object are noise
    with tempfile.TemporaryDirectory(prefix="patchsparse-tasks-") as tmp:
        sizes = write_local_tasks(Path(tmp), local_texts, seed=seed) if local else {}
        manager = TaskManager(include_path=tmp if local else None, include_defaults=bool(hub))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise PatchsparseError(f"unknown lm-eval task(s): {', '.join(unknown)}")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed)
        except (ConnectionError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PatchsparseError(f"lm-eval could not load a task's data: {first}") from exc
    results = out["results"]
    scores = tuple(TaskScore(t, _metrics_of(results.get(t, {})), _samples_of(t, out)) for t in tasks)
    return ZeroShotResult(scores=scores, num_fewshot=num_fewshot, limit=limit,
                          lm_eval_version=getattr(lm_eval, "__version__", "unknown"),
                          local_task_sizes={k: v for k, v in sizes.items() if k in local})
