import json

import pytest
import yaml

from patchsparse.errors import PatchsparseError
from patchsparse.evaluate.local_tasks import (MC_TASK, PPL_TASK, build_mc_items, split_sentences,
                                              write_local_tasks)

TEXTS = [
    "Alpha opens the first paragraph here. Alpha continues with a second sentence. Alpha closes with a third sentence.",
    "Beta begins another paragraph today. Beta then adds one more sentence.",
    "Gamma has only one sentence of text.",
    "4. Arts and Humanities",
    "Delta starts the fourth paragraph now. Delta goes on for a while longer. Delta ends it with a flourish!",
]


def test_split_sentences_hand_checked():
    text = 'It rains. "Quoted end." Then (a) more? Yes! J. R. Tolkien wrote it.  New\nline here.'
    assert split_sentences(text) == ["It rains.", '"Quoted end."', "Then (a) more?", "Yes!",
                                     "J. R. Tolkien wrote it.", "New line here."]


def _sentences_of(text):
    return split_sentences(text)


def test_mc_items_are_well_formed():
    items = build_mc_items(TEXTS, n_choices=3, seed=0)
    # Texts 2 (one sentence) and 3 (a heading) cannot give an item.
    assert [item.paragraph for item in items] == [0, 1, 4]
    for item in items:
        own = _sentences_of(TEXTS[item.paragraph])
        answer = item.choices[item.label]
        k = own.index(answer)
        assert k >= 1
        # The context is the run of sentences just before the answer, at most three.
        context_sentences = split_sentences(item.context)
        assert context_sentences == own[k - len(context_sentences):k] and 1 <= len(context_sentences) <= 3
        assert len(item.choices) == 3 and len(set(item.choices)) == 3
        for j, choice in enumerate(item.choices):
            if j != item.label:
                assert choice not in own  # distractors come from other texts
                assert any(choice in split_sentences(t) for i, t in enumerate(TEXTS) if i != item.paragraph)
    # Beta has two sentences, so its item is fixed by hand: context = first, answer = second.
    beta = items[1]
    assert beta.context == "Beta begins another paragraph today."
    assert beta.choices[beta.label] == "Beta then adds one more sentence."
    # Delta's answer is sentence 2 or 3; sentence 3 gets both earlier sentences as context.
    delta = items[2]
    if delta.choices[delta.label] == "Delta ends it with a flourish!":
        assert delta.context == "Delta starts the fourth paragraph now. Delta goes on for a while longer."
    else:
        assert delta.context == "Delta starts the fourth paragraph now."


def test_mc_items_are_deterministic_and_seeded():
    a = build_mc_items(TEXTS, n_choices=3, seed=0)
    assert a == build_mc_items(TEXTS, n_choices=3, seed=0)
    others = [build_mc_items(TEXTS, n_choices=3, seed=s) for s in range(1, 6)]
    assert any(o != a for o in others)
    assert build_mc_items(TEXTS, n_choices=3, seed=0, max_items=2) == a[:2]


def test_mc_items_bad_input():
    with pytest.raises(PatchsparseError, match="too few distinct"):
        build_mc_items(TEXTS[:2], n_choices=4)
    with pytest.raises(PatchsparseError, match="no text has two"):
        build_mc_items(["One sentence only here, nothing else."] * 3)
    with pytest.raises(PatchsparseError, match="at least 2 choices"):
        build_mc_items(TEXTS, n_choices=1)


def test_write_local_tasks(tmp_path):
    sizes = write_local_tasks(tmp_path, TEXTS, n_choices=3)
    assert sizes == {MC_TASK: 3, PPL_TASK: len(TEXTS)}
    rows = [json.loads(line) for line in (tmp_path / f"{MC_TASK}.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [i.label for i in build_mc_items(TEXTS, n_choices=3)]
    config = yaml.safe_load((tmp_path / f"{MC_TASK}.yaml").read_text())
    assert config["task"] == MC_TASK and config["output_type"] == "multiple_choice"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / f"{MC_TASK}.jsonl")
    ppl = yaml.safe_load((tmp_path / f"{PPL_TASK}.yaml").read_text())
    assert ppl["output_type"] == "loglikelihood_rolling"
