"""End-to-end on the embedded default model (slower; still runs in CI)."""

import json

import pytest

from patchsparse.cli.main import main

pytestmark = pytest.mark.e2e


def test_dense_default_model_perplexity(tmp_path, capsys):
    out = tmp_path / "dense.json"
    assert main(["eval", "--max-windows", "2", "--seqlen", "256", "--device", "cpu", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["figures"]
    assert figures["tokens_scored"] == 2 * 255
    # SmolLM2-135M on its in-domain held-out prose: far better than chance (vocab 49152)
    assert 3.0 < figures["perplexity"] < 40.0


def test_default_model_local_multiple_choice_task(tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "mc.json"
    assert main(["eval", "--tasks", "patchsparse_mc", "--limit", "8", "--device", "cpu", "--batch-size", "4",
                 "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["figures"]
    task = figures["tasks"]["patchsparse_mc"]
    assert task["samples"] == 8 and figures["local_task_sizes"]["patchsparse_mc"] == 115
    # The dense model finds the real next sentence far more often than chance (1 in 4).
    assert task["acc"] >= 0.5
