import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from patchsparse.errors import PatchsparseError
from patchsparse.learn.config import LearnConfig, MaskConfig
from patchsparse.learn.init import init_pattern_logits, pattern_overlap
from patchsparse.learn.masked import HARD, attach_masks, find_masks, remove_masks
from patchsparse.masks import PATTERNS_2_4, TileGrid
from patchsparse.models import LayerSelection

from tests.conftest import build_tiny_llama
from tests.learn.helpers import tiny_config, tiny_prior


def test_attach_selects_decoder_linears_and_freezes_weights(tiny_model):
    config = tiny_config()
    weights = {n: m.weight.detach().clone() for n, m in tiny_model.named_modules() if isinstance(m, nn.Linear)}
    masked = attach_masks(tiny_model, config, tiny_prior(tiny_model))
    assert len(masked.masks) == 2 * 7
    assert not any("lm_head" in n or "embed" in n for n in masked.masks)
    assert not parametrize.is_parametrized(tiny_model.lm_head)
    for name, mask in masked.masks.items():
        assert mask.pattern_logits.dtype == torch.float32 and mask.pattern_logits.requires_grad
        assert mask.tile_logits.shape == TileGrid(*mask.shape, 16, 16).shape
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all("pattern_logits" in n or "tile_logits" in n for n in trainable)
    assert remove_masks(tiny_model) == 14
    for name, module in tiny_model.named_modules():
        if isinstance(module, nn.Linear):
            assert not parametrize.is_parametrized(module)
            assert torch.equal(module.weight, weights[name])


def test_excluded_layers_stay_plain(tiny_model):
    config = tiny_config()
    mask = MaskConfig(mode="patch-joint", sparsity=0.35, tile=(16, 16),
                      selection=LayerSelection(include=(r"\.mlp\.",), exclude=(r"down_proj",)))
    config = LearnConfig(mask, config.sampling, config.objective, config.optim, config.train)
    masked = attach_masks(tiny_model, config, tiny_prior(tiny_model))
    assert sorted({n.rsplit(".", 1)[-1] for n in masked.masks}) == ["gate_proj", "up_proj"]
    assert not parametrize.is_parametrized(tiny_model.model.layers[0].mlp.down_proj)


def test_failed_checks_leave_the_model_untouched(tiny_model):
    prior = tiny_prior(tiny_model)
    del prior["model.layers.1.mlp.down_proj"]
    with pytest.raises(PatchsparseError, match="no mask for layer"):
        attach_masks(tiny_model, tiny_config(), prior)
    with pytest.raises(PatchsparseError, match="needs a prior"):
        attach_masks(tiny_model, tiny_config("patch-tile"), None)
    assert not find_masks(tiny_model)
    assert not any(parametrize.is_parametrized(m) for m in tiny_model.modules())


def test_fp32_logits_under_a_bf16_model(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer)).to(torch.bfloat16)
    masked = attach_masks(model, tiny_config(), tiny_prior(model))
    mask = next(iter(masked.masks.values()))
    assert mask.pattern_logits.dtype == torch.float32 and mask.tile_logits.dtype == torch.float32
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16  # the parametrized weight keeps the model's dtype
    x = torch.randint(0, len(tiny_tokenizer), (1, 8))
    model(input_ids=x, labels=x).loss.backward()
    assert mask.pattern_logits.grad.dtype == torch.float32 and mask.tile_logits.grad.dtype == torch.float32


def test_pattern_prior_overwrite_values():
    keep = torch.tensor([[True, False, True, False]])  # pattern 1010 = index 1; complement 0101 = index 4
    assert pattern_overlap(keep).tolist() == [[[1, 2, 1, 1, 0, 1]]]
    logits = init_pattern_logits((1, 4), keep, std=0.014, strength=3.0, generator=torch.Generator())
    torch.testing.assert_close(logits, torch.tensor([[[0.0, 0.042, 0.0, 0.0, -0.042, 0.0]]]))


def test_tile_prior_initialisation(tiny_model):
    config = tiny_config(sparsity=0.25)  # half of each layer's weights start in dense tiles
    masked = attach_masks(tiny_model, config, tiny_prior(tiny_model, 0.25))
    for mask in masked.masks.values():
        dense = mask.tile_logits.detach() > 0
        weights = float((mask.tile_numel * dense).sum())
        assert weights == pytest.approx(0.5 * mask.numel, abs=float(mask.tile_numel.max()))
        # prior ±σα = ±0.042 on top of N(0, 0.014²)
        assert float(mask.tile_logits.detach().abs().min()) > 0.0
        assert float(mask.tile_logits.detach().abs().mean()) == pytest.approx(0.042, abs=0.01)


def test_hard_mode_equals_the_threshold_masks_applied(tiny_model, tiny_tokenizer):
    from patchsparse.extract import extract_masks

    masked = attach_masks(tiny_model, tiny_config(), tiny_prior(tiny_model))
    with torch.no_grad():
        for m in masked.masks.values():  # move the logits away from the prior
            m.tile_logits.normal_(0, 1)
            m.pattern_logits.normal_(0, 1)
    masked.sampler.mode = HARD
    x = torch.randint(0, len(tiny_tokenizer), (1, 12))
    with torch.no_grad():
        hard_logits = tiny_model(input_ids=x).logits
    spec = extract_masks(tiny_model, "threshold")
    remove_masks(tiny_model)
    spec.apply_(tiny_model)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(input_ids=x).logits, hard_logits)


def test_edges_initial_allocation_starts_from_dense_edge_blocks():
    """`init_allocation="edges"`: the tile prior starts the first and last blocks dense and the
    others all 2:4, as many 2:4 blocks as make the target over equal blocks; the threshold-extracted
    start is that allocation but for the noise of the logits. The default starts every layer at the target."""
    from dataclasses import replace as dc_replace

    from patchsparse.learn.masked import initial_layer_sparsity
    from patchsparse.masks.tiles import TileGrid

    names = [f"model.layers.{b}.mlp.{p}" for b in range(10) for p in ("up_proj", "down_proj")]
    config = tiny_config("patch-tile", sparsity=0.3).mask
    assert set(initial_layer_sparsity(names, config).values()) == {0.3}
    edges = initial_layer_sparsity(names, dc_replace(config, init_allocation="edges"))
    # 10 blocks at 0.3: 6 blocks at 2:4 (0.5 · 6/10); dense: the first two and the last two
    assert {int(n.split(".")[2]) for n, s in edges.items() if s == 0.0} == {0, 1, 8, 9}
    assert {int(n.split(".")[2]) for n, s in edges.items() if s == 0.5} == {2, 3, 4, 5, 6, 7}
    with pytest.raises(PatchsparseError, match="initial allocation"):
        dc_replace(config, init_allocation="owl").check()

    model = build_tiny_llama(300)
    cfg = tiny_config("patch-tile", sparsity=0.25)
    cfg = dc_replace(cfg, mask=dc_replace(cfg.mask, init_allocation="edges"))
    masked = attach_masks(model, cfg, tiny_prior(model, 0.25))
    blocks = {int(name.split(".")[2]) for name in masked.masks}
    assert blocks == {0, 1}                                   # the tiny model: 2 blocks, 1 of them 2:4 at 25%
    # the prior is ±σα on top of N(0, σ²) logits (α = 3), so a tile in a thousand starts on the other side
    share = {b: torch.cat([(m.tile_logits > 0).flatten().float() for n, m in masked.masks.items()
                           if n.split(".")[2] == str(b)]).mean().item() for b in blocks}
    assert share[0] > 0.97 and share[1] < 0.03
    assert all(isinstance(m.grid, TileGrid) for m in masked.masks.values())
