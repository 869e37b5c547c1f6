import json

import pytest

from patchsparse.cli.main import main


def test_eval_on_local_model_writes_record(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(tiny_text_file), "--seqlen", "32",
                 "--max-windows", "2", "--device", "cpu", "--json", str(out)])
    assert code == 0
    assert "perplexity" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["command"] == "eval" and record["figures"]["tokens_scored"] == 2 * 31
    assert record["package_version"]


def test_info_lists_linears(tiny_model_dir, capsys):
    assert main(["info", "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "decoder_linear" in out


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "./missing-dir/model"], "not a directory"),
    (["eval", "--data", "nonsense-set", "--seqlen", "32", "--model", "{tiny}"], "unknown dataset"),
    (["eval", "--seqlen", "100000", "--model", "{tiny}"], "exceeds the model's context"),
    (["eval", "--seqlen", "100", "--model", "{tiny}", "--data", "{text}"], None),
])
def test_bad_input_is_one_line(argv, message, tiny_model_dir, tiny_text_file, tmp_path, capsys):
    argv = [a.replace("{tiny}", str(tiny_model_dir)).replace("{text}", str(tiny_text_file)) for a in argv]
    code = main(argv + ["--device", "cpu"])
    err = capsys.readouterr().err.strip()
    if message is None:
        assert code == 0
        return
    assert code == 2
    assert err.startswith("patchsparse: error:") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_no_complete_window(tiny_model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a few words\n\nand more")
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(short), "--seqlen", "200", "--device", "cpu"])
    assert code == 2 and "complete window" in capsys.readouterr().err
