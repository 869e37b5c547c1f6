"""Load a sparse model for inference (masks applied, linears packed) and time its generation.

`load_sparse(model, masks=DIR)` is the one call from a mask directory (or an exported
checkpoint, which carries its masks in `patchsparse_masks/`) to a transformers model whose masked
linears are `HybridLinear` layers, ready for `.generate()`. `timed_generate` measures prefill and
decode speed within one `generate` call.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from patchsparse.errors import PatchsparseError
from patchsparse.io.export import EXPORT_JSON, SIDECAR
from patchsparse.io.maskfile import MASKS_JSON, MASKS_TENSORS, apply_mask_dir, load_mask_spec, read_mask_document
from patchsparse.kernels.linear import DenseLinear, HybridLinear, convert_model
from patchsparse.masks.spec import HybridMaskSpec
from patchsparse.models import LoadedModel, load_model


@dataclass
class SparseModel(LoadedModel):
    """A loaded model with its masks applied; `layers` holds the packed layers once converted."""

    spec: HybridMaskSpec | None = None
    mask_dir: Path | None = None
    exported: bool = False                      # the masks came from an exported checkpoint's sidecar
    layers: dict[str, HybridLinear | DenseLinear] = field(default_factory=dict)


def exported_mask_dir(model: str | Path) -> Path | None:
    """The mask sidecar of an exported checkpoint directory, or None when `model` is not one."""
    sidecar = Path(model).expanduser() / SIDECAR
    return sidecar if (sidecar / MASKS_JSON).is_file() else None


def _check_exported(model: nn.Module, spec: HybridMaskSpec, sidecar: Path) -> None:
    """An exported checkpoint holds the masked weights: every pruned weight must already be zero.

    (The fingerprint in the sidecar is of the unmasked base model, so it cannot be checked here.)
    """
    info_path = sidecar / EXPORT_JSON
    if info_path.is_file():
        try:
            expected = json.loads(info_path.read_text()).get("mask_fingerprint")
        except ValueError:
            raise PatchsparseError(f"{info_path} is not valid JSON (corrupt or truncated)") from None
        recorded = read_mask_document(sidecar).get("files", {}).get(MASKS_TENSORS, {}).get("sha256")
        if expected and expected != recorded:
            raise PatchsparseError(f"{sidecar} holds other masks than the ones the checkpoint was exported with")
    for name, linear in spec.check_matches(model).items():
        keep = spec.layers[name].keep_mask().to(linear.weight.device)
        if bool(linear.weight[~keep].any()):
            raise PatchsparseError(
                f"layer '{name}' of the checkpoint has non-zero weights where its masks prune: "
                f"the checkpoint does not match {sidecar}")


@torch.no_grad()
def load_masked(model: str | nn.Module, masks: str | Path | None = None, *, dtype: str | torch.dtype = "float32",
                device: str | torch.device = "auto") -> SparseModel:
    """The model with its masks applied as dense layers (pruned weights zero, updated weights in).

    `model` is a built-in name, a Hugging Face directory or hub id, an exported checkpoint
    directory (its sidecar masks are used), or an `nn.Module` (changed in place; dtype and device
    are left as they are). Every check runs before the model changes.
    """
    sidecar = exported_mask_dir(model) if isinstance(model, (str, Path)) else None
    if sidecar is not None and masks is not None and Path(masks).expanduser().resolve() != sidecar.resolve():
        raise PatchsparseError(f"{model} is an exported checkpoint with its own masks in {SIDECAR}/; "
                               "do not pass other masks")
    mask_dir = Path(masks).expanduser() if masks is not None else sidecar
    if mask_dir is None:
        raise PatchsparseError("no masks: give a mask directory, or an exported checkpoint directory as the model")
    read_mask_document(mask_dir)                                # a bad directory fails before loading the model
    if isinstance(model, nn.Module):
        loaded = SparseModel(model=model, tokenizer=None, identity={"name": type(model).__name__})
    else:
        base = load_model(str(model), dtype=dtype, device=device)
        loaded = SparseModel(model=base.model, tokenizer=base.tokenizer, identity=base.identity)
    if sidecar is not None:
        spec = load_mask_spec(sidecar)
        _check_exported(loaded.model, spec, sidecar)
    else:
        spec = apply_mask_dir(loaded.model, mask_dir)           # checks, then updated weights, then zeros
    loaded.spec, loaded.mask_dir, loaded.exported = spec, mask_dir, sidecar is not None
    return loaded


def load_sparse(model: str | nn.Module, masks: str | Path | None = None, *, dtype: str | torch.dtype = "float32",
                device: str | torch.device = "auto", backend: str = "auto") -> SparseModel:
    """Load `model` with `masks` and pack every masked linear into a `HybridLinear`, once.

    Returns a `SparseModel`: `.model` is the transformers model ready for `.generate()`, `.tokenizer`
    its tokenizer, `.spec` the masks, `.layers` the packed layers by name. `backend` is a kernel
    backend (`auto` picks the compiled kernel on CPU and keeps dense each layer whose packed form
    is measured slower here, see docs/KERNELS.md).
    """
    loaded = load_masked(model, masks, dtype=dtype, device=device)
    loaded.layers = convert_model(loaded.model, loaded.spec, backend=backend)
    return loaded


def kernel_path(layer: HybridLinear | DenseLinear) -> str:
    """Which code a converted layer runs (`HybridLinear.kernel_path`: e.g. 'cpu-kernel', 'split/emulated',
    'expand-fallback'; or 'dense (packed was slower)' for a layer `auto` conversion kept dense)."""
    return layer.kernel_path


def kernel_paths(model: nn.Module) -> dict[str, int]:
    """How many converted layers of `model` run each code path."""
    return dict(Counter(kernel_path(m) for m in model.modules() if isinstance(m, (HybridLinear, DenseLinear))))


# --------------------------------------------------------------------------- timing

@dataclass
class GenerationTiming:
    """Prefill = prompt + first token; decode = every later token (the step that sparsity speeds up)."""

    new_tokens: int
    batch: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_s(self) -> float | None:
        """(new tokens − 1) · batch / decode time; None with fewer than two new tokens."""
        if self.new_tokens < 2 or self.decode_seconds <= 0:
            return None
        return (self.new_tokens - 1) * self.batch / self.decode_seconds

    def as_dict(self) -> dict[str, Any]:
        return {"new_tokens": self.new_tokens, "batch": self.batch, "prefill_seconds": self.prefill_seconds,
                "decode_seconds": self.decode_seconds, "decode_tokens_per_s": self.decode_tokens_per_s}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _token_clock(device: torch.device, stamps: list[float]):
    """A stopping criterion that never stops: it notes the time each new token is ready."""
    from transformers import StoppingCriteria

    class TokenClock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            _synchronize(device)
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return TokenClock()


@torch.no_grad()
def timed_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   **generate_kwargs: Any) -> tuple[torch.Tensor, GenerationTiming]:
    """`model.generate` with the time of each new token noted: one call gives prefill and decode speed.

    Returns the generated ids (B, T + new) and the timing.
    """
    from transformers import StoppingCriteriaList

    device = input_ids.device
    stamps: list[float] = []
    criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
    criteria.append(_token_clock(device, stamps))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _synchronize(device)
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=attention_mask, stopping_criteria=criteria, **generate_kwargs)
    _synchronize(device)
    if not stamps:
        raise PatchsparseError("generation produced no new token")
    timing = GenerationTiming(new_tokens=len(stamps), batch=input_ids.shape[0], prefill_seconds=stamps[0] - start,
                              decode_seconds=stamps[-1] - stamps[0])
    return out, timing
