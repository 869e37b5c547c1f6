"""Corpora with a deterministic train (calibration / mask learning) and evaluation split.

Spec forms accepted by `load_corpus`:
- `default`: the English text of `dataset-build==0.1.11` (machine-written encyclopedic prose);
- a local `.txt` (paragraphs separated by blank lines), `.jsonl` / `.json.gz` (one JSON object
  per line with a `text` field, the C4 format) or `.parquet` (a `text` column, the WikiText
  format on the hub) file;
- Hugging Face dataset names when online: `wikitext2` (`wikitext-2-raw-v1`), `c4`, `slimpajama`.

The default corpus and local files are split at paragraph granularity: within each document,
paragraph i goes to evaluation when i % 10 == 9, otherwise to training; a training paragraph that
is identical to a held-out one (repeated headings) is dropped, so the parts never share a text. Hub datasets use their own train and test/validation splits.

In a `.txt` file a line holding only whitespace separates paragraphs like an empty one, and
control characters other than tab and newline (a DOS end-of-file byte, form feeds) are dropped.
A file with fewer than ten paragraphs cannot hold out every tenth one: its last tenth of lines
(at least one line) becomes the evaluation split instead, and the note says so.
"""

from __future__ import annotations

import gzip
import importlib.metadata as md
import json
import re
from dataclasses import dataclass
from pathlib import Path

from patchsparse.errors import PatchsparseError
from patchsparse.utils import log

EVAL_EVERY = 10  # paragraph i of a document is held out for evaluation when i % EVAL_EVERY == EVAL_EVERY - 1
DEFAULT_CORPUS = "default"
_DEFAULT_DIST, _DEFAULT_VERSION = "dataset-build", "0.1.11"
_DEFAULT_FILES = ("eng", "history", "jobs", "philosophy", "religion", "weird")
_PREAMBLE = "Of course. Here is"

HUB_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext-2-raw-v1": ("wikitext", "wikitext-2-raw-v1"),
    "c4": ("allenai/c4", "en"),
    "slimpajama": ("DKYoon/SlimPajama-6B", None),
}


@dataclass(frozen=True)
class Corpus:
    name: str
    train: tuple[str, ...]  # texts (paragraphs or documents) for calibration and mask learning
    eval: tuple[str, ...]   # held-out texts for perplexity
    held_out: bool = True   # False when one text serves both roles
    note: str = ""          # how the split was made when it is not the usual one


# Control characters but tab and newline (CR is normalised first): a trailing DOS EOF byte (0x1a),
# form feeds, NULs and DEL carry no text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# A paragraph break: a newline, then one or more lines holding only whitespace.
_BLANK_LINES = re.compile(r"\n[^\S\n]*(?:\n[^\S\n]*)+\n|\n[^\S\n]*\n")


