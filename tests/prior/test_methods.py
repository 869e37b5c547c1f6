"""The pruner registry: the built-in methods by name, and a new method added as one class plus one registration."""

import pytest
import torch

from patchsparse.errors import PatchsparseError
from patchsparse.learn.priors import magnitude_prior
from patchsparse.masks import unstructured_mask_from_scores
from patchsparse.masks.patterns import nm_mask_from_scores
from patchsparse.masks.tiles import TileGrid
from patchsparse.models import select_linears
from patchsparse.prior.methods import PRUNERS, Pruner, get_pruner, pruner_names, register
from patchsparse.prior.oneshot import compute_prior, prune_model
from tests.conftest import build_tiny_llama


class KeepFirst(Pruner):
    """A toy method: keeps the first inputs of each group (scores fall with the input's position)."""

    name = "keep-first"

    def mask(self, weight, stat, pattern, options, force_keep=None):
        position = torch.arange(weight.shape[1], 0, -1, dtype=torch.float32, device=weight.device)
        return pattern.select(position.expand(weight.shape).clone()), None


class CountTokens(Pruner):
    """A toy method with a calibration statistic: counts the tokens each linear saw, prunes like magnitude."""

    name = "count-tokens"
    needs_statistic = True
    seen: dict = {}

    class Stat:
        def __init__(self):
            self.tokens = 0

        def accumulate(self, x):
            self.tokens += x.reshape(-1, x.shape[-1]).shape[0]

    def statistic(self, linear):
        return self.Stat()

    def mask(self, weight, stat, pattern, options, force_keep=None):
        self.seen[weight.shape] = stat.tokens
        return get_pruner("magnitude").mask(weight, None, pattern, options)


@pytest.fixture
def registered():
    added = []

    def add(pruner):
        added.append(register(pruner).name)
        return pruner

    yield add
    for name in added:
        PRUNERS.pop(name)


def test_the_built_in_methods_and_their_cli_choices():
    assert pruner_names() == ("magnitude", "wanda", "sparsegpt")
    with pytest.raises(PatchsparseError, match="unknown pruning method 'obs'"):
        get_pruner("obs")
    with pytest.raises(PatchsparseError, match="new name"):
        register(type("Again", (Pruner,), {"name": "wanda"})())


def test_a_new_pruner_is_one_class_and_one_registration(registered):
    registered(KeepFirst())
    assert pruner_names()[-1] == "keep-first"
    model = build_tiny_llama(320)
    before = {n: l.weight.detach().clone() for n, l in select_linears(model).items()}
    spec = prune_model(model, None, "keep-first", "2:4")
    assert spec.metadata["method"] == "keep-first" and not spec.metadata["weights_updated"]
    for name, linear in select_linears(model).items():
        keep = spec.layers[name].sparse_keep
        expected = torch.tensor([True, True, False, False]).repeat(keep.shape[1] // 4).expand(keep.shape)
        assert torch.equal(keep, expected)
        assert torch.equal(linear.weight, before[name] * expected)
    # and as the prior of mask learning, through compute_prior
    prior = compute_prior(build_tiny_llama(320), None, "keep-first", 0.25, (16, 16))
    assert all(torch.equal(p.nm_keep, spec.layers[n].sparse_keep) for n, p in prior.items())


def test_a_new_pruner_with_a_statistic_gets_calibrated(registered):
    registered(CountTokens())
    model = build_tiny_llama(320)
    with pytest.raises(PatchsparseError, match="count-tokens needs calibration windows"):
        prune_model(model, None, "count-tokens", "2:4")
    windows = torch.randint(0, 320, (3, 10), generator=torch.Generator().manual_seed(0))
    CountTokens.seen.clear()
    spec = prune_model(model, windows, "count-tokens", "2:4")
    assert set(CountTokens.seen.values()) == {30}  # every linear saw all 3 x 10 tokens
    assert spec.metadata["calibration_windows"] == 3


def test_magnitude_prior_is_the_registry_magnitude_by_hand():
    model = build_tiny_llama(320)
    tile = (16, 12)
    prior = magnitude_prior(model, 0.4, tile)
    for name, linear in select_linears(model).items():
        scores = linear.weight.detach().abs()
        grid = TileGrid.for_weight(scores, tile)
        kept = unstructured_mask_from_scores(scores, 0.4).float()
        torch.testing.assert_close(prior[name].tile_scores, grid.reduce_sum(kept) / grid.tile_numel(), rtol=0, atol=0)
        assert torch.equal(prior[name].nm_keep, nm_mask_from_scores(scores))
