"""Mixture-of-experts layers as plain linears, so experts can be masked like any other projection.

Current transformers keeps the experts of Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2/V3 (and others
built with `use_experts_implementation`) as two fused 3-D parameters: `gate_up_proj` (E, 2I, H),
gate rows first, and `down_proj` (E, H, I). Nothing in them is an `nn.Linear`, so a selection of
linears would silently skip the bulk of the model. `unfuse_experts` replaces each such module by
`UnfusedExperts`, which holds one `gate_proj`, `up_proj` and `down_proj` linear per expert
(`…mlp.experts.3.down_proj`) and computes exactly what the fused module's eager forward does.
The router (`mlp.gate`, a bare parameter) is untouched and stays dense.

Because each expert is its own linear, forward pre-hooks on it see only the tokens routed to
that expert: calibration statistics are per expert for free. `fuse_experts` puts the original
layout back (for `save_pretrained`, so plain transformers reloads an exported checkpoint).

Layouts other than the default (interleaved gate/up, transposed, biased experts such as GPT-OSS,
or expert classes not built that way such as DBRX) are left fused; `fused_expert_modules` finds
them so that layer selection can refuse such a model instead of pruning its attention alone.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

_FUSED = "_patchsparse_fused"  # attribute of UnfusedExperts: the fused module's class and config


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """The experts of one MoE block as a list of `ExpertMLP`; called like the fused module."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states (S, H), top_k_index (S, k), top_k_weights (S, k) -> (S, H)"""
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # (E + 1, k, S): which tokens chose each expert, and in which of their k slots; index E
            # is the "no expert here" slot of expert-parallel routing, skipped as transformers does
            routed = nn.functional.one_hot(top_k_index, num_classes=len(self) + 1).permute(2, 1, 0)
        for expert in routed[:-1].sum(dim=(-1, -2)).nonzero()[:, 0].tolist():
            slot, token = torch.where(routed[expert])
            out = self[expert](hidden_states[token]) * top_k_weights[token, slot, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final


def _is_default_fused(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)
            and gate_up.dim() == 3 and down.dim() == 3
            and getattr(module, "has_gate", False) and getattr(module, "is_concatenated", False)
            and not getattr(module, "is_transposed", True) and not getattr(module, "has_bias", True)
            and not getattr(module, "has_post_expert_norm", False)
            and getattr(getattr(type(module), "_apply_gate", None), "__name__", "") == "_default_apply_gate"
            and gate_up.device.type != "meta")


def fused_expert_modules(model: nn.Module) -> list[str]:
    """Names of modules that keep expert weights as 3-D parameters (experts no linear selection sees)."""
    return [name for name, module in model.named_modules()
            if not isinstance(module, UnfusedExperts)
            and any(p.dim() == 3 for p in module.parameters(recurse=False))]


@torch.no_grad()
def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every default-layout fused experts module by `UnfusedExperts` (in place). -> their names"""
    done = []
    for name, module in list(model.named_modules()):
        if not _is_default_fused(module):
            continue
        experts, twice_inter, hidden = module.gate_up_proj.shape
        inter = twice_inter // 2
        weight = module.gate_up_proj
        unfused = UnfusedExperts([ExpertMLP(hidden, inter, module.act_fn, weight.dtype, weight.device)
                                  for _ in range(experts)])
        for e, expert in enumerate(unfused):
            expert.gate_proj.weight.copy_(module.gate_up_proj[e, :inter])
            expert.up_proj.weight.copy_(module.gate_up_proj[e, inter:])
            expert.down_proj.weight.copy_(module.down_proj[e])
        unfused.requires_grad_(module.gate_up_proj.requires_grad)
        object.__setattr__(unfused, _FUSED, (type(module), module.config))
        _set_submodule(model, name, unfused)
        done.append(name)
    return done


@torch.no_grad()
def _refuse(unfused: UnfusedExperts) -> nn.Module:
    cls, config = getattr(unfused, _FUSED)
    with torch.device("meta"):
        fused = cls(config)
    fused.gate_up_proj = nn.Parameter(torch.stack(
        [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in unfused]), requires_grad=False)
    fused.down_proj = nn.Parameter(torch.stack([e.down_proj.weight for e in unfused]), requires_grad=False)
    return fused


@contextlib.contextmanager
def fused_experts(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, experts are in transformers' own fused layout (e.g. for `save_pretrained`);
    the unfused modules come back afterwards. The fused copies hold the current (masked) weights."""
    swapped = [(name, module) for name, module in model.named_modules() if isinstance(module, UnfusedExperts)]
    for name, module in swapped:
        _set_submodule(model, name, _refuse(module))
    try:
        yield model
    finally:
        for name, module in swapped:
            _set_submodule(model, name, module)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
