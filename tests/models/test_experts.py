"""Mixture-of-experts: experts as per-expert linears, per-expert calibration, routers left dense."""

import pytest
import torch

from patchsparse.errors import PatchsparseError
from patchsparse.models import select_linears
from patchsparse.models.experts import UnfusedExperts, fused_experts, unfuse_experts
from patchsparse.prior.oneshot import MIN_CALIBRATION_TOKENS, prune_model
from patchsparse.prior.pattern import PrunePattern
from patchsparse.prior.pruners import magnitude_mask
from tests.families import _config, build_family


def fused_model(family):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(family)).eval().requires_grad_(False)


def ids_of(n=4, t=16):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe"])
def test_unfused_experts_compute_what_the_fused_ones_do_and_fuse_back_exactly(family):
    model = fused_model(family)
    with pytest.raises(PatchsparseError, match="fused 3-D parameters"):
        select_linears(model)  # refused rather than pruning the attention alone
    original = model.model.layers[1].mlp.experts.gate_up_proj.clone()
    ids = ids_of()
    with torch.no_grad():
        expected = model(ids).logits
    assert unfuse_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, UnfusedExperts) and len(experts) == 4
    inter = experts[2].gate_proj.out_features
    assert torch.equal(experts[2].gate_proj.weight, original[2, :inter])  # gate rows first, then up
    assert torch.equal(experts[2].up_proj.weight, original[2, inter:])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    with fused_experts(model):
        assert torch.equal(model.model.layers[1].mlp.experts.gate_up_proj, original)
    assert model.model.layers[1].mlp.experts is experts

    names = select_linears(model)
    assert sum(".experts." in n for n in names) == 2 * 4 * 3
    assert not any(n.endswith((".gate", ".shared_expert_gate")) for n in names)  # routers stay dense


def routed_inputs(model, ids, layer):
    """What the MoE block of `layer` receives, and the experts its router picks for each token."""
    block = model.model.layers[layer].mlp
    seen = {}
    def hook(module, args):
        seen["x"] = args[0].reshape(-1, args[0].shape[-1])

    handle = block.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(ids)
        handle.remove()
        _, _, chosen = block.gate(seen["x"])
    return seen["x"], chosen


def test_each_expert_is_calibrated_on_the_tokens_routed_to_it():
    model = build_family("mixtral")
    ids = ids_of()
    x, chosen = routed_inputs(model, ids, 0)  # layer 0 sees the dense model's activations
    captured = {}

    def keep_stats(index, block, stats):
        captured.update(stats)

    from patchsparse.prior.layerwise import calibrate_layer_by_layer
    from patchsparse.prior.stats import InputNormStat

    calibrate_layer_by_layer(model, ids, lambda linear: InputNormStat(linear.in_features), keep_stats, batch_size=4)
    top_k = model.config.num_experts_per_tok
    assert sum(captured[f"model.layers.0.mlp.experts.{e}.gate_proj"].tokens for e in range(4)) == top_k * x.shape[0]
    for e in range(4):
        rows = x[(chosen == e).any(dim=-1)]
        stat = captured[f"model.layers.0.mlp.experts.{e}.gate_proj"]
        assert stat.tokens == rows.shape[0] > 0
        torch.testing.assert_close(stat.norms(), rows.norm(dim=0), rtol=1e-5, atol=1e-6)


def never_route_to(model, expert):
    """Make every router of `model` ignore `expert` (its logit set to -inf before the top-k)."""
    for layer in model.model.layers:
        gate = layer.mlp.gate

        def forward(hidden, gate=gate):
            logits = torch.nn.functional.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight)
            logits[:, expert] = float("-inf")
            probs = logits.float().softmax(dim=-1)
            top, index = probs.topk(gate.top_k, dim=-1)
            return logits, top / top.sum(dim=-1, keepdim=True), index

        gate.forward = forward


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_an_expert_without_calibration_tokens_is_pruned_by_magnitude_and_said_so(method, capsys):
    model = build_family("mixtral")
    never_route_to(model, 3)
    original = {n: m.weight.clone() for n, m in select_linears(model).items()}
    router = model.model.layers[0].mlp.gate.weight.clone()
    spec = prune_model(model, ids_of(), method, "2:4", batch_size=4)
    starved = sorted(n for n in original if ".experts.3." in n)
    assert sorted(spec.metadata["magnitude_fallback"]) == starved and len(starved) == 6
    assert spec.metadata["min_calibration_tokens"] == MIN_CALIBRATION_TOKENS
    assert "pruned by magnitude instead of " + method in capsys.readouterr().err
    for name in starved:
        assert torch.equal(spec.layers[name].sparse_keep, magnitude_mask(original[name], PrunePattern.nm(2, 4)))
    # a routed expert is not pruned by magnitude (its statistic is used)
    routed = "model.layers.0.mlp.experts.0.down_proj"
    assert not torch.equal(spec.layers[routed].sparse_keep, magnitude_mask(original[routed], PrunePattern.nm(2, 4)))
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router)  # the router is never pruned
    assert spec.sparsity() == pytest.approx(0.5)


def test_unknown_expert_layout_is_refused():
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])
    model = GptOssForCausalLM(config)
    assert unfuse_experts(model) == []  # transposed, interleaved, biased: not the default layout
    with pytest.raises(PatchsparseError, match="GPT-OSS, DBRX"):
        select_linears(model)
