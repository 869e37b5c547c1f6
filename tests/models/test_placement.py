"""Big-model loading paths (device maps, CPU/disk offload), exercised on the tiny model."""

import pytest
import torch

from patchsparse.cli.main import main
from patchsparse.errors import PatchsparseError
from patchsparse.evaluate import evaluate_perplexity
from patchsparse.models import load_model
from patchsparse.models.loading import input_device, placement_kwargs


def _windows(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def test_device_map_cpu_bf16_matches_plain_load(tiny_model_dir):
    plain = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    mapped = load_model(str(tiny_model_dir), dtype="bfloat16", device_map="cpu")
    assert next(mapped.model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in mapped.model.parameters())
    windows = _windows(mapped.model.config.vocab_size)
    assert (evaluate_perplexity(mapped.model, windows).perplexity
            == evaluate_perplexity(plain.model, windows).perplexity)


def test_disk_offload_gives_the_same_logits(tiny_model_dir, tmp_path):
    plain = load_model(str(tiny_model_dir), device="cpu")
    # A CPU budget smaller than one layer pushes every weight to disk: only accelerate's hooks
    # bring each layer in for its forward.
    offloaded = load_model(str(tiny_model_dir), device_map="auto", offload_dir=tmp_path / "offload",
                           max_memory={"cpu": 10_000})
    assert set(offloaded.identity["placement"]) == {"disk"}
    assert next(offloaded.model.parameters()).device.type == "meta"
    assert input_device(offloaded.model) == torch.device("cpu")
    windows = _windows(plain.model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(offloaded.model(windows).logits, plain.model(windows).logits)
    assert (evaluate_perplexity(offloaded.model, windows).perplexity
            == evaluate_perplexity(plain.model, windows).perplexity)


def test_placement_arguments_are_checked(tmp_path):
    assert placement_kwargs(None, None) == {}
    assert placement_kwargs("auto", tmp_path / "o") == {"device_map": "auto", "offload_folder": str(tmp_path / "o")}
    with pytest.raises(PatchsparseError, match="needs a device map"):
        placement_kwargs(None, tmp_path)
    with pytest.raises(PatchsparseError, match="unknown device map"):
        placement_kwargs("everywhere", None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PatchsparseError, match="not a directory"):
        placement_kwargs("auto", tmp_path / "file")
    if not torch.cuda.is_available():
        with pytest.raises(PatchsparseError, match="CUDA is not available"):
            placement_kwargs("cuda:0", None)


def test_cli_eval_with_device_map(tiny_model_dir, tiny_text_file, capsys):
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(tiny_text_file), "--seqlen", "32",
                 "--max-windows", "2", "--device-map", "cpu", "--dtype", "bfloat16"])
    assert code == 0 and "perplexity" in capsys.readouterr().out
    code = main(["eval", "--model", str(tiny_model_dir), "--offload-dir", "x", "--device", "cpu"])
    assert code == 2 and "needs a device map" in capsys.readouterr().err
