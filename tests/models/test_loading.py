import hashlib

import pytest
import torch

from patchsparse.errors import PatchsparseError
from patchsparse.models import load_model, select_linears
from patchsparse.models.builtin import BuiltinModel, cached_builtin_dir
from patchsparse.models.layers import LayerSelection, MLP_ONLY


def test_local_directory_loads_frozen(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.identity["source"] == "local directory"
    bf16 = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16


def test_bad_model_specs(tmp_path):
    with pytest.raises(PatchsparseError, match="not a directory"):
        load_model(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(PatchsparseError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="int3")


def test_unknown_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PatchsparseError, match="unreachable"):
        load_model("no-such-org/no-such-model")


def test_wrong_checksum_leaves_cache_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHSPARSE_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf")
    spec = BuiltinModel("fake", "none", "0", "fake.gguf", hashlib.sha256(b"other").hexdigest(), "fake-f32")
    with pytest.raises(PatchsparseError, match="checksum mismatch"):
        cached_builtin_dir(spec, gguf_path=fake)
    assert not (tmp_path / "cache" / "fake-f32").exists()


def test_select_linears_by_pattern(tiny_model):
    all_linears = select_linears(tiny_model)
    assert len(all_linears) == 2 * 7
    assert not any("lm_head" in n or "embed" in n for n in all_linears)
    mlp = select_linears(tiny_model, MLP_ONLY)
    assert set(mlp) == {n for n in all_linears if ".mlp." in n}
    no_down = select_linears(tiny_model, LayerSelection(exclude=(r"down_proj$",)))
    assert len(no_down) == 2 * 6
    with pytest.raises(PatchsparseError, match="no decoder linear"):
        select_linears(tiny_model, LayerSelection(include=(r"nothing",)))
