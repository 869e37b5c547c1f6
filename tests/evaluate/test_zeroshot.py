import json

import pytest
import torch

from patchsparse.cli.evaluate import eval_windows
from patchsparse.cli.main import main
from patchsparse.evaluate import evaluate_perplexity
from patchsparse.io.maskfile import save_mask_spec
from patchsparse.models import load_model
from patchsparse.errors import PatchsparseError
from patchsparse.evaluate.local_tasks import MC_TASK, PPL_TASK, build_mc_items
from patchsparse.evaluate.zeroshot import PAPER_TASKS, parse_task_list, run_zeroshot

from tests.conftest import build_tiny_llama
from tests.io.masks_for_tests import hybrid_spec


def _harness_installed() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


# Only the tests that run the harness need it; the rest (task lists, masks, errors) always run.
needs_harness = pytest.mark.skipif(not _harness_installed(),
                                   reason="lm-evaluation-harness is not installed (the `eval` extra)")

WORDS = ["river", "stone", "cloud", "engine", "garden", "planet", "signal", "market", "forest", "bridge"]
# Short texts (well under the tiny model's 256-token context): three sentences each.
TEXTS = [f"The {w} was seen at dawn. Many people talked about the {w} all day. "
         f"By night the {w} was gone again." for w in WORDS]


def reference_accuracy(model, tokenizer, items) -> float:
    """acc computed without the harness: argmax of the summed log-probability of ' ' + choice."""
    correct = 0
    for item in items:
        context = tokenizer(item.context, add_special_tokens=False).input_ids
        scores = []
        for choice in item.choices:
            whole = tokenizer(item.context + " " + choice, add_special_tokens=False).input_ids
            continuation = whole[len(context):]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # (T-1, V)
            positions = range(len(whole) - len(continuation) - 1, len(whole) - 1)
            scores.append(sum(logprobs[p, whole[p + 1]].item() for p in positions))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item.label)
    return correct / len(items)


@needs_harness
def test_local_mc_task_through_harness_matches_reference(tiny_model, tiny_tokenizer):
    limit = 4
    result = run_zeroshot(tiny_model, tiny_tokenizer, [MC_TASK], TEXTS, limit=limit, batch_size=2)
    (score,) = result.scores
    assert score.task == MC_TASK and score.samples == limit
    assert 0.0 <= score.metrics["acc"] <= 1.0 and 0.0 <= score.metrics["acc_norm"] <= 1.0
    items = build_mc_items(TEXTS, seed=0)[:limit]
    assert score.metrics["acc"] == pytest.approx(reference_accuracy(tiny_model, tiny_tokenizer, items))
    assert result.average_acc == score.metrics["acc"]
    assert result.local_task_sizes == {MC_TASK: len(TEXTS)}


@needs_harness
def test_local_ppl_task_through_harness(tiny_model, tiny_tokenizer):
    result = run_zeroshot(tiny_model, tiny_tokenizer, [PPL_TASK], TEXTS, limit=2)
    (score,) = result.scores
    assert score.samples == 2 and "acc" not in score.metrics and result.average_acc is None
    # A random model over a 320-token vocabulary: far from perfect, far from absurd.
    assert 1.0 < score.metrics["byte_perplexity"] < 320.0
    assert score.metrics["bits_per_byte"] == pytest.approx(torch.log2(torch.tensor(score.metrics["byte_perplexity"])).item(),
                                                           rel=1e-6)


def test_parse_task_list():
    assert parse_task_list("piqa, arc_easy,piqa") == ["piqa", "arc_easy"]
    assert parse_task_list("paper") == list(PAPER_TASKS) and len(PAPER_TASKS) == 8
    assert parse_task_list("local") == [MC_TASK, PPL_TASK]
    with pytest.raises(PatchsparseError):
        parse_task_list(" , ")


@needs_harness  # the task names are checked against the harness's registry
def test_hub_tasks_offline_fail_with_one_line(monkeypatch, tiny_model_dir, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["eval", "--model", str(tiny_model_dir), "--device", "cpu", "--tasks", "piqa,patchsparse_mc"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("patchsparse: error:") and len(err.splitlines()) == 1
    assert "piqa" in err and "unreachable" in err


@needs_harness
def test_cli_eval_tasks_writes_record(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "texts.txt"
    # Paragraph i is held out when i % 10 == 9: 30 paragraphs give 3 held-out texts.
    texts = [t.replace(w, f"{w} {i}") for i in range(3) for w, t in zip(WORDS, TEXTS)]
    data.write_text("\n\n".join(texts))
    out = tmp_path / "zs.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--device", "cpu", "--data", str(data),
                 "--tasks", "patchsparse_mc", "--limit", "2", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "patchsparse_mc" in printed and "average acc over 1 task(s)" in printed
    figures = json.loads(out.read_text())["figures"]
    assert figures["tasks"][MC_TASK]["samples"] == 2
    assert 0.0 <= figures["average_acc"] <= 1.0 and figures["lm_eval_version"] == "0.4.13"


def test_cli_eval_applies_mask_directory(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    base = load_model(str(tiny_model_dir), device="cpu")
    spec = hybrid_spec(base.model)
    save_mask_spec(spec, tmp_path / "masks", base_model=base.model)
    _, windows = eval_windows(base, str(tiny_text_file), 32, 2)
    dense = evaluate_perplexity(base.model, windows).perplexity
    spec.apply_(base.model)
    masked = evaluate_perplexity(base.model, windows).perplexity
    assert masked != dense
    out = tmp_path / "r.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--device", "cpu", "--data", str(tiny_text_file),
                 "--seqlen", "32", "--max-windows", "2", "--masks", str(tmp_path / "masks"), "--json", str(out)])
    assert code == 0 and "applied masks" in capsys.readouterr().out
    figures = json.loads(out.read_text())["figures"]
    assert figures["perplexity"] == pytest.approx(masked, rel=1e-6)
    assert figures["masks"]["sparsity"] == pytest.approx(spec.sparsity())
    # Masks made for another model are refused with one line, before evaluation.
    other = tmp_path / "other"
    model2 = build_tiny_llama(base.model.config.vocab_size, seed=1)
    save_mask_spec(hybrid_spec(model2), other, base_model=model2)
    code = main(["eval", "--model", str(tiny_model_dir), "--device", "cpu", "--data", str(tiny_text_file),
                 "--seqlen", "32", "--masks", str(other)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "different weights" in err and len(err.splitlines()) == 1
