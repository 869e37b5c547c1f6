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


def _first_block_error(model, masked, windows, mode, weights=None):
    """Block 0's relative error against the dense block, masks in `mode`, on `weights` (under the
    masks) if given, else on the model's own."""
    _, layers = decoder_layers(model)
    masked.sampler.mode = OFF
    inputs = capture_layer_inputs(model, windows, layers, batch_size=2)
    x = inputs.hidden.clone()
    target = inputs.outputs(layers[0], 0, x)
    originals = {name: model.get_submodule(name).parametrizations.weight.original for name in masked.masks}
    dense = {name: w.detach().clone() for name, w in originals.items()}
    masked.sampler.mode = mode
    try:
        with torch.no_grad():
            for name, w in originals.items():
                if weights is not None:
                    w.copy_(weights[name])
        output = inputs.outputs(layers[0], 0, x)
    finally:
        with torch.no_grad():
            for name, w in originals.items():
                w.copy_(dense[name])
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
                             on_block_end=lambda b, m: seen.append(b)).masked
    assert seen == [0, 1]
    after = _first_block_error(model, masked, windows, HARD)
    assert after < 0.8 * before
    # extraction keeps the global target with tiles truly dense or 2:4
    spec = extract_masks(model, "exact", 0.35, mode)
    assert spec.sparsity() == pytest.approx(0.35, abs=0.03)
    remove_masks(model)


@pytest.mark.parametrize("settings", [{"steps": 0}, {"weight_lr": -1e-3}, {"weight_lr": float("nan")}])
def test_blockwise_settings_are_checked(tiny_tokenizer, settings):
    from patchsparse.errors import PatchsparseError

    model = build_tiny_llama(len(tiny_tokenizer))
    with pytest.raises(PatchsparseError):
        learn_blockwise(model, tiny_windows(len(tiny_tokenizer)), tiny_config("patch-tile"), tiny_prior(model),
                        BlockwiseConfig(**settings))


def test_weights_learned_with_the_masks_fit_the_block_better_and_leave_the_dense_model(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    windows = tiny_windows(vocab, n=8, seqlen=16)
    config = tiny_config("maskllm")
    frozen_model, joint_model = build_tiny_llama(vocab), build_tiny_llama(vocab)
    dense = {n: p.detach().clone() for n, p in joint_model.named_parameters()}
    frozen = learn_blockwise(frozen_model, windows, config, tiny_prior(frozen_model), BlockwiseConfig(steps=40))
    joint = learn_blockwise(joint_model, windows, config, tiny_prior(joint_model),
                            BlockwiseConfig(steps=40, weight_lr=1e-3))
    assert frozen.weights is None
    assert set(joint.weights) == set(joint.masked.masks)
    frozen_error = _first_block_error(frozen_model, frozen.masked, windows, HARD)
    joint_error = _first_block_error(joint_model, joint.masked, windows, HARD, joint.weights)
    assert joint_error < 0.75 * frozen_error  # weights that compensate for the mask they learn with
    # the model keeps its dense weights (the targets, and what the caller expects back)
    remove_masks(joint_model)
    for name, param in joint_model.named_parameters():
        assert torch.equal(param, dense[name]), name
        assert not param.requires_grad
    for name, weight in joint.weights.items():
        assert not torch.equal(weight, dense[f"{name}.weight"])  # every masked layer's weights moved


def test_a_failure_while_weights_learn_leaves_the_dense_weights(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    model = build_tiny_llama(vocab)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}

    def stop(block, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        learn_blockwise(model, tiny_windows(vocab, n=4), tiny_config("maskllm"), tiny_prior(model),
                        BlockwiseConfig(steps=3, weight_lr=1e-3), on_block_end=stop)
    remove_masks(model)
    for name, param in model.named_parameters():
        assert torch.equal(param, dense[name]), name
