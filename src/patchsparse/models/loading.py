"""Resolve a model spec (built-in name, local directory, hub id) into a frozen causal LM."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patchsparse.errors import PatchsparseError
from patchsparse.models.builtin import BUILTIN_MODELS, cached_builtin_dir
from patchsparse.network import hub_reachable

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        # bf16 pays off on GPUs; on CPUs without bf16 units it is slower than fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise PatchsparseError(f"unknown dtype '{name}' (choose float32, bfloat16, float16 or auto)")
    return _DTYPES[name]


def resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PatchsparseError(f"device '{name}' requested but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise PatchsparseError(f"unknown device '{name}' (choose cpu, cuda or auto)")
    return torch.device(name)


def _looks_like_path(spec: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with slashes or a file suffix is a path.
    return (spec.startswith((".", "/", "~")) or spec.count("/") > 1
            or spec.endswith((".gguf", ".safetensors", ".bin", ".json")))


def load_model(spec: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               device_map: str | dict | None = None, offload_dir: str | Path | None = None,
               **from_pretrained_kwargs: Any) -> LoadedModel:
    """Load a causal LM with frozen weights in eval mode.

    `spec` is a built-in name (`smollm2-135m`), a local Hugging Face model directory, or a hub id.
    `device_map` ("auto", "cpu", "cuda:0", a {module: device} dict) places the layers through
    accelerate instead of moving the whole model to `device`: with "auto", layers that do not
    fit in GPU memory go to CPU memory, then to disk under `offload_dir`. This is how a model
    larger than one GPU is loaded in bf16 for evaluation. Extra keyword arguments (e.g.
    `max_memory`) go to `from_pretrained`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading takes about a second; its bars are noise
    placement = placement_kwargs(device_map, offload_dir)
    from_pretrained_kwargs = {**placement, **from_pretrained_kwargs}
    # With a device map the dtype default follows the map's first device, not `device`.
    dev = resolve_device(device if device_map is None else _first_device(device_map))
    torch_dtype = resolve_dtype(dtype, dev)
    identity: dict[str, Any] = {"spec": spec}
    if spec in BUILTIN_MODELS:
        path = cached_builtin_dir(BUILTIN_MODELS[spec])
        identity.update(json.loads((path / "patchsparse_builtin.json").read_text()))
        source, local = str(path), True
    elif Path(spec).expanduser().is_dir():
        source, local = str(Path(spec).expanduser().resolve()), True
        identity.update(name=Path(source).name, source="local directory")
    elif _looks_like_path(spec) or Path(spec).expanduser().exists():
        raise PatchsparseError(f"model path '{spec}' is not a directory (expected a Hugging Face model folder)")
    else:
        source, local = spec, False
        identity.update(name=spec, source="huggingface hub")
        if not hub_reachable():
            known = ", ".join(sorted(BUILTIN_MODELS))
            raise PatchsparseError(
                f"cannot load '{spec}': not a built-in model ({known}), not a local directory, and the "
                f"Hugging Face hub is unreachable (offline)")
    # transformers' own load report (a table of mismatched keys) is not printed: `_check_loading_info`
    # turns what matters in it into one line
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, local_files_only=local, output_loading_info=True, **from_pretrained_kwargs)
    except Exception as exc:  # noqa: BLE001 - a broken folder fails in many ways (safetensors, sizes, config)
        if local:
            raise PatchsparseError(f"cannot load model from '{source}': {_first_line(exc)}") from None
        if not isinstance(exc, (OSError, ValueError)):
            raise
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise PatchsparseError(
            f"cannot load '{spec}': not a built-in model ({known}), not a local directory, and the "
            f"Hugging Face hub did not provide it (offline or unknown id): {_first_line(exc)}"
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_loading_info(info, model, source)
    if "device_map" not in from_pretrained_kwargs:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    # Mixture-of-experts: fused 3-D expert weights become one linear per expert projection, so
    # they can be selected, calibrated and masked; export fuses them back. Not under a device map,
    # whose placement hooks sit on the fused modules: there masking an MoE model is refused.
    if "device_map" not in from_pretrained_kwargs:
        from patchsparse.models.experts import unfuse_experts

        unfuse_experts(model)
    revision = getattr(model.config, "_commit_hash", None)
    if revision:
        identity["revision"] = revision
    identity["architecture"] = (model.config.architectures or [type(model).__name__])[0]
    device_map_used = getattr(model, "hf_device_map", None)
    if device_map_used:
        # How many top-level entries of the map sit on each device (gpu index, cpu, disk).
        placed: dict[str, int] = {}
        for where in device_map_used.values():
            placed[str(where)] = placed.get(str(where), 0) + 1
        identity["placement"] = placed
    return LoadedModel(model=model, tokenizer=tokenizer, identity=identity)


def _check_loading_info(info: dict[str, Any], model: torch.nn.Module, source: str) -> None:
    """Refuse weights that do not fill the model its config describes (they would be random)."""
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in info.get("missing_keys", ()) if k not in tied]
    problems = [f"{len(missing)} weight(s) missing from the checkpoint (e.g. {sorted(missing)[0]})"] if missing else []
    if info.get("mismatched_keys"):
        problems.append(f"{len(info['mismatched_keys'])} weight(s) of another shape")
    if problems:
        raise PatchsparseError(f"cannot load model from '{source}': its config does not match its weights: "
                               f"{'; '.join(problems)}")


def placement_kwargs(device_map: str | dict | None, offload_dir: str | Path | None) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for a device map and a disk-offload folder."""
    if device_map is None:
        if offload_dir is not None:
            raise PatchsparseError("an offload directory needs a device map (e.g. --device-map auto)")
        return {}
    if isinstance(device_map, str):
        name = device_map.strip()
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise PatchsparseError(f"device map '{name}' requested but CUDA is not available")
        if name not in _DEVICE_MAP_STRATEGIES and name != "cpu" and not name.startswith("cuda"):
            raise PatchsparseError(
                f"unknown device map '{name}' (choose {', '.join(_DEVICE_MAP_STRATEGIES)}, cpu or cuda[:N])")
        device_map = name
    kwargs: dict[str, Any] = {"device_map": device_map}
    if offload_dir is not None:
        folder = Path(offload_dir).expanduser()
        if folder.exists() and not folder.is_dir():
            raise PatchsparseError(f"offload directory '{offload_dir}' exists and is not a directory")
        folder.mkdir(parents=True, exist_ok=True)
        kwargs["offload_folder"] = str(folder)
    return kwargs


_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _first_device(device_map: str | dict) -> str:
    if isinstance(device_map, dict):
        values = [str(v) for v in device_map.values()]
        gpu = [v for v in values if v not in ("cpu", "disk")]
        return f"cuda:{gpu[0]}" if gpu and gpu[0].isdigit() else (gpu[0] if gpu else "cpu")
    if device_map in _DEVICE_MAP_STRATEGIES:
        return "auto"
    return device_map


def input_device(model: torch.nn.Module) -> torch.device:
    """Where token ids go: the embedding's device; CPU when it is offloaded (accelerate's hooks move them)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        weight = next(model.parameters())
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
