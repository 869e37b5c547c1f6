"""`apply`, `export` and `report` from the command line, including their bad-input messages."""

import copy
import json

import pytest
import torch

from patchsparse.cli.main import main
from patchsparse.cli.evaluate import eval_windows
from patchsparse.evaluate import evaluate_perplexity
from patchsparse.io.maskfile import save_mask_spec
from patchsparse.models import load_model
from tests.conftest import build_tiny_llama
from tests.io.masks_for_tests import hybrid_spec


@pytest.fixture()
def mask_dir(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    spec = hybrid_spec(loaded.model, metadata={"mode": "patch-tile", "target_sparsity": 0.35})
    return save_mask_spec(spec, tmp_path / "masks", identity=loaded.identity, base_model=loaded.model), spec


@pytest.fixture()
def other_model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "other-llama"
    build_tiny_llama(len(tiny_tokenizer), seed=11).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("patchsparse: error:") and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_apply_reproduces_the_masked_model(mask_dir, tiny_model_dir, tiny_text_file, tmp_path, capsys):
    directory, spec = mask_dir
    record_path = tmp_path / "apply.json"
    code = main(["apply", "--model", str(tiny_model_dir), "--masks", str(directory), "--device", "cpu", "--eval",
                 "--data", str(tiny_text_file), "--seqlen", "32", "--max-windows", "3", "--json", str(record_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert f"sparsity {spec.sparsity():.2%} (target 35.00%)" in out and "perplexity" in out

    # the same model masked in memory scores exactly the same perplexity
    loaded = load_model(str(tiny_model_dir), device="cpu")
    masked = copy.deepcopy(loaded.model)
    spec.apply_(masked)
    _, windows = eval_windows(loaded, str(tiny_text_file), 32, 3)
    expected = evaluate_perplexity(masked, windows).perplexity
    dense = evaluate_perplexity(loaded.model, windows).perplexity
    record = json.loads(record_path.read_text())
    assert record["command"] == "apply"
    assert record["figures"]["perplexity"] == expected != dense
    assert record["figures"]["sparsity"] == pytest.approx(spec.sparsity())


def test_apply_to_another_model_is_refused(mask_dir, other_model_dir, capsys):
    code = main(["apply", "--model", str(other_model_dir), "--masks", str(mask_dir[0]), "--device", "cpu"])
    assert code == 2 and "different weights" in one_line_error(capsys)


def test_apply_missing_mask_dir(tiny_model_dir, tmp_path, capsys):
    code = main(["apply", "--model", str(tiny_model_dir), "--masks", str(tmp_path / "none"), "--device", "cpu"])
    assert code == 2 and "does not exist" in one_line_error(capsys)


def test_export_cli_then_plain_transformers(mask_dir, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    directory, spec = mask_dir
    out = tmp_path / "exported"
    argv = ["export", "--model", str(tiny_model_dir), "--masks", str(directory), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    assert "exported" in capsys.readouterr().out

    masked = copy.deepcopy(load_model(str(tiny_model_dir), device="cpu").model)
    spec.apply_(masked)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(40).view(2, 20) % plain.config.vocab_size
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, masked(ids).logits)

    assert main(argv) == 2  # exists now
    assert "pass --overwrite" in one_line_error(capsys)
    assert main(argv + ["--overwrite"]) == 0


def test_export_bf16(mask_dir, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    assert main(["export", "--model", str(tiny_model_dir), "--masks", str(mask_dir[0]), "--out", str(out),
                 "--device", "cpu", "--dtype", "bfloat16"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out)
    name, mask = next(iter(mask_dir[1].layers.items()))
    weight = plain.get_submodule(name).weight
    assert weight.dtype == torch.bfloat16 and not weight[~mask.keep_mask()].any()


def test_export_of_another_model_is_refused_and_writes_nothing(mask_dir, other_model_dir, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["export", "--model", str(other_model_dir), "--masks", str(mask_dir[0]), "--out", str(out),
                 "--device", "cpu"])
    assert code == 2 and "different weights" in one_line_error(capsys)
    assert not out.exists()


def test_report_cli(mask_dir, capsys):
    directory, _ = mask_dir
    assert main(["report", str(directory)]) == 0
    assert "report written" in capsys.readouterr().out
    assert (directory / "report.md").is_file() and (directory / "figures" / "tile_maps.png").is_file()


def test_report_without_masks(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "masks.json is missing" in one_line_error(capsys)
