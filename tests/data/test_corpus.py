import gzip
import json

import pytest
import torch

from patchsparse.data.corpus import (
    EVAL_EVERY, clean_default_text, load_corpus, split_paragraphs, split_train_eval)
from patchsparse.data.windows import random_windows, sequential_windows, shuffled_blocks
from patchsparse.errors import PatchsparseError


def test_clean_default_text_strips_preamble_and_crlf():
    raw = "Of course. Here is an article.\r\n\r\nFirst para.\r\nline two\r\n\r\nSecond."
    cleaned = clean_default_text(raw)
    assert "\r" not in cleaned and "Of course" not in cleaned
    assert split_paragraphs(cleaned) == ["First para.\nline two", "Second."]


def test_split_is_disjoint_and_deterministic():
    docs = [[f"d{d}p{i}" for i in range(25)] for d in range(3)]
    train, held = split_train_eval(docs)
    assert not set(train) & set(held)
    assert len(held) == 3 * (25 // EVAL_EVERY)
    assert "d0p9" in held and "d0p8" in train
    assert split_train_eval(docs) == (train, held)


def test_default_corpus_is_split_without_overlap():
    corpus = load_corpus("default")
    assert corpus.held_out
    assert len(corpus.eval) > 100 and len(corpus.train) > 1000
    assert not set(corpus.train) & set(corpus.eval)
    assert not any(p.startswith("Of course. Here is") for p in corpus.train + corpus.eval)


def test_local_jsonl_and_c4_style_gzip(tmp_path):
    rows = [{"text": f"document {i}"} for i in range(20)]
    plain = tmp_path / "docs.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in rows))
    packed = tmp_path / "c4-train.00000-of-01024.json.gz"
    with gzip.open(packed, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    a, b = load_corpus(str(plain)), load_corpus(str(packed))
    assert a.train == b.train and a.eval == b.eval
    assert a.eval == ("document 9", "document 19")


def test_bad_data_specs(tmp_path):
    with pytest.raises(PatchsparseError, match="unknown dataset"):
        load_corpus("no-such-dataset")
    with pytest.raises(PatchsparseError, match="not found"):
        load_corpus(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(PatchsparseError, match="bad.jsonl:1"):
        load_corpus(str(bad))


def test_windows():
    ids = torch.arange(10)
    assert sequential_windows(ids, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert sequential_windows(ids, 3, max_windows=1).shape == (1, 3)
    with pytest.raises(PatchsparseError, match="not one complete window"):
        sequential_windows(ids, 11)
    a = random_windows(torch.arange(100), 4, 8, seed=1)
    assert torch.equal(a, random_windows(torch.arange(100), 4, 8, seed=1))
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows
    blocks = shuffled_blocks(ids, 2, seed=0)
    assert sorted(blocks[:, 0].tolist()) == [0, 2, 4, 6, 8]


def test_hub_dataset_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PatchsparseError, match="unreachable"):
        load_corpus("wikitext2")


def test_whitespace_only_lines_separate_paragraphs_and_control_characters_go():
    text = "First stanza,\nline two.\n   \t\nSecond stanza.\r\n \r\n\r\nThird\x0c one.\n\x1a"
    assert split_paragraphs(text) == ["First stanza,\nline two.", "Second stanza.", "Third one."]


def test_txt_with_spaced_blank_lines_splits_into_all_its_paragraphs(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("\n  \n".join(f"stanza {i}\nof the poem" for i in range(30)) + "\n\x1a")
    corpus = load_corpus(str(path))
    assert len(corpus.train) == 27 and corpus.eval == ("stanza 9\nof the poem", "stanza 19\nof the poem",
                                                         "stanza 29\nof the poem")
    assert corpus.note == ""


def test_short_txt_falls_back_to_a_stated_tail_split(tmp_path, capsys):
    path = tmp_path / "short.txt"
    lines = [f"line {i}" for i in range(20)]
    path.write_text("\n".join(lines[:12]) + "\n\n" + "\n".join(lines[12:]) + "\n")
    corpus = load_corpus(str(path))
    # 20 lines, the last tenth (2 lines) held out; the first paragraph stays whole in training
    assert corpus.eval == ("line 18\nline 19",)
    assert corpus.train == ("\n".join(lines[:12]), "\n".join(lines[12:18]))
    assert "last tenth of lines" in corpus.note and "last tenth of lines" in capsys.readouterr().err


def test_file_that_cannot_give_two_splits_is_refused_with_advice(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a single line of text\n \n\x1a")
    with pytest.raises(PatchsparseError, match="cannot give both a training and an evaluation split"):
        load_corpus(str(path))
    rows = tmp_path / "few.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(3)))
    corpus = load_corpus(str(rows))
    assert corpus.train == ("doc 0", "doc 1") and corpus.eval == ("doc 2",) and "records" in corpus.note