def clean_text(text: str) -> str:
    """Normalise line ends to \\n and drop control characters other than tab and newline."""
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs of a text: blocks separated by blank or whitespace-only lines, stripped, empties dropped."""
    return [p.strip() for p in _BLANK_LINES.split(clean_text(text)) if p.strip()]


def tail_split(texts: list[str], by_lines: bool) -> tuple[list[str], list[str]]:
    """Too few texts to hold out every tenth: the last tenth (at least one) of the lines of a .txt
    file, or of the records of another file, is held out; the rest trains. Empty when impossible."""
    if not by_lines:
        held = max(1, len(texts) // EVAL_EVERY)
        return (list(texts[:-held]), list(texts[-held:])) if len(texts) >= 2 else ([], [])
    lines = "\n\n".join(texts).split("\n")
    filled = [i for i, line in enumerate(lines) if line.strip()]
    if len(filled) < 2:
        return [], []
    cut = filled[-max(1, len(filled) // EVAL_EVERY)]
    return split_paragraphs("\n".join(lines[:cut])), split_paragraphs("\n".join(lines[cut:]))


def split_train_eval(documents: list[list[str]]) -> tuple[list[str], list[str]]:
    train, held = [], []
    for paragraphs in documents:
        for i, paragraph in enumerate(paragraphs):
            (held if i % EVAL_EVERY == EVAL_EVERY - 1 else train).append(paragraph)
    # Texts repeat (headings such as "## Buddhism"): a held-out text never also appears in training.
    held_set = set(held)
    return [p for p in train if p not in held_set], held


def clean_default_text(raw: str) -> str:
    """Normalise CRLF and drop the chat-model preamble lines ("Of course. Here is …")."""
    lines = raw.replace("\r\n", "\n").split("\n")
    return "\n".join(line for line in lines if not line.startswith(_PREAMBLE))


def default_corpus_files() -> list[Path]:
    try:
        dist = md.distribution(_DEFAULT_DIST)
    except md.PackageNotFoundError:
        raise PatchsparseError(
            f"the default corpus needs {_DEFAULT_DIST}=={_DEFAULT_VERSION}: "
            f"pip install --no-deps {_DEFAULT_DIST}=={_DEFAULT_VERSION}") from None
    files = [Path(str(dist.locate_file(f"dataset_build/data/eng/{name}.txt"))) for name in _DEFAULT_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise PatchsparseError(f"default corpus files missing from {_DEFAULT_DIST}: {missing[0]}")
    return files


def load_default_corpus() -> Corpus:
    documents = [split_paragraphs(clean_default_text(f.read_bytes().decode("utf-8")))
                 for f in default_corpus_files()]
    train, held = split_train_eval(documents)
    return Corpus(DEFAULT_CORPUS, tuple(train), tuple(held))


def _read_local_texts(path: Path) -> list[str]:
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() == ".txt":
        return split_paragraphs(path.read_text(encoding="utf-8-sig"))
    if path.suffix.lower() == ".jsonl" or suffixes in (".json.gz", ".jsonl.gz"):
        opener = gzip.open if path.suffix.lower() == ".gz" else open
        texts = []
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                    if not isinstance(text, str):
                        raise TypeError
                    texts.append(text)
                except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                    raise PatchsparseError(f"{path}:{line_no}: expected a JSON object with a 'text' field") from None
        return texts
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq  # available with `datasets`
        except ImportError:
            raise PatchsparseError(f"reading '{path.name}' needs pyarrow: pip install 'patchsparse[hub]' "
                                   f"(or pip install pyarrow)") from None
        try:
            column = pq.read_table(path, columns=["text"]).column("text").to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types for corrupt files and schemas
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PatchsparseError(f"cannot read parquet file '{path}' (needs a 'text' column): {first[:160]}") from None
        if not all(t is None or isinstance(t, str) for t in column):
            raise PatchsparseError(f"parquet file '{path}': the 'text' column does not hold strings")
        return [t for t in column if t]
    raise PatchsparseError(f"unsupported data file '{path.name}' (use .txt, .jsonl, .json.gz or .parquet)")


def _read_local_texts_checked(path: Path) -> list[str]:
    """`_read_local_texts` with every way a file can be unreadable as one clear error."""
    import zlib

    try:
        return _read_local_texts(path)
    except UnicodeDecodeError as exc:
        raise PatchsparseError(f"data file '{path}' is not UTF-8 text (byte {exc.start}: "
                               f"{exc.object[exc.start:exc.start + 1]!r})") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise PatchsparseError(f"data file '{path}' is not a valid gzip file (corrupt or truncated): {exc}") from None


def load_local_corpus(path: Path) -> Corpus:
    texts = _read_local_texts_checked(path)
    if not texts:
        raise PatchsparseError(f"data file '{path}' holds no text")
    # Paragraphs of a .txt file, records of a JSON/parquet file: every EVAL_EVERY-th is held out.
    train, held = split_train_eval([texts])
    note = ""
    unit = "paragraph" if path.suffix.lower() == ".txt" else "record"
    if not held:
        train, held = tail_split(texts, by_lines=unit == "paragraph")
        note = (f"{path.name} has {len(texts)} {unit}(s), fewer than {EVAL_EVERY}: its last tenth of "
                f"{'lines' if unit == 'paragraph' else 'records'} is held out for evaluation instead of every "
                f"{EVAL_EVERY}th {unit}")
    if not held:
        raise PatchsparseError(
            f"data file '{path}' has {len(texts)} {unit}(s) and cannot give both a training and an evaluation "
            f"split; give a file of at least two lines (every {EVAL_EVERY}th {unit} is held out, or the last "
            f"tenth when there are fewer than {EVAL_EVERY})")
    if note:
        log(f"note: {note}")
    return Corpus(str(path), tuple(train), tuple(held), note=note)


def hub_datasets(name: str, how: str = "comes from"):
    """The `datasets` package, once the hub is known to be reachable for dataset `name` (one line otherwise)."""
    from patchsparse.network import hub_reachable

    if not hub_reachable():
        raise PatchsparseError(f"dataset '{name}' {how} the Hugging Face hub, which is unreachable (offline)")
    try:
        import datasets
    except ImportError:
        raise PatchsparseError(f"dataset '{name}' needs the `datasets` package: pip install 'patchsparse[hub]'") from None
    return datasets


def load_hub_corpus(name: str, max_train_documents: int = 20000) -> Corpus:
    datasets = hub_datasets(name)
    repo, config = HUB_DATASETS[name]
    try:
        if repo == "allenai/c4":
            # The shards the SparseGPT/Wanda protocol uses: train shard 0 and validation shard 0.
            files = {"train": "en/c4-train.00000-of-01024.json.gz",
                     "validation": "en/c4-validation.00000-of-00008.json.gz"}
            ds = datasets.load_dataset(repo, data_files=files)
            train_split, eval_split = ds["train"], ds["validation"].select(range(1100))
        elif repo == "DKYoon/SlimPajama-6B":
            stream = datasets.load_dataset(repo, split="train", streaming=True)
            train = [row["text"] for _, row in zip(range(max_train_documents), stream)]
            held = datasets.load_dataset(repo, split="validation", streaming=True)
            evals = [row["text"] for _, row in zip(range(1100), held)]
            return Corpus(name, tuple(train), tuple(evals))
        else:
            ds = datasets.load_dataset(repo, config)
            train_split, eval_split = ds["train"], ds["test"]
    except Exception as exc:  # datasets raises many types for "offline" / "not found"
        raise PatchsparseError(f"cannot load dataset '{name}' from the Hugging Face hub (offline?): "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc
    # WikiText keeps its empty lines: the protocol joins the raw rows with "\n\n".
    return Corpus(name, tuple(train_split["text"]), tuple(eval_split["text"]))


def load_corpus(spec: str = DEFAULT_CORPUS) -> Corpus:
    if spec == DEFAULT_CORPUS:
        return load_default_corpus()
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            raise PatchsparseError(f"data path '{spec}' is a directory; give a .txt, .jsonl, .json.gz or .parquet file")
        return load_local_corpus(path)
    if spec in HUB_DATASETS:
        return load_hub_corpus(spec)
    if any(spec.endswith(s) for s in (".txt", ".jsonl", ".gz", ".parquet")) or "/" in spec:
        raise PatchsparseError(f"data file '{spec}' not found")
    known = ", ".join([DEFAULT_CORPUS, *HUB_DATASETS])
    raise PatchsparseError(f"unknown dataset '{spec}' (known: {known}; or a local .txt/.jsonl file)")
