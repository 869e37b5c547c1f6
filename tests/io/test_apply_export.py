import copy
import json

import pytest
import torch

from patchsparse.errors import PatchsparseError
from patchsparse.io.export import SIDECAR, export_checkpoint
from patchsparse.io.maskfile import (MASKS_JSON, MASKS_TENSORS, WEIGHTS_TENSORS, apply_mask_dir, load_mask_spec,
                                     save_mask_spec)
from patchsparse.models import load_model
from tests.io.masks_for_tests import hybrid_spec


def logits_of(model, vocab_size, seed=1):
    ids = torch.randint(0, vocab_size, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_updated_weights_are_restored_before_masking(tiny_model, tmp_path):
    spec = hybrid_spec(tiny_model)
    names = list(spec.layers)[:3]
    updated = {n: tiny_model.get_submodule(n).weight * 1.5 + 0.01 for n in names}
    save_mask_spec(spec, tmp_path / "m", base_model=tiny_model, updated_weights=updated)

    target = copy.deepcopy(tiny_model)
    apply_mask_dir(target, tmp_path / "m")
    for name, mask in spec.layers.items():
        source = updated[name] if name in updated else tiny_model.get_submodule(name).weight
        expected = source * mask.keep_mask()
        assert torch.equal(target.get_submodule(name).weight, expected)


def test_corrupt_updated_weights_leave_model_untouched(tiny_model, tmp_path):
    spec = hybrid_spec(tiny_model)
    name = next(iter(spec.layers))
    save_mask_spec(spec, tmp_path / "m", base_model=tiny_model,
                   updated_weights={name: tiny_model.get_submodule(name).weight * 2})
    data = (tmp_path / "m" / WEIGHTS_TENSORS).read_bytes()
    (tmp_path / "m" / WEIGHTS_TENSORS).write_bytes(data[:-8])
    target = copy.deepcopy(tiny_model)
    with pytest.raises(PatchsparseError, match="corrupt or truncated"):
        apply_mask_dir(target, tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), tiny_model.state_dict().values()))


def test_updated_weight_of_wrong_shape_is_refused(tiny_model, tmp_path):
    spec = hybrid_spec(tiny_model)
    name = next(iter(spec.layers))
    with pytest.raises(PatchsparseError, match="no masked layer"):
        save_mask_spec(spec, tmp_path / "m", updated_weights={name: torch.zeros(3, 4)})


def test_export_loads_with_plain_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(tiny_model_dir), device="cpu")
    spec = hybrid_spec(loaded.model)
    save_mask_spec(spec, tmp_path / "m", identity=loaded.identity, base_model=loaded.model)

    masked = copy.deepcopy(loaded.model)
    spec.apply_(masked)
    export_checkpoint(loaded, tmp_path / "m", tmp_path / "hf")

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    vocab = plain.config.vocab_size
    assert torch.equal(logits_of(plain, vocab), logits_of(masked, vocab))
    for name, mask in spec.layers.items():  # pruned weights are exact zeros in the checkpoint
        assert not plain.get_submodule(name).weight[~mask.keep_mask()].any()
    sidecar = tmp_path / "hf" / SIDECAR
    assert (sidecar / MASKS_TENSORS).read_bytes() == (tmp_path / "m" / MASKS_TENSORS).read_bytes()
    assert json.loads((sidecar / MASKS_JSON).read_text())["base_model"]["fingerprint"]
    # the sidecar is itself a mask directory that names the same masks
    assert load_mask_spec(sidecar).layers.keys() == spec.layers.keys()
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_export_refuses_existing_output_and_replaces_with_overwrite(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    save_mask_spec(hybrid_spec(loaded.model), tmp_path / "m", base_model=loaded.model)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("old")
    with pytest.raises(PatchsparseError, match="exists; pass --overwrite"):
        export_checkpoint(loaded, tmp_path / "m", tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "old"
    export_checkpoint(load_model(str(tiny_model_dir), device="cpu"), tmp_path / "m", tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "hf" / "keep.txt").exists() and (tmp_path / "hf" / "config.json").is_file()


def test_interrupted_export_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    save_mask_spec(hybrid_spec(loaded.model), tmp_path / "m", base_model=loaded.model)

    def crash(self, *args, **kwargs):  # the tokenizer is written after the weights
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(loaded.tokenizer), "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(loaded, tmp_path / "m", tmp_path / "out" / "hf")
    assert list((tmp_path / "out").iterdir()) == []


def test_exported_files_are_readable_by_others(tiny_model_dir, tmp_path):
    import stat

    from patchsparse.atomic import _UMASK

    if _UMASK & stat.S_IROTH:
        pytest.skip("this process's umask hides files from others anyway")
    loaded = load_model(str(tiny_model_dir), device="cpu")
    save_mask_spec(hybrid_spec(loaded.model), tmp_path / "m", base_model=loaded.model)
    export_checkpoint(loaded, tmp_path / "m", tmp_path / "hf")
    for path in [tmp_path / "hf", *(tmp_path / "hf").rglob("*")]:
        assert path.stat().st_mode & stat.S_IROTH, path
