"""Local lm-evaluation-harness tasks built from a corpus's held-out texts (no network needed).

- `patchsparse_mc`: "which continuation is the real next sentence". For a held-out paragraph,
  the context is up to `MAX_CONTEXT_SENTENCES` consecutive sentences and the right answer is the
  sentence that really follows them; the distractors are sentences from *other* held-out
  paragraphs. Scored like PIQA/ARC (`multiple_choice`, metrics acc and acc_norm). Chance is
  1 / `n_choices`.
- `patchsparse_ppl`: `loglikelihood_rolling` over each held-out text (word/byte perplexity,
  bits per byte), the local counterpart of the harness's wikitext task.

Items depend only on the texts, the seed and the settings, so a run is reproducible. The task
files (JSONL data + YAML config) are written into a directory at run time; any harness run can
use them with `--include_path DIR`.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from patchsparse.errors import PatchsparseError

MC_TASK = "patchsparse_mc"
PPL_TASK = "patchsparse_ppl"
LOCAL_TASKS = (MC_TASK, PPL_TASK)

MAX_CONTEXT_SENTENCES = 3
MIN_SENTENCE_CHARS = 20   # drops headings ("4. Arts and Humanities") and fragments
MAX_SENTENCE_CHARS = 400  # keeps every request short enough for small context windows

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before
# whitespace and an upper-case letter, digit or opening quote. Abbreviations ("Dr. Smith") also
# split; that only makes some items easier or harder, never ill-formed.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\b[A-Z]\.)\s+(?=[A-Z0-9\"“‘(\[])|(?<=[.!?][\"”’)\]])\s+(?=[A-Z0-9\"“‘(\[])")


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph, whitespace-normalised."""
    text = " ".join(paragraph.split())
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _usable(sentence: str) -> bool:
    return MIN_SENTENCE_CHARS <= len(sentence) <= MAX_SENTENCE_CHARS


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]
    label: int       # index of the real next sentence in `choices`
    paragraph: int   # index of the source text (for inspection)

    def as_json(self) -> dict:
        return {"context": self.context, "choices": list(self.choices), "label": self.label,
                "paragraph": self.paragraph}


def build_mc_items(texts: Sequence[str], n_choices: int = 4, seed: int = 0,
                   max_items: int | None = None) -> list[MCItem]:
    """At most one item per text that has two or more usable consecutive sentences."""
    if n_choices < 2:
        raise PatchsparseError(f"a multiple-choice item needs at least 2 choices, got {n_choices}")
    sentences = [split_sentences(t) for t in texts]
    # One sorted pool for every item; an item rejects draws from its own text.
    pool_set = {s for own in sentences for s in own if _usable(s)}
    pool = sorted(pool_set)
    rng = random.Random(seed)
    items: list[MCItem] = []
    for index, own in enumerate(sentences):
        # Targets: a usable sentence with at least one usable sentence just before it.
        targets = [k for k in range(1, len(own)) if _usable(own[k]) and _usable(own[k - 1])]
        if not targets:
            continue
        k = targets[rng.randrange(len(targets))]
        first = k - 1
        while first > 0 and k - first < MAX_CONTEXT_SENTENCES and _usable(own[first - 1]):
            first -= 1
        context, answer = " ".join(own[first:k]), own[k]
        own_set = set(own)
        if len(pool) - len(own_set & pool_set) < n_choices - 1:
            raise PatchsparseError(
                f"too few distinct sentences in the other texts for {n_choices}-way items")
        choices: list[str] = []
        while len(choices) < n_choices - 1:
            candidate = pool[rng.randrange(len(pool))]
            if candidate not in own_set and candidate not in choices:
                choices.append(candidate)
        label = rng.randrange(n_choices)
        choices.insert(label, answer)
        items.append(MCItem(context, tuple(choices), label, index))
        if max_items is not None and len(items) >= max_items:
            break
    if not items:
        raise PatchsparseError("no text has two consecutive usable sentences to build a multiple-choice item from")
    return items


def mc_task_config(data_file: Path, cache_dir: Path) -> dict:
    """lm-eval task config: log-likelihood of each choice after the context."""
    return {
        "task": MC_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def ppl_task_config(data_file: Path, cache_dir: Path) -> dict:
    return {
        "task": PPL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                        {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                        {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
        "metadata": {"version": 1.0},
    }


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_local_tasks(directory: Path, texts: Sequence[str], seed: int = 0, n_choices: int = 4) -> dict[str, int]:
    """Write both local tasks (YAML + JSONL) into `directory`. -> {task name: number of documents}"""
    import yaml  # a dependency of lm-eval

    directory.mkdir(parents=True, exist_ok=True)
    cache = directory / "datasets-cache"  # keeps the datasets library's cache out of the user's home
    items = build_mc_items(texts, n_choices=n_choices, seed=seed)
    _write_jsonl(directory / f"{MC_TASK}.jsonl", [item.as_json() for item in items])
    docs = [{"text": t} for t in texts if t.strip()]
    _write_jsonl(directory / f"{PPL_TASK}.jsonl", docs)
    for name, config in ((MC_TASK, mc_task_config(directory / f"{MC_TASK}.jsonl", cache)),
                         (PPL_TASK, ppl_task_config(directory / f"{PPL_TASK}.jsonl", cache))):
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return {MC_TASK: len(items), PPL_TASK: len(docs)}
