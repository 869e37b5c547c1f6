"""`patchsparse generate`: text and speed from a mask directory or an exported checkpoint, and its errors."""

import io
import json

import pytest

from patchsparse.cli.main import main
from patchsparse.io.export import export_checkpoint
from patchsparse.io.maskfile import save_mask_spec
from patchsparse.models import load_model
from tests.io.masks_for_tests import hybrid_spec


@pytest.fixture()
def mask_dir(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    spec = hybrid_spec(loaded.model, metadata={"target_sparsity": 0.35})
    updated = {n: loaded.model.get_submodule(n).weight * 1.25 for n in list(spec.layers)[:2]}
    return save_mask_spec(spec, tmp_path / "masks", identity=loaded.identity, base_model=loaded.model,
                          updated_weights=updated)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("patchsparse: error:") and "Traceback" not in err
    return err


def test_compare_dense_from_a_mask_directory(tiny_model_dir, mask_dir, tmp_path, capsys):
    record = tmp_path / "gen.json"
    assert main(["generate", "--model", str(tiny_model_dir), "--masks", str(mask_dir), "--device", "cpu",
                 "--prompt", "Sparse models keep", "--max-new-tokens", "6", "--ignore-eos", "--compare-dense",
                 "--rounds", "2", "--json", str(record)]) == 0
    out = capsys.readouterr().out
    assert "hybrid (median of 2): 6 new tokens" in out and "dense  (median of 2): 6 new tokens" in out
    assert "greedy output identical to the masked dense model's: yes" in out
    figures = json.loads(record.read_text())["figures"]
    assert figures["identical_to_masked_dense"] is True and len(figures["hybrid"]) == 2
    assert figures["decode_speedup"] > 0 and sum(figures["kernel_paths"].values()) == 14


def test_exported_checkpoint_prompt_from_stdin_and_file(tiny_model_dir, mask_dir, tmp_path, capsys, monkeypatch):
    export_checkpoint(load_model(str(tiny_model_dir), device="cpu"), mask_dir, tmp_path / "export")
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Tiles of a matrix")
    outputs = []
    for source in (["--prompt-file", str(prompt_file)], []):
        monkeypatch.setattr("sys.stdin", io.StringIO("Tiles of a matrix"))
        assert main(["generate", "--model", str(tmp_path / "export"), "--device", "cpu", "--max-new-tokens", "5",
                     "--ignore-eos", *source]) == 0
        outputs.append(capsys.readouterr().out)
    assert all("hybrid: 5 new tokens" in out for out in outputs)
    # greedy text is the same whichever way the prompt arrived
    assert outputs[0].split("\n\nhybrid:")[0] == outputs[1].split("\n\nhybrid:")[0]


def test_sampling_is_seeded_and_not_compared(tiny_model_dir, mask_dir, capsys):
    args = ["generate", "--model", str(tiny_model_dir), "--masks", str(mask_dir), "--device", "cpu", "--prompt",
            "A two out of four", "--max-new-tokens", "8", "--ignore-eos", "--sample", "--top-k", "50", "--seed", "3"]
    texts = []
    for extra in ([], ["--compare-dense"]):
        assert main(args + extra) == 0
        out = capsys.readouterr().out
        texts.append(out.split("\n\nhybrid")[0])
    assert texts[0] == texts[1]
    assert "outputs not compared: sampling" in out


@pytest.mark.parametrize("extra,message", [
    (["--masks", "MISSING"], "does not exist"),
    (["--chat-template", "on"], "has no chat template"),
    (["--sample", "--temperature", "0"], "--temperature must be positive"),
    (["--top-p", "1.5"], "--top-p must lie in"),
    (["--prompt", "   "], "the prompt is empty"),
    (["--prompt-file", "MISSING"], "prompt file MISSING does not exist"),
    (["--prompt-file", "-", "--prompt", "x"], "not both"),
    (["--backend", "stripe"], "stripe backend needs"),
])
def test_bad_inputs_give_one_line(tiny_model_dir, mask_dir, extra, message, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    args = ["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "2"]
    if "--masks" not in extra:
        args += ["--masks", str(mask_dir)]
    if not any(e.startswith("--prompt") for e in extra):
        args += ["--prompt", "hello"]
    assert main(args + extra) == 2
    assert message in one_line_error(capsys)


def test_no_masks_and_no_prompt(tiny_model_dir, mask_dir, capsys, monkeypatch):
    assert main(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--prompt", "hi"]) == 2
    assert "no masks" in one_line_error(capsys)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal())
    assert main(["generate", "--model", str(tiny_model_dir), "--masks", str(mask_dir), "--device", "cpu"]) == 2
    assert "no prompt" in one_line_error(capsys)
