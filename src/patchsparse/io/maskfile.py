"""Mask-only files: a `HybridMaskSpec` as bit-packed safetensors plus JSON metadata.

A mask directory holds these files (see docs/FILES.md for the full schema):

- `masks.safetensors`: per masked layer, `sparse_keep/<layer>` and `dense_tiles/<layer>` packed
  8 booleans per uint8 (about 1/32 of the layer's fp32 weights), and optionally
  `weights_sample/<layer>`, a small float32 sample of the base weights used to recognise the base
  model across dtypes;
- `masks.json`: schema version, base model identity and weights fingerprint, tile size, mode,
  pattern, target and achieved sparsity, per-layer shapes and statistics, training settings,
  package version, and the sha256 of `masks.safetensors`;
- optionally `weights.safetensors`: updated weights of the masked linears, for pruners that
  change the kept weights (SparseGPT); checksummed in masks.json like the masks.

Loading verifies the checksum before parsing any tensor and, given a model, checks shapes and the
fingerprint before anything is applied, so a corrupt file or the wrong model never changes a
model. Like PEFT's adapter-only save, the base weights are never copied.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from patchsparse.atomic import atomic_directory
from patchsparse.errors import PatchsparseError
from patchsparse.masks.bits import pack_bits, unpack_bits
from patchsparse.masks.patterns import is_nm
from patchsparse.masks.spec import HybridMaskSpec, LayerMask, grouped_sparsity
from patchsparse.masks.tiles import check_hybrid_sparsity
from patchsparse.version import __version__

FORMAT_NAME = "patchsparse-masks"
SCHEMA_VERSION = 1
MASKS_JSON = "masks.json"
MASKS_TENSORS = "masks.safetensors"
# Optional: new values of the masked linears' weights (e.g. SparseGPT's weight update), keyed
# "<layer>.weight" like a state dict. Applied before the masks.
WEIGHTS_TENSORS = "weights.safetensors"

# Values sampled per layer for the fingerprint: enough to tell models apart, cheap on a 7B model.
SAMPLE_PER_LAYER = 256


# --------------------------------------------------------------------------- fingerprint

def _sample_positions(numel: int, count: int = SAMPLE_PER_LAYER) -> torch.Tensor:
    """Evenly spread flat indices, first and last included; depends only on `numel`."""
    return torch.linspace(0, numel - 1, min(count, numel)).round().long()


def weights_sample(weight: torch.Tensor) -> torch.Tensor:
    """A fixed strided sample of a weight as float32 (exact for fp32, bf16 and fp16 weights). -> (k,)"""
    flat = weight.detach().reshape(-1)
    positions = _sample_positions(flat.numel()).to(flat.device)
    return flat[positions].to(device="cpu", dtype=torch.float32)


def _fingerprint_of_samples(samples: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> str:
    digest = hashlib.sha256(f"{FORMAT_NAME}-fingerprint-v1".encode())
    for name in sorted(samples):
        digest.update(name.encode())
        digest.update(repr(tuple(shapes[name])).encode())
        digest.update(samples[name].contiguous().numpy().astype("<f4").tobytes())
    return digest.hexdigest()


def _linear_weights(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    weights = {}
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise PatchsparseError(f"layer '{name}' is not a linear layer of this model")
        weights[name] = module.weight
    return weights


def weights_fingerprint(model: nn.Module, names: Iterable[str]) -> str:
    """sha256 over the names, shapes and a fixed strided sample of each named linear's weight.

    Cheap (a few hundred values per layer) and deterministic. Compute it on the *original* weights,
    before masks are applied: pruned weights are zero and would give another fingerprint.
    """
    weights = _linear_weights(model, names)
    samples = {name: weights_sample(w) for name, w in weights.items()}
    return _fingerprint_of_samples(samples, {name: tuple(w.shape) for name, w in weights.items()})


# Relative tolerance when the stored sample and the model differ in dtype: the coarser dtype's
# rounding (two ulps, to allow for double rounding) plus fp16's subnormal step as absolute slack.
_DTYPE_RTOL = {torch.float32: 0.0, torch.float16: 2.0 ** -9, torch.bfloat16: 2.0 ** -6}
_DTYPE_ATOL = {torch.float32: 0.0, torch.float16: 2.0 ** -24, torch.bfloat16: 0.0}


def _samples_agree(stored: torch.Tensor, current: torch.Tensor, stored_dtype: torch.dtype | None,
                   current_dtype: torch.dtype) -> bool:
    rtol = max(_DTYPE_RTOL.get(stored_dtype, 0.0), _DTYPE_RTOL.get(current_dtype, 2.0 ** -6))
    atol = max(_DTYPE_ATOL.get(stored_dtype, 0.0), _DTYPE_ATOL.get(current_dtype, 0.0))
    return stored.shape == current.shape and bool(torch.allclose(current, stored, rtol=rtol, atol=atol))


# --------------------------------------------------------------------------- save

def canonical_safetensors(payload: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted, so equal tensors give equal bytes.

    The writer keeps the header metadata in a hash map, whose order changes from process to process;
    tensor data offsets are relative to the end of the header, so re-serialising it moves nothing.
    """
    size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes
    return len(text).to_bytes(8, "little") + text + payload[8 + size:]


