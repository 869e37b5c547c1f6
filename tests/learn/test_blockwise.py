"""Block-wise mask learning: the loss's definition, and that learning a block reduces its output error."""

import pytest
import torch

from patchsparse.extract import extract_masks
from patchsparse.learn.blockwise import BlockwiseConfig, learn_blockwise
from patchsparse.learn.masked import HARD, OFF, remove_masks
from patchsparse.models.layers import decoder_layers
from patchsparse.prior.layerwise import capture_layer_inputs, relative_block_error

from tests.conftest import build_tiny_llama
from tests.learn.helpers import tiny_config, tiny_prior, tiny_windows


def test_relative_block_error_hand_value():
    x = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])   # the block adds ‖target − x‖² = 2
    output = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])   # off by 1 in one place
    assert float(relative_block_error(output, target, x)) == pytest.approx(0.5)
    # relative to what the block adds, not to the residual stream it rides on
    assert float(relative_block_error(output + 10, target + 10, x + 10)) == pytest.approx(0.5)


def _first_block_error(model, masked, windows, mode):
    _, layers = decoder_layers(model)
    masked.sampler.mode = OFF
    inputs = capture_layer_inputs(model, windows, layers, batch_size=2)
    x = inputs.hidden.clone()
    target = inputs.outputs(layers[0], 0, x)
    masked.sampler.mode = mode
    output = inputs.outputs(layers[0], 0, x)
    return float(relative_block_error(output, target, x))


@pytest.mark.parametrize("mode", ["patch-tile", "patch-joint"])
def test_learning_a_block_reduces_its_output_error(tiny_tokenizer, mode):
    vocab = len(tiny_tokenizer)
    windows = tiny_windows(vocab, n=8, seqlen=16)
    config = tiny_config(mode, sparsity=0.35)
    untrained_model = build_tiny_llama(vocab)
    from patchsparse.learn.masked import attach_masks

    untrained = attach_masks(untrained_model, config, tiny_prior(untrained_model))
    before = _first_block_error(untrained_model, untrained, windows, HARD)
    model = build_tiny_llama(vocab)
    seen = []
    masked = learn_blockwise(model, windows, config, tiny_prior(model), BlockwiseConfig(steps=40, windows_per_step=2),
                             on_block_end=lambda b, m: seen.append(b))
    assert seen == [0, 1]
    after = _first_block_error(model, masked, windows, HARD)
    assert after < 0.8 * before
    # extraction keeps the global target with tiles truly dense or 2:4
    spec = extract_masks(model, "exact", 0.35, mode)
    assert spec.sparsity() == pytest.approx(0.35, abs=0.03)
    remove_masks(model)


def test_blockwise_settings_are_checked(tiny_tokenizer):
    from patchsparse.errors import PatchsparseError

    model = build_tiny_llama(len(tiny_tokenizer))
    with pytest.raises(PatchsparseError):
        learn_blockwise(model, tiny_windows(len(tiny_tokenizer)), tiny_config("patch-tile"), tiny_prior(model),
                        BlockwiseConfig(steps=0))
