"""Which linear layers get masks: chosen by name patterns, never by shape or module order.

Only `nn.Linear` modules inside the decoder blocks are candidates, so `lm_head` and the
embeddings can never be selected (docs/METHOD.md §1). Neither can the routers of mixture-of-experts
blocks (`mlp.gate`, `router`, Qwen-MoE's `shared_expert_gate`): a handful of weights that decide
where every token goes stay dense. Experts are candidates once unfused into linears
(`models.experts`); a model whose experts are still fused 3-D parameters is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

from patchsparse.errors import PatchsparseError

# Paths under which causal LMs keep their stack of decoder blocks.
_DECODER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
                  "model.language_model.layers")


@dataclass(frozen=True)
class LayerSelection:
    """Regular expressions matched (re.search) against full module names."""

    include: tuple[str, ...] = (r".*",)
    exclude: tuple[str, ...] = ()
    # Only needed for architectures whose decoder stack is not at a known path.
    decoder_path: str | None = None

    def matches(self, name: str) -> bool:
        return (any(re.search(p, name) for p in self.include)
                and not any(re.search(p, name) for p in self.exclude))


MLP_ONLY = LayerSelection(include=(r"\.mlp\.",))

# Routers of mixture-of-experts blocks: never masked.
ROUTER = re.compile(r"\.(gate|router|shared_expert_gate)$")


def decoder_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder blocks and its dotted path."""
    for candidate in ((path,) if path else _DECODER_PATHS):
        module: nn.Module | None = model
        for part in candidate.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return candidate, module
    raise PatchsparseError(
        f"{type(model).__name__} has no decoder layers at a known path "
        f"({', '.join(_DECODER_PATHS)}); pass a decoder path explicitly"
    )


def select_linears(model: nn.Module, selection: LayerSelection = LayerSelection()) -> dict[str, nn.Linear]:
    """Map full module name -> nn.Linear for every selected linear inside the decoder blocks."""
    from patchsparse.models.experts import fused_expert_modules

    prefix, layers = decoder_layers(model, selection.decoder_path)
    fused = fused_expert_modules(layers)
    if fused:
        raise PatchsparseError(
            f"{type(model).__name__} keeps its experts as fused 3-D parameters ({prefix}.{fused[0]}), which no "
            f"linear selection sees; refused rather than masking the attention alone. "
            f"patchsparse.models.experts.unfuse_experts(model) turns the usual layout (Mixtral, Qwen-MoE, OLMoE, "
            f"DeepSeek; load_model does it) into linears; other layouts (GPT-OSS, DBRX) are not supported")
    chosen: dict[str, nn.Linear] = {}
    for index, block in enumerate(layers):
        for sub_name, module in block.named_modules():
            name = f"{prefix}.{index}.{sub_name}"
            if isinstance(module, nn.Linear) and selection.matches(name) and not ROUTER.search(name):
                chosen[name] = module
    if not chosen:
        raise PatchsparseError("the model has no decoder linear layers matching the layer selection")
    return chosen


def projection_type(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `q_proj` (used for per-projection statistics)."""
    return name.rsplit(".", 1)[-1]


def block_index(name: str) -> int:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else -1