def _save_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save as save_tensors

    return canonical_safetensors(save_tensors(tensors, metadata=metadata))


def _check_finite(weights: dict[str, torch.Tensor], what: str) -> None:
    for name, weight in weights.items():
        if weight.is_floating_point() and not bool(torch.isfinite(weight).all()):
            raise PatchsparseError(f"{what}: '{name}' holds NaN or infinite values")


def _json_ready(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise PatchsparseError(f"{what} must be JSON-serialisable: {exc}") from exc


def _layer_entry(mask: LayerMask, kept: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "shape": list(mask.shape),
        "pattern": mask.pattern,
        "tile": list(mask.tile) if mask.tile is not None else None,
        "grid": list(mask.grid.shape) if mask.tile is not None else None,
        "kept": kept,
        "numel": mask.numel(),
        "sparsity": 1.0 - kept / mask.numel(),
        "dense_tile_fraction": mask.dense_tile_fraction(),
    }
    if mask.dense_tiles is not None:
        entry["dense_tiles"] = int(mask.dense_tiles.sum())
        entry["tiles"] = mask.dense_tiles.numel()
    return entry


def check_consistent(spec: HybridMaskSpec) -> None:
    """Refuse a spec whose sparse tiles break their declared pattern or whose target is out of range."""
    for name, mask in spec.layers.items():
        if ":" in mask.pattern:
            n, m = (int(x) for x in mask.pattern.split(":"))
            if mask.shape[1] % m or not is_nm(mask.sparse_keep, n, m):
                raise PatchsparseError(f"layer '{name}': the keep-mask of sparse tiles is not {mask.pattern}")
    target = spec.metadata.get("target_sparsity")
    if target is None:
        return
    if not isinstance(target, (int, float)) or isinstance(target, bool):
        raise PatchsparseError(f"target sparsity {target!r} is not a number")
    if all(m.pattern == "2:4" for m in spec.layers.values()):
        check_hybrid_sparsity(float(target))
    elif not 0.0 <= target < 1.0:
        raise PatchsparseError(f"target sparsity {target} is outside [0, 1)")


def _common(values: list[Any]) -> Any:
    """The value all layers share, or None when they differ."""
    return values[0] if values and all(v == values[0] for v in values) else None


def mask_tensors(spec: HybridMaskSpec) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, mask in spec.layers.items():
        tensors[f"sparse_keep/{name}"] = pack_bits(mask.sparse_keep.cpu())
        if mask.dense_tiles is not None:
            tensors[f"dense_tiles/{name}"] = pack_bits(mask.dense_tiles.cpu())
    return tensors


def save_mask_spec(spec: HybridMaskSpec, directory: str | Path, *, identity: dict | None = None,
                   extra: dict | None = None, weights_fingerprint: str | None = None,
                   base_model: nn.Module | None = None, updated_weights: dict[str, torch.Tensor] | None = None,
                   overwrite: bool = False) -> Path:
    """Write `spec` to `directory` atomically and return its path.

    identity: the base model's identity (`LoadedModel.identity`: name, revision, …).
    extra: training settings and anything else worth keeping (stored under "training").
    weights_fingerprint: `weights_fingerprint(model, spec.layers)` of the unmasked base model.
    base_model: alternatively the unmasked base model itself; then the fingerprint is computed
        here and a small weight sample is stored too, so the masks are recognised on the same
        model loaded in another dtype.
    updated_weights: layer name -> new weight (out, in) of masked layers whose kept weights the
        pruner changed; stored in weights.safetensors and restored by `apply_mask_dir`.
    overwrite: replace an existing directory; without it an existing one is refused.
    """
    directory = Path(directory)
    if not spec.layers:
        raise PatchsparseError("the mask spec has no layers; nothing to save")
    if directory.exists() and not overwrite:
        raise PatchsparseError(f"output directory {directory} exists; pass --overwrite to replace it")
    if directory.exists() and not directory.is_dir():
        raise PatchsparseError(f"output path {directory} exists and is not a directory")

    check_consistent(spec)
    tensors = mask_tensors(spec)
    sample_dtype = None
    if base_model is not None:
        weights = _linear_weights(base_model, spec.layers)
        spec.check_matches(base_model)
        samples = {name: weights_sample(w) for name, w in weights.items()}
        computed = _fingerprint_of_samples(samples, {n: tuple(w.shape) for n, w in weights.items()})
        if weights_fingerprint is not None and weights_fingerprint != computed:
            raise PatchsparseError("the given weights fingerprint does not match the given base model")
        weights_fingerprint = computed
        sample_dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
        tensors.update({f"weights_sample/{name}": s for name, s in samples.items()})
    payload = _save_tensors(tensors, metadata={"format": FORMAT_NAME, "schema_version": str(SCHEMA_VERSION)})
    files = {MASKS_TENSORS: {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}}
    weights_payload = None
    if updated_weights:
        for name, weight in updated_weights.items():
            if name not in spec.layers or tuple(weight.shape) != spec.layers[name].shape:
                raise PatchsparseError(f"updated weight for '{name}' matches no masked layer of the same shape")
        _check_finite(updated_weights, "updated weights")
        weights_payload = _save_tensors({f"{name}.weight": w.detach().to("cpu").contiguous()
                                         for name, w in updated_weights.items()})
        files[WEIGHTS_TENSORS] = {"sha256": hashlib.sha256(weights_payload).hexdigest(),
                                  "bytes": len(weights_payload), "layers": sorted(updated_weights)}

    from patchsparse.models.layers import block_index, projection_type

    layers = spec.layers
    metadata = _json_ready(spec.metadata, "mask metadata")
    kept_of = {name: mask.kept() for name, mask in layers.items()}  # the costly count, once per layer
    numel_of = {name: mask.numel() for name, mask in layers.items()}
    kept, total = sum(kept_of.values()), sum(numel_of.values())
    document = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "package_version": __version__,
        "base_model": {
            **_json_ready(identity or {}, "model identity"),
            "fingerprint": weights_fingerprint,
            "fingerprint_algorithm": f"sha256 of names, shapes and {SAMPLE_PER_LAYER} strided float32 "
                                     f"values per layer (v1)",
            "sample_dtype": sample_dtype,
        },
        "mode": metadata.get("mode"),
        "pattern": _common([m.pattern for m in layers.values()]),
        "tile": _common([list(m.tile) if m.tile else None for m in layers.values()]),
        "target_sparsity": metadata.get("target_sparsity"),
        "achieved_sparsity": 1.0 - kept / total,
        "kept": kept,
        "masked_weights": total,
        "per_projection_sparsity": grouped_sparsity(kept_of, numel_of, projection_type),
        "per_block_sparsity": {str(b): v for b, v in
                               sorted(grouped_sparsity(kept_of, numel_of, block_index).items())},
        "training": _json_ready(extra or {}, "extra settings"),
        "metadata": metadata,
        "layers": {name: _layer_entry(mask, kept_of[name]) for name, mask in layers.items()},
        "files": files,
    }
    try:
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            (tmp / MASKS_TENSORS).write_bytes(payload)
            if weights_payload is not None:
                (tmp / WEIGHTS_TENSORS).write_bytes(weights_payload)
            (tmp / MASKS_JSON).write_text(json.dumps(document, indent=2) + "\n")
    except FileExistsError:  # created by someone else while we were writing
        raise PatchsparseError(f"output directory {directory} exists; pass --overwrite to replace it") from None
    return directory


