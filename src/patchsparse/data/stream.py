"""Streaming training data: documents read lazily, tokenized one at a time, packed into blocks.

Packing follows PATCH (docs/METHOD.md §9): tokenize each document with the model's tokenizer (only
the special tokens the tokenizer itself adds, e.g. BOS), concatenate, and cut consecutive blocks
of `seqlen` tokens; the last incomplete block is dropped. An EOS separator after each document is
optional (`eos_separator=True`). PATCH shuffles the packed blocks with a random sampler over the
whole set; a stream cannot hold the whole set, so documents pass through a seeded shuffle buffer
of bounded size instead (and local shards are visited in a seeded order).

Memory is bounded whatever the data size: at most `buffer_size` documents wait in the shuffle
buffer, one more is being tokenized, and fewer than `seqlen` + one document's tokens wait in the
packer.

Sources (`open_documents`):
- local shards: a directory, a glob (`data/c4-train.*.json.gz`) or one file; `.jsonl`, `.json`
  (JSON lines), `.jsonl.gz` / `.json.gz` (the C4 shard format, one `{"text": …}` per line) and
  `.txt` / `.txt.gz` (paragraphs separated by blank lines);
- Hugging Face datasets by name, streamed: `c4` (allenai/c4 en), `slimpajama` (DKYoon/SlimPajama-6B).
"""

from __future__ import annotations

import glob
import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from patchsparse.data.corpus import EVAL_EVERY, hub_datasets
from patchsparse.errors import PatchsparseError

SHARD_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".txt", ".txt.gz")
HUB_STREAMS = {
    "c4": ("allenai/c4", "en"),
    "slimpajama": ("DKYoon/SlimPajama-6B", None),
}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(SHARD_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def resolve_shards(spec: str) -> list[Path]:
    """A directory (its shard files), a glob pattern, or one file -> sorted shard paths."""
    path = Path(spec).expanduser()
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.is_file() and _suffix(p))
        where = f"directory '{spec}'"
    elif any(ch in spec for ch in "*?["):
        shards = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        where = f"pattern '{spec}'"
    elif path.is_file():
        shards, where = [path], f"'{spec}'"
    else:
        raise PatchsparseError(f"training data '{spec}' not found (a directory, a glob or a file of shards)")
    unsupported = [p.name for p in shards if not _suffix(p)]
    if unsupported:
        raise PatchsparseError(f"unsupported shard '{unsupported[0]}' (use {', '.join(SHARD_SUFFIXES)})")
    if not shards:
        raise PatchsparseError(f"{where} holds no shard files ({', '.join(SHARD_SUFFIXES)})")
    return shards


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.lower().endswith(".gz") else open(path, encoding="utf-8")


def iter_shard_documents(path: Path) -> Iterator[str]:
    """Documents of one shard, read line by line (never the whole file)."""
    if _suffix(path).startswith(".txt"):
        with _open_text(path) as f:
            paragraph: list[str] = []
            for line in f:
                if line.strip():
                    paragraph.append(line.rstrip("\r\n"))
                elif paragraph:
                    yield "\n".join(paragraph).strip()
                    paragraph = []
            if paragraph:
                yield "\n".join(paragraph).strip()
        return
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PatchsparseError(f"{path.name}:{line_no}: expected a JSON object with a 'text' field") from None
            if text:
                yield text


def iter_local_documents(shards: Sequence[Path], seed: int = 0, shuffle_shards: bool = True,
                         skip_held_out: bool = True) -> Iterator[str]:
    """Documents of all shards, shards in a seeded order.

    `skip_held_out` drops record i of each shard when i % EVAL_EVERY == EVAL_EVERY - 1: exactly
    the texts `load_corpus(shard).eval` evaluates on, so training never sees them.
    """
    order = list(shards)
    if shuffle_shards:
        random.Random(seed).shuffle(order)
    for shard in order:
        for index, text in enumerate(iter_shard_documents(shard)):
            if skip_held_out and index % EVAL_EVERY == EVAL_EVERY - 1:
                continue
            yield text


