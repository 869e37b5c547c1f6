"""`patchsparse generate` on the default model: a saved 45% hybrid mask, greedy, hybrid vs masked dense."""

import json

import pytest

from patchsparse.cli.main import main
from patchsparse.io.maskfile import save_mask_spec
from patchsparse.kernels import synthetic_spec
from patchsparse.models import LayerSelection, load_model, select_linears

pytestmark = pytest.mark.e2e


def test_generate_on_the_default_model_matches_the_masked_dense_model(tmp_path, capsys):
    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    # the first 8 of 30 blocks keep the test short; every projection shape of the model is among them
    spec = synthetic_spec(select_linears(loaded.model, LayerSelection(include=(r"\.layers\.[0-7]\.",))), 0.45,
                          (128, 128))
    save_mask_spec(spec, tmp_path / "masks", identity=loaded.identity, base_model=loaded.model)
    del loaded
    record = tmp_path / "gen.json"
    assert main(["generate", "--masks", str(tmp_path / "masks"), "--device", "cpu", "--prompt",
                 "What is a sparse matrix?", "--max-new-tokens", "6", "--ignore-eos", "--compare-dense",
                 "--json", str(record)]) == 0
    out = capsys.readouterr().out
    assert "greedy output identical to the masked dense model's: yes" in out
    figures = json.loads(record.read_text())["figures"]
    assert abs(figures["sparsity"] - 0.45) < 0.01 and figures["hybrid"][0]["new_tokens"] == 6
    assert sum(figures["kernel_paths"].values()) == 8 * 7 and figures["decode_speedup"] > 0