# --------------------------------------------------------------------------- load

def read_mask_document(directory: str | Path) -> dict[str, Any]:
    """The parsed masks.json of a mask directory, after checking it is one we can read."""
    directory = Path(directory)
    path = directory / MASKS_JSON
    if not directory.is_dir():
        raise PatchsparseError(f"mask directory {directory} does not exist")
    if not path.is_file():
        raise PatchsparseError(f"{directory} is not a mask directory: {MASKS_JSON} is missing")
    try:
        document = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise PatchsparseError(f"{path} is not valid JSON (corrupt or truncated): {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise PatchsparseError(f"{path} is not a patchsparse mask file")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PatchsparseError(
            f"{path} has schema version {version}; this patchsparse ({__version__}) reads version {SCHEMA_VERSION}")
    _check_field_types(document, path)
    return document


# Fields whose type every reader relies on: name -> (allowed types, may be null).
_FIELD_TYPES = {"files": (dict, False), "layers": (dict, False), "base_model": (dict, False),
                "metadata": (dict, True), "training": (dict, True)}


def _check_field_types(document: dict[str, Any], path: Path) -> None:
    """Refuse a masks.json whose fields have the wrong type, before anything reads them."""
    for key, (kind, nullable) in _FIELD_TYPES.items():
        value = document.get(key)
        if value is None and nullable:
            continue
        if not isinstance(value, kind):
            raise PatchsparseError(f"{path}: field '{key}' must be a JSON object, got {type(value).__name__}")
    for name, entry in document["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise PatchsparseError(f"{path}: files['{name}'] must be an object with a sha256 string")
    fingerprint = document["base_model"].get("fingerprint")
    if fingerprint is not None and not (isinstance(fingerprint, str) and len(fingerprint) == 64
                                        and all(c in "0123456789abcdef" for c in fingerprint)):
        raise PatchsparseError(f"{path}: base_model.fingerprint must be a sha256 hex string or null")


def _positive_ints(value: Any, length: int) -> tuple[int, ...]:
    if (not isinstance(value, list) or len(value) != length
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)):
        raise ValueError(f"expected {length} positive integers, got {value!r}")
    return tuple(value)