def iter_hub_documents(name: str, split: str = "train") -> Iterator[str]:
    """A hub dataset streamed (nothing downloaded ahead): one document at a time."""
    datasets = hub_datasets(name, "streams from")
    repo, config = HUB_STREAMS[name]
    try:
        stream = datasets.load_dataset(repo, config, split=split, streaming=True)
    except Exception as exc:  # datasets raises many types for "offline" / "not found"
        raise PatchsparseError(f"cannot stream dataset '{name}': {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc
    for row in stream:
        if row.get("text"):
            yield row["text"]


def open_documents(spec: str, seed: int = 0, skip_held_out: bool = True) -> Iterator[str]:
    """Documents from a hub name (`c4`, `slimpajama`) or local shards (dir, glob, file)."""
    if spec in HUB_STREAMS and not Path(spec).exists():
        return iter_hub_documents(spec)
    return iter_local_documents(resolve_shards(spec), seed=seed, skip_held_out=skip_held_out)


def shuffle_buffer(items: Iterable[Any], size: int, seed: int) -> Iterator[Any]:
    """Seeded streaming shuffle holding at most `size` items (size 1 keeps the order).

    Fill a buffer; then for every new item emit a random buffered one and put the new one in
    its place; at the end emit the rest in random order.
    """
    if size < 1:
        raise PatchsparseError(f"the shuffle buffer needs at least 1 slot, got {size}")
    rng = random.Random(seed)
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def pack_blocks(token_lists: Iterable[Sequence[int]], seqlen: int) -> Iterator[torch.Tensor]:
    """Concatenate token lists and cut consecutive blocks of `seqlen`; the tail is dropped. -> (seqlen,)"""
    if seqlen < 2:
        raise PatchsparseError(f"seqlen must be at least 2, got {seqlen}")
    pending: list[int] = []
    for tokens in token_lists:
        pending.extend(tokens)
        start = 0
        while len(pending) - start >= seqlen:
            yield torch.tensor(pending[start: start + seqlen], dtype=torch.long)
            start += seqlen
        del pending[:start]


def document_tokens(tokenizer: Any, documents: Iterable[str], eos_separator: bool = False) -> Iterator[list[int]]:
    """Tokenize one document at a time, with the tokenizer's own special tokens (e.g. BOS)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos_separator and eos is None:
        raise PatchsparseError("eos_separator needs a tokenizer with an EOS token")
    for text in documents:
        ids = list(tokenizer(text, add_special_tokens=True).input_ids)
        if eos_separator and (not ids or ids[-1] != eos):
            ids.append(eos)
        yield ids


@dataclass(frozen=True)
class BlockStream:
    """Iterable of packed training blocks (seqlen,) from a document source; re-iterable.

    `documents` is a zero-argument callable returning a fresh document iterator, so each
    iteration (epoch) restarts the source from the beginning with the same seed.
    """

    documents: Callable[[], Iterable[str]]
    tokenizer: Any
    seqlen: int
    seed: int = 0
    buffer_size: int = 1024
    eos_separator: bool = False

    def __iter__(self) -> Iterator[torch.Tensor]:
        shuffled = shuffle_buffer(self.documents(), self.buffer_size, self.seed)
        return pack_blocks(document_tokens(self.tokenizer, shuffled, self.eos_separator), self.seqlen)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive blocks stacked into batches (batch_size, seqlen); a last short batch is dropped."""
        batch: list[torch.Tensor] = []
        for block in self:
            batch.append(block)
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []


def stream_blocks(spec: str, tokenizer: Any, seqlen: int, seed: int = 0, buffer_size: int = 1024,
                  eos_separator: bool = False, skip_held_out: bool = True) -> BlockStream:
    """Packed training blocks streamed from a hub dataset name or local shards."""
    if spec not in HUB_STREAMS or Path(spec).exists():
        resolve_shards(spec)  # fail now, not at the first step, when the data is missing
    return BlockStream(lambda: open_documents(spec, seed=seed, skip_held_out=skip_held_out),
                       tokenizer, seqlen, seed=seed, buffer_size=buffer_size, eos_separator=eos_separator)
