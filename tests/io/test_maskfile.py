import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from patchsparse.errors import PatchsparseError
from patchsparse.io.maskfile import (MASKS_JSON, MASKS_TENSORS, WEIGHTS_TENSORS, apply_mask_dir, load_mask_spec, save_mask_spec,
                                     weights_fingerprint)
from patchsparse.masks import HybridMaskSpec, LayerMask, nm_mask_from_scores
from patchsparse.masks.bits import pack_bits, unpack_bits
from patchsparse.models import select_linears
from tests.conftest import build_tiny_llama
from tests.io.masks_for_tests import hybrid_spec


def assert_same_spec(a: HybridMaskSpec, b: HybridMaskSpec) -> None:
    assert list(a.layers) == list(b.layers)
    for name in a.layers:
        x, y = a.layers[name], b.layers[name]
        assert x.pattern == y.pattern and x.tile == y.tile
        assert torch.equal(x.sparse_keep, y.sparse_keep)
        assert (x.dense_tiles is None) == (y.dense_tiles is None)
        if x.dense_tiles is not None:
            assert torch.equal(x.dense_tiles, y.dense_tiles)
    assert a.metadata == b.metadata


def test_pack_bits_hand_computed():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    packed = pack_bits(bits)
    # first value is the most significant bit; the last byte is zero-padded
    assert packed.tolist() == [0b10000001, 0b11000000]
    assert torch.equal(unpack_bits(packed, (11,)), bits)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 17), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(rows, cols, seed):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-rows * cols // 8)
    assert torch.equal(unpack_bits(packed, (rows, cols)), mask)


def test_unpack_refuses_wrong_length():
    with pytest.raises(PatchsparseError, match="does not fit"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), (4, 8))


def test_round_trip_is_identical(tiny_model, tmp_path):
    meta = {"mode": "patch-tile", "target_sparsity": 0.35, "policy": "exact", "steps": [1, 2], "note": None}
    spec = hybrid_spec(tiny_model, metadata=meta)
    out = save_mask_spec(spec, tmp_path / "m", identity={"name": "tiny", "revision": "abc"},
                         extra={"lr": 0.01, "steps": 10}, base_model=tiny_model)
    loaded = load_mask_spec(out, tiny_model)
    assert_same_spec(spec, loaded)
    assert loaded.sparsity() == pytest.approx(spec.sparsity())

    doc = json.loads((out / MASKS_JSON).read_text())
    assert doc["schema_version"] == 1 and doc["package_version"]
    assert doc["base_model"]["name"] == "tiny" and doc["base_model"]["revision"] == "abc"
    assert doc["base_model"]["fingerprint"] == weights_fingerprint(tiny_model, spec.layers)
    assert doc["mode"] == "patch-tile" and doc["target_sparsity"] == 0.35 and doc["tile"] == [24, 20]
    assert doc["pattern"] == "2:4" and doc["training"] == {"lr": 0.01, "steps": 10}
    assert doc["achieved_sparsity"] == pytest.approx(spec.sparsity())
    assert doc["per_projection_sparsity"] == pytest.approx(spec.per_projection_sparsity())
    assert doc["per_block_sparsity"] == pytest.approx({str(b): v for b, v in spec.per_block_sparsity().items()})
    name = "model.layers.1.mlp.down_proj"
    assert doc["layers"][name]["shape"] == [64, 128] and doc["layers"][name]["grid"] == [3, 7]
    assert doc["layers"][name]["sparsity"] == pytest.approx(spec.layers[name].sparsity())