def _check_pattern(pattern: Any) -> str:
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a string, got {pattern!r}")
    if pattern == "unstructured":
        return pattern
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 < int(parts[0]) <= int(parts[1]):
        raise ValueError(f"pattern {pattern!r} is neither N:M with 0 < N <= M nor 'unstructured'")
    return pattern


def _read_verified_tensors(directory: Path, document: dict[str, Any],
                           file_name: str = MASKS_TENSORS) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_tensors

    path = directory / file_name
    if not path.is_file():
        raise PatchsparseError(f"{directory} is not a complete mask directory: {file_name} is missing")
    payload = path.read_bytes()  # hash and parse the same bytes
    expected = document["files"].get(file_name, {})
    if hashlib.sha256(payload).hexdigest() != expected.get("sha256"):
        raise PatchsparseError(
            f"{path} is corrupt or truncated: its sha256 does not match {MASKS_JSON} "
            f"({len(payload)} bytes, expected {expected.get('bytes')})")
    try:
        return load_tensors(payload)
    except Exception as exc:  # noqa: BLE001 - any parse failure means an unreadable file
        raise PatchsparseError(f"{path} cannot be read as safetensors: {exc}") from None


def _layer_from_entry(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LayerMask:
    try:
        if not isinstance(entry, dict):
            raise TypeError(f"expected an object, got {type(entry).__name__}")
        shape = _positive_ints(entry["shape"], 2)
        tile = _positive_ints(entry["tile"], 2) if entry.get("tile") is not None else None
        grid = _positive_ints(entry["grid"], 2) if entry.get("grid") is not None else None
        pattern = _check_pattern(entry["pattern"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PatchsparseError(f"{MASKS_JSON}: layer '{name}' has an invalid entry ({exc})") from None
    if f"sparse_keep/{name}" not in tensors:
        raise PatchsparseError(f"{MASKS_TENSORS} has no mask for layer '{name}'")
    sparse_keep = unpack_bits(tensors[f"sparse_keep/{name}"], shape)
    dense_tiles = None
    if tile is not None:
        if grid is None or f"dense_tiles/{name}" not in tensors:
            raise PatchsparseError(f"{MASKS_TENSORS} has no tile grid for layer '{name}'")
        dense_tiles = unpack_bits(tensors[f"dense_tiles/{name}"], grid)
    return LayerMask(sparse_keep=sparse_keep, pattern=pattern, tile=tile, dense_tiles=dense_tiles)


def check_fingerprint(document: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module,
                      names: list[str], allow_unverified: bool = False) -> None:
    """Refuse a model whose weights are not the ones the masks were made for.

    A file without a fingerprint is refused too (a removed `base_model` or a nulled fingerprint must
    not quietly reduce the check to names and shapes), unless `allow_unverified`.
    """
    base = document.get("base_model", {})
    expected = base.get("fingerprint")
    samples_stored = {k: v for k, v in tensors.items() if k.startswith("weights_sample/")}
    _check_finite(samples_stored, MASKS_TENSORS)
    if not expected:
        if allow_unverified:
            from patchsparse.utils import log

            log("note: this mask file records no weights fingerprint; only layer names and shapes were checked")
            return
        raise PatchsparseError(
            f"{MASKS_JSON} records no weights fingerprint of its base model, so nothing proves these masks "
            f"belong to this model; refusing to apply them (save masks with base_model= or weights_fingerprint=)")
    weights = _linear_weights(model, names)
    samples = {name: weights_sample(w) for name, w in weights.items()}
    if _fingerprint_of_samples(samples, {n: tuple(w.shape) for n, w in weights.items()}) == expected:
        return
    # The same weights in another dtype give another fingerprint; compare the stored sample instead.
    stored_dtype = getattr(torch, base.get("sample_dtype") or "", None)
    if all(f"weights_sample/{n}" in tensors for n in names) and all(
            _samples_agree(tensors[f"weights_sample/{n}"], samples[n], stored_dtype, weights[n].dtype)
            for n in names):
        return
    label = base.get("name") or base.get("spec") or "another model"
    hint = "Load the base model the masks were made for"
    if not any(key.startswith("weights_sample/") for key in tensors):
        hint += " (in the dtype they were made in: this file holds no weight sample to compare across dtypes)"
    raise PatchsparseError(
        f"these masks were made for {label} (weights fingerprint {expected[:12]}…); this model's masked "
        f"layers have different weights. {hint}")


def load_mask_spec(directory: str | Path, model: nn.Module | None = None, *,
                   allow_unverified: bool = False) -> HybridMaskSpec:
    """Read a mask directory into a `HybridMaskSpec`.

    The checksum of masks.safetensors is verified before any tensor is parsed. With `model`, the
    layer names, shapes and the weights fingerprint are checked too (on the unmasked model), so a
    mismatch is refused before anything is applied. The model is never modified here. A file that
    records no fingerprint is refused with a model unless `allow_unverified`.
    """
    directory = Path(directory)
    document = read_mask_document(directory)
    tensors = _read_verified_tensors(directory, document)
    entries = document.get("layers")
    if not isinstance(entries, dict) or not entries:
        raise PatchsparseError(f"{directory / MASKS_JSON} lists no layers")
    layers = {name: _layer_from_entry(name, entry, tensors) for name, entry in entries.items()}
    spec = HybridMaskSpec(layers=layers, metadata=document.get("metadata") or {})
    check_consistent(spec)
    if model is not None:
        spec.check_matches(model)
        check_fingerprint(document, tensors, model, list(layers), allow_unverified)
    return spec


def load_updated_weights(directory: str | Path, spec: HybridMaskSpec) -> dict[str, torch.Tensor]:
    """The updated weights stored beside the masks (empty when there are none), checksum verified."""
    directory = Path(directory)
    document = read_mask_document(directory)
    if WEIGHTS_TENSORS not in document["files"]:
        return {}
    tensors = _read_verified_tensors(directory, document, WEIGHTS_TENSORS)
    _check_finite(tensors, WEIGHTS_TENSORS)
    weights = {}
    for key, weight in tensors.items():
        name = key.removesuffix(".weight")
        if name not in spec.layers or tuple(weight.shape) != spec.layers[name].shape:
            raise PatchsparseError(f"{WEIGHTS_TENSORS}: '{key}' matches no masked layer of the same shape")
        weights[name] = weight
    return weights


@torch.no_grad()
def apply_mask_dir(model: nn.Module, directory: str | Path) -> HybridMaskSpec:
    """Load a mask directory and apply it to `model` in place; every check runs before any change.

    Checks: checksums, layer names and shapes, the weights fingerprint. Stored updated weights (if
    any) replace the masked layers' weights, then pruned weights are zeroed.
    """
    spec = load_mask_spec(directory, model)
    updated = load_updated_weights(directory, spec)
    linears = spec.check_matches(model)
    for name, weight in updated.items():
        linears[name].weight.copy_(weight.to(linears[name].weight.dtype))
    spec.apply_(model)
    return spec
