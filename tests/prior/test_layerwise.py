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
    inputs = capture_layer_inputs(model, ids, layers, batch_size=2)  # batches of 2, 2 and 1
    assert inputs.hidden.shape == (5, 24, 64)
    torch.testing.assert_close(inputs.hidden, model.model.embed_tokens(ids))
    assert "position_embeddings" in inputs.kwargs[0][2] and set(inputs.kwargs[2]) == {1, 2}
    for index, layer in enumerate(layers):
        inputs.run(layer, index, write_outputs=True)
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
    # capture: the first batch reaches every layer (their arguments are recorded), the second
    # stops at layer 0; then each layer is called per batch for statistics and for outputs (the
    # last layer's outputs are not needed)
    assert len(seen) == depth + 1 + depth * 2 * 2 - 2
    calls = seen[depth + 1:]
    assert min(calls) >= one_layer  # the counter does see the activation buffer
    # inputs + outputs of one layer at most; keeping every layer's would grow towards depth x one_layer
    assert max(calls) <= 2 * one_layer, (max(calls), one_layer)


def test_mixed_attention_layers_are_calibrated_with_their_own_masks_and_positions():
    """Per-layer statistics of layer-by-layer calibration equal a plain forward of the model with hooks,
    on a Gemma-3 whose layers alternate a 4-token sliding window and full attention."""
    from patchsparse.prior.layerwise import calibrate_layer_by_layer
    from patchsparse.prior.stats import HessianStat
    from tests.families import build_family

    model = build_family("gemma3-mixed")
    assert len(set(model.config.layer_types)) == 2 and model.config.sliding_window < 16
    ids = windows(5, seqlen=16)
    linears = {n: m for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)}
    reference = {n: (InputNormStat(m.in_features), HessianStat(m.in_features)) for n, m in linears.items()}
    def feed(stats):
        def hook(module, args):
            for stat in stats:
                stat.accumulate(args[0])
        return hook

    handles = [m.register_forward_pre_hook(feed(reference[n])) for n, m in linears.items()]
    with torch.no_grad():
        model(input_ids=ids[:3])  # the same batches as the calibration below
        model(input_ids=ids[3:])
    for h in handles:
        h.remove()

    got = {}
    calibrate_layer_by_layer(model, ids, lambda linear: HessianStat(linear.in_features),
                             lambda index, block, stats: got.update(stats), batch_size=3)
    assert set(got) == set(linears)
    for name, (_, hessian) in reference.items():
        torch.testing.assert_close(got[name].hessian, hessian.hessian, rtol=1e-4, atol=1e-6, msg=name)

    # the check can fail: a full-attention layer fed the sliding layer's mask sees other inputs
    _, layers = decoder_layers(model)
    full = model.config.layer_types.index("full_attention")
    inputs = capture_layer_inputs(model, ids, layers, batch_size=3)
    for index in range(full):
        inputs.run(layers[index], index, write_outputs=True)
    name = f"model.layers.{full}.mlp.down_proj"
    wrong = InputNormStat(linears[name].in_features)
    handle = linears[name].register_forward_pre_hook(lambda mod, args: wrong.accumulate(args[0]))
    inputs.kwargs[full] = inputs.kwargs[0]
    inputs.run(layers[full], full, write_outputs=False)
    handle.remove()
    assert not torch.allclose(wrong.norms(), reference[name][0].norms(), rtol=1e-3)
