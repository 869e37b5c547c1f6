import gzip
import json

import pytest
import torch

from patchsparse.data.corpus import load_corpus
from patchsparse.data.stream import (BlockStream, document_tokens, iter_local_documents, iter_shard_documents,
                                     pack_blocks, resolve_shards, shuffle_buffer, stream_blocks)
from patchsparse.errors import PatchsparseError


def write_c4_shards(folder, shards=3, docs_per_shard=200):
    """Shards in the C4 format: gzip, one JSON object per line with 'text' (plus C4's other fields)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with gzip.open(folder / f"c4-train.{s:05d}-of-01024.json.gz", "wt", encoding="utf-8") as f:
            for d in range(docs_per_shard):
                row = {"text": f"shard {s} document {d} says sparse tiles are dense or two of four.",
                       "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{s}/{d}"}
                f.write(json.dumps(row) + "\n")
    return folder


def test_pack_blocks_hand_checked():
    blocks = list(pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]], seqlen=4))
    assert [b.tolist() for b in blocks] == [[1, 2, 3, 4], [5, 6, 7, 8]]  # tail [9, 10, 11] dropped
    assert all(b.dtype == torch.long for b in blocks)
    assert [b.tolist() for b in pack_blocks([list(range(9))], seqlen=3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_document_tokens_eos_separator(tiny_tokenizer):
    plain = list(document_tokens(tiny_tokenizer, ["sparse tiles", "dense tiles"]))
    with_eos = list(document_tokens(tiny_tokenizer, ["sparse tiles", "dense tiles"], eos_separator=True))
    eos = tiny_tokenizer.eos_token_id
    assert [p + [eos] for p in plain] == with_eos
    assert eos not in sum(plain, [])  # nothing inserted unless asked for


def test_shuffle_buffer_is_a_seeded_bounded_permutation():
    items = list(range(100))
    out = list(shuffle_buffer(iter(items), size=10, seed=3))
    assert sorted(out) == items and out != items
    assert out == list(shuffle_buffer(iter(items), size=10, seed=3))
    assert list(shuffle_buffer(iter(items), size=1, seed=3)) == items
    pulled = 0

    def source():
        nonlocal pulled
        for i in items:
            pulled += 1
            yield i

    for emitted, _ in enumerate(shuffle_buffer(source(), size=10, seed=0), 1):
        assert pulled - emitted <= 10  # never more than `size` items held
    with pytest.raises(PatchsparseError):
        list(shuffle_buffer(items, size=0, seed=0))


def test_unshuffled_stream_is_concatenate_and_cut(tmp_path, tiny_tokenizer):
    shards = write_c4_shards(tmp_path / "c4", shards=2, docs_per_shard=12)
    docs = list(iter_local_documents(resolve_shards(str(shards)), shuffle_shards=False))
    assert len(docs) == 2 * (12 - 1)  # record 9 of each shard is held out
    stream = BlockStream(lambda: iter_local_documents(resolve_shards(str(shards)), shuffle_shards=False),
                         tiny_tokenizer, seqlen=16, buffer_size=1)
    concatenated = sum((tiny_tokenizer(d).input_ids for d in docs), [])
    expected = torch.tensor(concatenated[: len(concatenated) // 16 * 16]).view(-1, 16)
    assert torch.equal(torch.stack(list(stream)), expected)
    batches = list(stream.batches(3))
    assert all(b.shape == (3, 16) for b in batches) and len(batches) == expected.shape[0] // 3
    assert torch.equal(batches[0], expected[:3])


def test_stream_holds_a_bounded_number_of_documents(tmp_path, tiny_tokenizer):
    shards = resolve_shards(str(write_c4_shards(tmp_path / "c4", shards=3, docs_per_shard=400)))
    pulled = 0

    def counting_documents():
        nonlocal pulled
        for text in iter_local_documents(shards, seed=1):
            pulled += 1
            yield text

    min_doc_tokens = min(len(tiny_tokenizer(d).input_ids) for d in iter_local_documents(shards))
    buffer, seqlen = 16, 32
    stream = BlockStream(counting_documents, tiny_tokenizer, seqlen=seqlen, seed=1, buffer_size=buffer)
    for emitted, block in enumerate(stream, 1):
        # Documents read so far: the buffer, the one being packed, and those whose tokens filled the blocks.
        assert pulled <= buffer + 1 + (emitted * seqlen) // min_doc_tokens + 1
        if emitted == 20:
            break
    assert pulled < 100 < 3 * 400  # a fraction of the data was read to produce 20 blocks


def test_reading_is_lazy(tmp_path):
    # A broken line deep in a shard is only reached when the stream gets there.
    path = tmp_path / "c4-train.00000-of-01024.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in range(5):
            f.write(json.dumps({"text": f"doc {d}"}) + "\n")
        f.write("{not json\n")
    docs = iter_shard_documents(path)
    assert [next(docs) for _ in range(5)] == [f"doc {d}" for d in range(5)]
    with pytest.raises(PatchsparseError, match=r"json.gz:6: expected a JSON object"):
        next(docs)


def test_held_out_records_match_the_eval_split(tmp_path):
    path = tmp_path / "data.jsonl"
    texts = [f"record number {i} of the file." for i in range(35)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    streamed = list(iter_local_documents([path]))
    held = load_corpus(str(path)).eval
    assert set(streamed).isdisjoint(held) and set(streamed) | set(held) == set(texts)


def test_txt_shards_and_globs(tmp_path, tiny_tokenizer):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("third paragraph\n\n\nfourth paragraph")
    (tmp_path / "notes.md").write_text("ignored in a directory")
    assert list(iter_shard_documents(tmp_path / "a.txt")) == ["first paragraph\nstill first", "second paragraph"]
    assert [p.name for p in resolve_shards(str(tmp_path))] == ["a.txt", "b.txt.gz"]
    assert [p.name for p in resolve_shards(str(tmp_path / "*.txt*"))] == ["a.txt", "b.txt.gz"]
    with pytest.raises(PatchsparseError, match="unsupported shard"):
        resolve_shards(str(tmp_path / "*.md"))
    with pytest.raises(PatchsparseError, match="not found"):
        stream_blocks(str(tmp_path / "missing-dir"), tiny_tokenizer, seqlen=8)
    with pytest.raises(PatchsparseError, match="no shard files"):
        (tmp_path / "empty").mkdir()
        resolve_shards(str(tmp_path / "empty"))


def test_stream_blocks_is_seeded_and_reiterable(tmp_path, tiny_tokenizer):
    folder = write_c4_shards(tmp_path / "c4", shards=3, docs_per_shard=30)
    a = stream_blocks(str(folder), tiny_tokenizer, seqlen=16, seed=0, buffer_size=8)
    first = torch.stack(list(a))
    assert torch.equal(first, torch.stack(list(a)))  # a second epoch replays the same order
    other = torch.stack(list(stream_blocks(str(folder), tiny_tokenizer, seqlen=16, seed=1, buffer_size=8)))
    assert first.shape == other.shape and not torch.equal(first, other)


def test_hub_stream_offline_is_one_clear_error(monkeypatch, tiny_tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PatchsparseError, match="unreachable"):
        next(iter(stream_blocks("c4", tiny_tokenizer, seqlen=8)))