def test_file_is_about_one_32nd_of_fp32(tiny_model, tmp_path):
    spec = hybrid_spec(tiny_model)
    out = save_mask_spec(spec, tmp_path / "m")  # no weight sample: masks only
    raw = (out / MASKS_TENSORS).read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")  # safetensors: u64 length, JSON header, data
    keep_bytes = sum(-(-m.numel() // 8) for m in spec.layers.values())
    tile_bytes = sum(-(-m.dense_tiles.numel() // 8) for m in spec.layers.values())
    assert len(raw) - header == keep_bytes + tile_bytes  # 8 masks per byte, nothing else
    masked_fp32_bytes = 4 * sum(m.numel() for m in spec.layers.values())
    assert keep_bytes == masked_fp32_bytes / 32


def test_masks_without_tiles_round_trip(tiny_model, tmp_path):
    layers = {name: LayerMask(sparse_keep=nm_mask_from_scores(lin.weight.abs()), pattern="2:4")
              for name, lin in select_linears(tiny_model).items()}
    spec = HybridMaskSpec(layers=layers, metadata={"method": "magnitude"})
    loaded = load_mask_spec(save_mask_spec(spec, tmp_path / "m", base_model=tiny_model), tiny_model)
    assert_same_spec(spec, loaded)
    assert json.loads((tmp_path / "m" / MASKS_JSON).read_text())["tile"] is None


def test_apply_after_load_gives_bit_identical_logits(tiny_model, tmp_path):
    spec = hybrid_spec(tiny_model)
    fingerprint = weights_fingerprint(tiny_model, spec.layers)
    pruned = copy.deepcopy(tiny_model)
    spec.apply_(pruned)
    save_mask_spec(spec, tmp_path / "m", weights_fingerprint=fingerprint)

    fresh = copy.deepcopy(tiny_model)
    load_mask_spec(tmp_path / "m", fresh).apply_(fresh)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = pruned(ids).logits, fresh(ids).logits
    assert torch.equal(expected, actual)
    assert not torch.equal(expected, tiny_model(ids).logits)  # the masks did change the model


def test_fingerprint_differs_between_models_of_same_shape(tiny_tokenizer):
    a = build_tiny_llama(len(tiny_tokenizer), seed=0)
    b = build_tiny_llama(len(tiny_tokenizer), seed=1)
    names = list(select_linears(a))
    assert weights_fingerprint(a, names) == weights_fingerprint(copy.deepcopy(a), names)
    assert weights_fingerprint(a, names) != weights_fingerprint(b, names)
    # one changed weight among the sampled ones changes it too
    c = copy.deepcopy(a)
    with torch.no_grad():
        c.get_submodule(names[3]).weight[0, 0] += 1e-3
    assert weights_fingerprint(c, names) != weights_fingerprint(a, names)


def test_wrong_model_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    spec = hybrid_spec(tiny_model)
    save_mask_spec(spec, tmp_path / "m", identity={"name": "tiny-a"}, base_model=tiny_model)
    other = build_tiny_llama(len(tiny_tokenizer), seed=7)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PatchsparseError, match="made for tiny-a"):
        load_mask_spec(tmp_path / "m", other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_wrong_shape_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    save_mask_spec(hybrid_spec(tiny_model), tmp_path / "m", base_model=tiny_model)
    wider = build_tiny_llama(len(tiny_tokenizer), intermediate=192)
    with pytest.raises(PatchsparseError, match="has shape"):
        load_mask_spec(tmp_path / "m", wider)
    deeper = build_tiny_llama(len(tiny_tokenizer), layers=1)
    with pytest.raises(PatchsparseError, match="does not have"):
        load_mask_spec(tmp_path / "m", deeper)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_model_in_another_dtype_is_accepted(tiny_model, tiny_tokenizer, tmp_path, dtype):
    spec = hybrid_spec(tiny_model)
    save_mask_spec(spec, tmp_path / "m", base_model=tiny_model)
    assert_same_spec(spec, load_mask_spec(tmp_path / "m", copy.deepcopy(tiny_model).to(dtype)))
    other = build_tiny_llama(len(tiny_tokenizer), seed=3).to(dtype)
    with pytest.raises(PatchsparseError, match="different weights"):
        load_mask_spec(tmp_path / "m", other)


def test_masked_model_does_not_match_its_base_fingerprint(tiny_model, tmp_path):
    spec = hybrid_spec(tiny_model)
    save_mask_spec(spec, tmp_path / "m", base_model=tiny_model)
    spec.apply_(tiny_model)
    with pytest.raises(PatchsparseError, match="different weights"):
        load_mask_spec(tmp_path / "m", tiny_model)


def test_corrupt_file_is_refused(tiny_model, tmp_path):
    out = save_mask_spec(hybrid_spec(tiny_model), tmp_path / "m")
    data = bytearray((out / MASKS_TENSORS).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside a mask
    (out / MASKS_TENSORS).write_bytes(bytes(data))
    with pytest.raises(PatchsparseError, match="corrupt or truncated"):
        load_mask_spec(out, tiny_model)


def test_truncated_file_is_refused(tiny_model, tmp_path):
    out = save_mask_spec(hybrid_spec(tiny_model), tmp_path / "m")
    data = (out / MASKS_TENSORS).read_bytes()
    (out / MASKS_TENSORS).write_bytes(data[: len(data) - 100])
    with pytest.raises(PatchsparseError, match="corrupt or truncated"):
        load_mask_spec(out)


def test_truncated_json_and_missing_files_are_refused(tiny_model, tmp_path):
    out = save_mask_spec(hybrid_spec(tiny_model), tmp_path / "m")
    text = (out / MASKS_JSON).read_text()
    (out / MASKS_JSON).write_text(text[: len(text) // 2])
    with pytest.raises(PatchsparseError, match="not valid JSON"):
        load_mask_spec(out)
    (out / MASKS_JSON).write_text(text)
    (out / MASKS_TENSORS).unlink()
    with pytest.raises(PatchsparseError, match="is missing"):
        load_mask_spec(out)
    with pytest.raises(PatchsparseError, match="does not exist"):
        load_mask_spec(tmp_path / "nowhere")


def test_existing_directory_needs_overwrite(tiny_model, tmp_path):
    first = hybrid_spec(tiny_model, seed=0)
    second = hybrid_spec(tiny_model, seed=1)
    save_mask_spec(first, tmp_path / "m")
    with pytest.raises(PatchsparseError, match="exists; pass --overwrite"):
        save_mask_spec(second, tmp_path / "m")
    assert_same_spec(first, load_mask_spec(tmp_path / "m"))
    save_mask_spec(second, tmp_path / "m", overwrite=True)
    assert_same_spec(second, load_mask_spec(tmp_path / "m"))


def test_interrupted_write_leaves_nothing_visible(tiny_model, tmp_path, monkeypatch):
    spec = hybrid_spec(tiny_model)
    save_mask_spec(hybrid_spec(tiny_model, seed=5), tmp_path / "old")

    def fail(self, *args, **kwargs):  # masks.safetensors is written, masks.json fails
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(KeyboardInterrupt):
        save_mask_spec(spec, tmp_path / "new")
    with pytest.raises(KeyboardInterrupt):
        save_mask_spec(spec, tmp_path / "old", overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no partial directory anywhere
    assert_same_spec(hybrid_spec(tiny_model, seed=5), load_mask_spec(tmp_path / "old"))


def test_killed_writer_leaves_no_visible_directory(tmp_path):
    """SIGKILL while the files are being written: the target name never appears."""
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import torch
        from patchsparse.io import maskfile
        from patchsparse.masks import HybridMaskSpec, LayerMask
        spec = HybridMaskSpec({{"model.layers.0.mlp.up_proj": LayerMask(torch.ones(8, 8, dtype=torch.bool), "unstructured")}})
        real = Path.write_bytes
        def slow(self, data):
            real(self, data)
            print("written", flush=True)
            time.sleep(60)
        Path.write_bytes = slow
        maskfile.save_mask_spec(spec, Path({str(tmp_path / 'm')!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "m").exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(".m.") and name.endswith(".partial") for name in leftovers) and leftovers
    # the next write of the same directory removes the dead writer's leftovers, not a live writer's
    from patchsparse.atomic import _owner_tag

    alive = tmp_path / f".m.{_owner_tag().rsplit('-', 1)[0]}-1.abcd1234.partial"  # pid 1 always runs
    other_host = tmp_path / ".m.otherhost-123.abcd1234.partial"
    alive.mkdir()
    other_host.mkdir()
    spec = HybridMaskSpec({"model.layers.0.mlp.up_proj": LayerMask(torch.ones(8, 8, dtype=torch.bool), "unstructured")})
    save_mask_spec(spec, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", alive.name, other_host.name])


@pytest.mark.parametrize("target", [-0.1, 0.6, "35%"])
def test_target_outside_hybrid_range_is_refused(tiny_model, tmp_path, target):
    spec = hybrid_spec(tiny_model, metadata={"target_sparsity": target})
    with pytest.raises(PatchsparseError, match="target sparsity"):
        save_mask_spec(spec, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_mask_that_breaks_its_pattern_is_refused(tiny_model, tmp_path):
    spec = hybrid_spec(tiny_model)
    name = next(iter(spec.layers))
    broken = spec.layers[name].sparse_keep.clone()
    broken[0, :4] = True  # keeps 4 of 4
    spec.layers[name] = LayerMask(broken, "2:4", spec.layers[name].tile, spec.layers[name].dense_tiles)
    with pytest.raises(PatchsparseError, match="not 2:4"):
        save_mask_spec(spec, tmp_path / "m")


@pytest.mark.parametrize("tile, grid", [((16, 16), (4, 8)), ((16, 20), (3, 7))])
def test_tile_size_mismatch_is_refused(tiny_model, tmp_path, tile, grid):
    """masks.json claims another tile size than the stored tile grids were made with."""
    out = save_mask_spec(hybrid_spec(tiny_model, tile=(24, 20)), tmp_path / "m")
    doc = json.loads((out / MASKS_JSON).read_text())
    entry = doc["layers"]["model.layers.1.mlp.down_proj"]  # (64, 128): grid (3, 7) with 24x20 tiles
    entry["tile"], entry["grid"] = list(tile), list(grid)
    (out / MASKS_JSON).write_text(json.dumps(doc))
    with pytest.raises(PatchsparseError, match="does not fit"):
        load_mask_spec(out, tiny_model)


def test_without_sample_another_dtype_is_refused_with_a_hint(tiny_model, tmp_path):
    spec = hybrid_spec(tiny_model)
    save_mask_spec(spec, tmp_path / "m", weights_fingerprint=weights_fingerprint(tiny_model, spec.layers))
    with pytest.raises(PatchsparseError, match="in the dtype they were made in"):
        load_mask_spec(tmp_path / "m", copy.deepcopy(tiny_model).to(torch.bfloat16))
    assert_same_spec(spec, load_mask_spec(tmp_path / "m", tiny_model))


def test_identical_masks_give_identical_bytes(tiny_model, tmp_path):
    """The safetensors writer orders its header metadata at random; the saved file must not vary."""
    spec = hybrid_spec(tiny_model)
    payloads = {save_mask_spec(spec, tmp_path / f"m{i}", base_model=tiny_model).joinpath(MASKS_TENSORS).read_bytes()
                for i in range(12)}
    assert len(payloads) == 1
    jsons = {(tmp_path / f"m{i}" / MASKS_JSON).read_bytes() for i in range(12)}
    assert len(jsons) == 1
    raw = payloads.pop()
    size = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + size].decode()
    assert header.rstrip(" ") == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":"))
    assert_same_spec(spec, load_mask_spec(tmp_path / "m0", tiny_model))


def _edit_document(out, edit):
    doc = json.loads((out / MASKS_JSON).read_text())
    edit(doc)
    (out / MASKS_JSON).write_text(json.dumps(doc))


@pytest.mark.parametrize("edit", [
    lambda d: d.pop("base_model"),
    lambda d: d["base_model"].update(fingerprint=None),
    lambda d: d["base_model"].pop("fingerprint"),
])
def test_a_missing_fingerprint_is_refused_when_applying(tiny_model, tmp_path, edit):
    out = save_mask_spec(hybrid_spec(tiny_model), tmp_path / "m", base_model=tiny_model)
    _edit_document(out, edit)
    with pytest.raises(PatchsparseError, match="fingerprint"):
        load_mask_spec(out, tiny_model)


def test_unverified_masks_load_only_when_asked(tiny_model, tmp_path):
    spec = hybrid_spec(tiny_model)
    out = save_mask_spec(spec, tmp_path / "m")  # no model given: no fingerprint recorded
    with pytest.raises(PatchsparseError, match="records no weights fingerprint"):
        load_mask_spec(out, tiny_model)
    assert_same_spec(spec, load_mask_spec(out, tiny_model, allow_unverified=True))
    assert_same_spec(spec, load_mask_spec(out))  # without a model there is nothing to verify


def _rewrite_tensors(out, file_name, tensors):
    from safetensors.torch import save

    payload = save(tensors)
    (out / file_name).write_bytes(payload)
    _edit_document(out, lambda d: d["files"][file_name].update(sha256=hashlib.sha256(payload).hexdigest(),
                                                                bytes=len(payload)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tiny_model, tmp_path, bad):
    from safetensors.torch import load_file

    spec = hybrid_spec(tiny_model)
    name = next(iter(spec.layers))
    weight = dict(tiny_model.named_modules())[name].weight.detach().clone()
    weight[0, 0] = bad
    with pytest.raises(PatchsparseError, match="NaN or infinite"):
        save_mask_spec(spec, tmp_path / "refused", base_model=tiny_model, updated_weights={name: weight})
    assert not (tmp_path / "refused").exists()
    out = save_mask_spec(spec, tmp_path / "m", base_model=tiny_model, updated_weights={name: weight.nan_to_num()})
    _rewrite_tensors(out, WEIGHTS_TENSORS, {f"{name}.weight": weight})  # a valid checksum over bad values
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(PatchsparseError, match="NaN or infinite"):
        apply_mask_dir(tiny_model, out)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    tensors = load_file(out / MASKS_TENSORS)
    tensors[f"weights_sample/{name}"][0] = bad
    _rewrite_tensors(out, MASKS_TENSORS, tensors)
    with pytest.raises(PatchsparseError, match="NaN or infinite"):
        load_mask_spec(out, tiny_model)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(files=None), "'files' must be a JSON object"),
    (lambda d: d.update(files={"masks.safetensors": "abc"}), "sha256 string"),
    (lambda d: d.update(metadata="text"), "'metadata' must be a JSON object"),
    (lambda d: d.update(layers=[1, 2]), "'layers' must be a JSON object"),
    (lambda d: d["base_model"].update(fingerprint=12), "fingerprint must be a sha256"),
    (lambda d: next(iter(d["layers"].values())).update(pattern="2:0"), "neither N:M"),
    (lambda d: next(iter(d["layers"].values())).update(pattern=None), "pattern must be a string"),
    (lambda d: next(iter(d["layers"].values())).update(shape=[-64, 64]), "positive integers"),
    (lambda d: next(iter(d["layers"].values())).update(shape=[64.5, 64]), "positive integers"),
    (lambda d: next(iter(d["layers"].values())).update(tile=[0, 16]), "positive integers"),
    (lambda d: d["layers"].update({next(iter(d["layers"])): "x"}), "invalid entry"),
])
def test_wrongly_typed_fields_are_refused(tiny_model, tmp_path, edit, message):
    out = save_mask_spec(hybrid_spec(tiny_model), tmp_path / "m", base_model=tiny_model)
    _edit_document(out, edit)
    with pytest.raises(PatchsparseError, match=message):
        load_mask_spec(out, tiny_model)
