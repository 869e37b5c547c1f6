import gc

import torch

from patchsparse.models import decoder_layers
from patchsparse.prior.layerwise import capture_layer_inputs
from patchsparse.prior.oneshot import prune_model
from patchsparse.prior.pattern import PrunePattern
from patchsparse.prior.pruners import wanda_mask
from patchsparse.prior.stats import InputNormStat
from tests.conftest import build_tiny_llama


def windows(n=6, seqlen=24, vocab=320, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_running_captured_inputs_through_every_layer_reproduces_the_model():
    model = build_tiny_llama(320, layers=3)
    ids = windows(5)
    _, layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, ids, layers[0], batch_size=2)  # batches of 2, 2 and 1
    assert inputs.hidden.shape == (5, 24, 64)
    torch.testing.assert_close(inputs.hidden, model.model.embed_tokens(ids))
    assert "position_embeddings" in inputs.kwargs[2] and set(inputs.kwargs) == {1, 2}
    for layer in layers:
        inputs.run(layer, write_outputs=True)
    with torch.no_grad():
        expected = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(model.model.norm(inputs.hidden), expected, rtol=1e-4, atol=1e-5)


def wanda_masks_of_block(model, ids, block):
    """Wanda 2:4 masks of one block's linears, from a plain forward of `model` with hooks."""
    linears = {n: m for n, m in model.named_modules() if n.startswith(f"model.layers.{block}.") and isinstance(m, torch.nn.Linear)}
    stats = {n: InputNormStat(m.in_features) for n, m in linears.items()}
    handles = [m.register_forward_pre_hook(lambda mod, args, s=stats[n]: s.accumulate(args[0])) for n, m in linears.items()]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return {n: wanda_mask(m.weight, stats[n].norms(), PrunePattern.nm(2, 4)) for n, m in linears.items()}


def test_each_layer_is_calibrated_on_the_pruned_outputs_of_the_layers_before():
    ids = windows(4)
    model = build_tiny_llama(320, layers=2)
    spec = prune_model(model, ids, "wanda", "2:4", batch_size=3)

    reference = build_tiny_llama(320, layers=2)
    dense_block1 = wanda_masks_of_block(reference, ids, 1)
    for name, keep in wanda_masks_of_block(reference, ids, 0).items():
        assert torch.equal(spec.layers[name].sparse_keep, keep), name
    # prune block 0 of the reference by hand; block 1's statistics then come from its outputs
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name.startswith("model.layers.0.") and isinstance(module, torch.nn.Linear):
                module.weight.mul_(spec.layers[name].sparse_keep)
    sequential_block1 = wanda_masks_of_block(reference, ids, 1)
    for name, keep in sequential_block1.items():
        assert torch.equal(spec.layers[name].sparse_keep, keep), name
    # and that differs from calibrating block 1 on the dense model's activations
    assert any(not torch.equal(dense_block1[n], sequential_block1[n]) for n in dense_block1)


def activation_bytes(seqlen, hidden):
    """Bytes of live tensors shaped like calibration activations (…, seqlen, hidden), storage counted once."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.dim() >= 2 and tuple(obj.shape[-2:]) == (seqlen, hidden):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_calibration_holds_one_layer_of_activations():
    n, seqlen, hidden, depth = 8, 24, 64, 4
    model = build_tiny_llama(320, layers=depth)
    _, layers = decoder_layers(model)
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: seen.append(activation_bytes(seqlen, hidden)))
             for layer in layers]
    prune_model(model, windows(n, seqlen), "sparsegpt", "2:4", batch_size=4)
    for h in hooks:
        h.remove()
    one_layer = n * seqlen * hidden * 4  # fp32 inputs of one layer for every window
    # 2 capture calls of layer 0, then each layer is called per batch for statistics and for
    # outputs (the last layer's outputs are not needed)
    assert len(seen) == 2 + depth * 2 * 2 - 2
    calls = seen[2:]
    assert min(calls) >= one_layer  # the counter does see the activation buffer
    # inputs + outputs of one layer at most; keeping every layer's would grow towards depth x one_layer
    assert max(calls) <= 2 * one_layer, (max(calls), one_layer)
