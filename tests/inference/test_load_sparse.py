"""`load_sparse` from a mask directory, a SparseGPT directory with updated weights and an exported
checkpoint: hybrid layers that compute what the masked dense model computes."""

import copy
import shutil

import pytest
import torch
import torch.nn as nn

import patchsparse
from patchsparse.errors import PatchsparseError
from patchsparse.inference import (GenerationTiming, kernel_path, kernel_paths, load_masked, load_sparse,
                                   timed_generate)
from patchsparse.io.export import SIDECAR, export_checkpoint
from patchsparse.io.maskfile import save_mask_spec
from patchsparse.kernels import DenseLinear, HybridLinear
from patchsparse.models import load_model
from tests.io.masks_for_tests import hybrid_spec

IDS = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 12]])


def masked_reference(model_dir, spec, updated=None):
    """The dense model with `updated` weights put in and the masks applied, built by hand."""
    model = load_model(str(model_dir), device="cpu").model
    with torch.no_grad():
        for name, weight in (updated or {}).items():
            model.get_submodule(name).weight.copy_(weight)
        spec.apply_(model)
    return model


def greedy(model, ids=IDS, n=6):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0).tolist()


@pytest.fixture()
def base(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    return loaded, hybrid_spec(loaded.model, metadata={"target_sparsity": 0.35})


def assert_hybrid_matches(sparse, reference, spec):
    assert set(sparse.layers) == set(spec.layers)
    # packed, or kept dense where packing was measured slower (the tiny model's layers mostly are)
    assert all(isinstance(sparse.model.get_submodule(n), (HybridLinear, DenseLinear)) for n in spec.layers)
    with torch.no_grad():
        torch.testing.assert_close(sparse.model(IDS).logits, reference(IDS).logits, rtol=1e-4, atol=1e-4)
    assert greedy(sparse.model) == greedy(reference)


def test_from_a_mask_directory(base, tiny_model_dir, tmp_path):
    loaded, spec = base
    masks = save_mask_spec(spec, tmp_path / "m", identity=loaded.identity, base_model=loaded.model)
    sparse = patchsparse.load_sparse(str(tiny_model_dir), masks=masks, device="cpu")
    assert sparse.tokenizer is not None and not sparse.exported
    assert_hybrid_matches(sparse, masked_reference(tiny_model_dir, spec), spec)
    assert sum(kernel_paths(sparse.model).values()) == len(spec.layers)


def test_from_a_sparsegpt_directory_uses_the_updated_weights(base, tiny_model_dir, tmp_path):
    loaded, spec = base
    updated = {n: loaded.model.get_submodule(n).weight * 1.5 + 0.01 for n in list(spec.layers)[:4]}
    masks = save_mask_spec(spec, tmp_path / "m", base_model=loaded.model, updated_weights=updated)
    sparse = load_sparse(str(tiny_model_dir), masks=masks, device="cpu")
    assert_hybrid_matches(sparse, masked_reference(tiny_model_dir, spec, updated), spec)
    # without the update the same masks give other logits: the update was really applied
    with torch.no_grad():
        plain = masked_reference(tiny_model_dir, spec)(IDS).logits
        assert (sparse.model(IDS).logits - plain).abs().max() > 1e-2


def test_from_an_exported_checkpoint(base, tiny_model_dir, tmp_path):
    loaded, spec = base
    updated = {n: loaded.model.get_submodule(n).weight * 0.5 for n in list(spec.layers)[-3:]}
    masks = save_mask_spec(spec, tmp_path / "m", identity=loaded.identity, base_model=loaded.model,
                           updated_weights=updated)
    export_checkpoint(loaded, masks, tmp_path / "export")
    sparse = load_sparse(str(tmp_path / "export"), device="cpu")           # no masks argument: the sidecar
    assert sparse.exported and sparse.mask_dir == tmp_path / "export" / SIDECAR
    assert_hybrid_matches(sparse, masked_reference(tiny_model_dir, spec, updated), spec)
    # naming the sidecar itself is the same thing
    assert load_masked(str(tmp_path / "export"), masks=tmp_path / "export" / SIDECAR, device="cpu").exported


def test_in_bf16_and_on_a_module(base, tiny_model_dir, tmp_path):
    loaded, spec = base
    masks = save_mask_spec(spec, tmp_path / "m", base_model=loaded.model)
    sparse = load_sparse(str(tiny_model_dir), masks=masks, dtype="bfloat16", device="cpu")
    assert sparse.model.get_submodule(next(iter(spec.layers))).packed_dtype == torch.bfloat16
    module = copy.deepcopy(loaded.model)
    reference = masked_reference(tiny_model_dir, spec)
    on_module = load_sparse(module, masks=masks)
    assert on_module.model is module and on_module.tokenizer is None
    assert_hybrid_matches(on_module, reference, spec)


def test_bad_inputs_change_nothing(base, tiny_model_dir, tmp_path):
    loaded, spec = base
    masks = save_mask_spec(spec, tmp_path / "m", identity=loaded.identity, base_model=loaded.model)
    with pytest.raises(PatchsparseError, match="no masks"):
        load_sparse(str(tiny_model_dir), device="cpu")
    with pytest.raises(PatchsparseError, match="does not exist"):
        load_sparse(str(tiny_model_dir), masks=tmp_path / "missing", device="cpu")
    export_checkpoint(load_model(str(tiny_model_dir), device="cpu"), masks, tmp_path / "export")
    with pytest.raises(PatchsparseError, match="exported checkpoint with its own masks"):
        load_sparse(str(tmp_path / "export"), masks=masks, device="cpu")
    # a checkpoint whose weights were not masked by the sidecar it carries is refused
    forged = tmp_path / "forged"
    shutil.copytree(tiny_model_dir, forged)
    shutil.copytree(tmp_path / "export" / SIDECAR, forged / SIDECAR)
    with pytest.raises(PatchsparseError, match="non-zero weights where its masks prune"):
        load_sparse(str(forged), device="cpu")
    # masks made for another model are refused by the fingerprint, the module left as it was
    other = copy.deepcopy(loaded.model)
    with torch.no_grad():
        next(iter(other.parameters())).add_(0)                       # same weights: accepted
        other.get_submodule(next(iter(spec.layers))).weight.mul_(2)  # changed weights: refused
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PatchsparseError, match="fingerprint"):
        load_sparse(other, masks=masks)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_timed_generate_counts_every_new_token(tiny_model):
    out, timing = timed_generate(tiny_model, IDS, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                 pad_token_id=0)
    assert out.shape == (1, IDS.shape[1] + 5) and timing.new_tokens == 5 and timing.batch == 1
    assert timing.prefill_seconds > 0 and timing.decode_seconds > 0
    assert timing.decode_tokens_per_s == pytest.approx(4 / timing.decode_seconds)


def test_generation_timing_arithmetic():
    assert GenerationTiming(5, 2, 0.1, 2.0).decode_tokens_per_s == 4.0        # (5 - 1) * 2 / 2 s
    assert GenerationTiming(1, 1, 0.1, 0.0).decode_tokens_per_s is None


def test_kernel_path_is_the_code_each_layer_runs(tiny_model):
    from patchsparse.kernels import synthetic_layer_mask

    linear = nn.Linear(64, 32, bias=False)
    mask = synthetic_layer_mask(linear.weight, 0.35, (16, 16))
    assert kernel_path(HybridLinear.from_dense(linear, mask, backend="reference")) == "reference"
    split = HybridLinear.from_dense(linear, mask, backend="split")        # on CPU: no semi-structured GEMM
    assert kernel_path(split) == "split/emulated"
    model = nn.Sequential(split, HybridLinear.from_dense(nn.Linear(32, 64, bias=False),
                                                         synthetic_layer_mask(torch.randn(64, 32), 0.35, (16, 16)),
                                                         backend="reference"))
    assert kernel_paths(model) == {"split/emulated": 1, "reference": 1}
