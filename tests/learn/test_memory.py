import pytest

from patchsparse.learn.memory import (GIB, PRECISIONS, ActivationEstimate, ModelShape, mask_logit_counts,
                                      model_shape_of, plan_memory, state_bytes)


def test_logit_counts_hand_checked():
    # 8 x 16 weight: 8 rows x 4 groups x 6 patterns; tiles 4x8 -> 2 x 2 grid; ragged 10 x 18 -> 3 x 3.
    assert mask_logit_counts((8, 16), "maskllm", (4, 8)) == (192, 0)
    assert mask_logit_counts((8, 16), "patch-tile", (4, 8)) == (0, 4)
    assert mask_logit_counts((8, 16), "patch-joint", (4, 8)) == (192, 4)
    assert mask_logit_counts((10, 20), "patch-tile", (4, 8)) == (0, 9)
    with pytest.raises(ValueError):
        mask_logit_counts((8, 16), "magnitude", (4, 8))


def test_bytes_per_weight_by_mode():
    shapes = [(4096, 4096), (11008, 4096)]
    fp32 = PRECISIONS["fp32"]
    # maskllm: 1.5 logits per weight x (4 value + 4 grad + 8 Adam) = 24 B
    assert state_bytes(shapes, "maskllm", (128, 128), fp32).per_weight == pytest.approx(24.0)
    # the published bf16 state: 1.5 x (2 + 2 + 4) = 12 B
    assert state_bytes(shapes, "maskllm", (128, 128), PRECISIONS["bf16"]).per_weight == pytest.approx(12.0)
    # patch-tile: 16 B per 128x128 tile (4096 and 11008 = 86 x 128) plus the bool 2:4 mask, 1 B per weight
    tile = state_bytes(shapes, "patch-tile", (128, 128), fp32)
    assert tile.tile_logits == 32 * 32 + 86 * 32
    assert tile.per_weight == pytest.approx(1.0 + 16 / 128 ** 2)
    assert state_bytes(shapes, "patch-tile", (128, 128), fp32, frozen_mask="packed").per_weight == pytest.approx(
        0.125 + 16 / 128 ** 2)
    joint = state_bytes(shapes, "patch-joint", (128, 128), fp32)
    assert joint.per_weight == pytest.approx(24.0 + 16 / 128 ** 2)  # joint learns its 2:4 part: no frozen mask


def _shape():
    # two blocks; block 1 is the larger one
    return ModelShape("toy", {"model.layers.0.mlp.up_proj": (8, 16), "model.layers.1.mlp.up_proj": (16, 16)},
                      other_params=100, hidden=16, intermediate=32, layers=2, vocab=50)


def test_plan_sharding_and_offload():
    shape = _shape()
    fp32 = PRECISIONS["fp32"]
    n_logits = (8 * 4 + 16 * 4) * 6
    single = plan_memory(shape, "maskllm", fp32, tile=(4, 4))
    assert single.device == {"weights": (128 + 256 + 100) * 2, "logits": n_logits * 4, "grads": n_logits * 4,
                             "optim": n_logits * 8}
    zero1 = plan_memory(shape, "maskllm", fp32, "zero1", ranks=4, tile=(4, 4))
    assert zero1.device["optim"] == n_logits * 8 / 4 and zero1.device["grads"] == n_logits * 4
    zero2 = plan_memory(shape, "maskllm", fp32, "zero2", ranks=4, tile=(4, 4))
    assert zero2.device["grads"] == n_logits * 4 / 4 and zero2.device["logits"] == n_logits * 4
    fsdp = plan_memory(shape, "maskllm", fp32, "fsdp", ranks=4, tile=(4, 4))
    assert fsdp.device["logits"] == n_logits * 4 / 4 and fsdp.device["weights"] == (128 + 256 + 100) * 2 / 4
    assert fsdp.device["gathered_blocks"] == 2 * 256 * (2 + 1.5 * 4)  # two blocks of 256 weights in flight
    offload = plan_memory(shape, "maskllm", PRECISIONS["bf16-offload"], tile=(4, 4))
    assert offload.host == {"master": n_logits * 4, "optim": n_logits * 8}
    assert offload.device["logits"] == n_logits * 2 and "optim" not in offload.device
    assert offload.fits(offload.device_total) and not offload.fits(offload.device_total - 1)


def test_activation_estimate():
    est = ActivationEstimate(batch=2, seqlen=8, mask_bytes_per_weight=10)
    pieces = est.pieces(_shape())
    assert pieces == {"checkpoints": 2 * 16 * 16 * 2, "block": 16 * (8 * 16 + 4 * 32) * 2,
                      "loss": 16 * 50 * 10, "masks": 256 * 10}


def test_model_shape_of_tiny(tiny_model):
    shape = model_shape_of(tiny_model, "tiny")
    assert len(shape.linears) == 2 * 7 and shape.layers == 2
    total = sum(p.numel() for p in tiny_model.parameters())  # tied embeddings are counted once
    assert shape.masked_weights + shape.other_params == total
    assert plan_memory(shape, "patch-tile", PRECISIONS["fp32"]).device_total < GIB
