"""Distillation from the dense model: the loss's hand values, the teacher, and its place in a step."""

import math
from dataclasses import replace

import pytest
import torch

from patchsparse.errors import PatchsparseError
from patchsparse.learn import learn_masks
from patchsparse.learn.config import ObjectiveConfig
from patchsparse.learn.masked import OFF, SAMPLE, attach_masks
from patchsparse.learn.objective import distillation_loss
from patchsparse.learn.trainer import dense_logits, make_optimizer, train_step

from tests.conftest import build_tiny_llama
from tests.learn.helpers import tiny_config, tiny_prior, tiny_windows


def test_distillation_loss_hand_values():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # p = (3/4, 1/4), q = (1/2, 1/2)
    # KL(p‖q) = 3/4·ln(3/2) + 1/4·ln(1/2) = 0.1308121
    assert float(distillation_loss(student, teacher, 1.0)) == pytest.approx(0.1308121, abs=1e-6)
    # T = 2: p = (√3, 1)/(1 + √3) = (0.6339746, 0.3660254); T²·KL = 4·0.0363408 = 0.1453631
    assert float(distillation_loss(student, teacher, 2.0)) == pytest.approx(0.1453631, abs=1e-6)
    # direction matters: KL(q‖p) = 1/2·ln(2/3) + 1/2·ln(2) = 0.1438410, not the same
    assert float(distillation_loss(teacher, student, 1.0)) == pytest.approx(0.1438410, abs=1e-6)


def test_distillation_loss_is_a_mean_over_positions():
    student = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])            # (B=1, T=2, V=2)
    teacher = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # second position agrees: KL 0
    assert float(distillation_loss(student, teacher)) == pytest.approx(0.1308121 / 2, abs=1e-6)


def test_teacher_is_the_unmasked_model_and_matches_it_exactly(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer))
    batch = tiny_windows(len(tiny_tokenizer), n=2)
    with torch.no_grad():
        reference = model(input_ids=batch, use_cache=False).logits
    masked = attach_masks(model, tiny_config("patch-joint"), tiny_prior(model))
    masked.sampler.mode = SAMPLE
    teacher = dense_logits(model, masked, batch)
    assert masked.sampler.mode == SAMPLE  # restored
    assert torch.equal(teacher, reference)
    # masks all off: the student is the teacher and the loss is exactly zero
    masked.sampler.mode = OFF
    with torch.no_grad():
        student = model(input_ids=batch, use_cache=False).logits
    assert float(distillation_loss(student, teacher, 2.0)) == 0.0
    # masks on: the student differs, the loss is positive
    masked.sampler.mode = SAMPLE
    with torch.no_grad():
        student = model(input_ids=batch, use_cache=False).logits
    assert float(distillation_loss(student, teacher)) > 1e-4


def _one_step(tiny_tokenizer, distill: float):
    model = build_tiny_llama(len(tiny_tokenizer))
    config = tiny_config("patch-joint", steps=2)
    config = replace(config, objective=replace(config.objective, distill=distill, distill_temperature=2.0,
                                               sparse_reg=0.0, weight_reg=0.0))
    masked = attach_masks(model, config, tiny_prior(model))
    optimizer = make_optimizer(masked, config)
    batches = [tiny_windows(len(tiny_tokenizer), n=2)]
    model.train()
    metrics = train_step(model, masked, optimizer, config, 0, batches)
    return metrics, masked


def test_a_step_trains_on_the_mixed_task_loss(tiny_tokenizer):
    pure_lm, lm_masks = _one_step(tiny_tokenizer, 0.0)
    assert pure_lm["kd_loss"] is None
    assert pure_lm["loss"] == pytest.approx(pure_lm["lm_loss"])
    half, half_masks = _one_step(tiny_tokenizer, 0.5)
    assert half["kd_loss"] > 0
    assert half["lm_loss"] == pytest.approx(pure_lm["lm_loss"], rel=1e-5)  # same masks, same noise before the update
    assert half["loss"] == pytest.approx(0.5 * half["lm_loss"] + 0.5 * half["kd_loss"], rel=1e-6)
    # the KD term reaches the logits: the update differs from the pure-LM one
    name = next(iter(lm_masks.masks))
    assert not torch.allclose(lm_masks.masks[name].pattern_logits, half_masks.masks[name].pattern_logits)


def test_distillation_reduces_the_kl_to_the_dense_model(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    windows = tiny_windows(vocab, n=16)
    config = tiny_config("patch-tile", steps=12, grad_accum=1)
    config = replace(config, objective=replace(config.objective, distill=1.0, weight_reg=0.0))
    model = build_tiny_llama(vocab)
    result = learn_masks(model, windows, config, tiny_prior(model))
    first = learn_masks(build_tiny_llama(vocab), windows, replace(config, train=replace(config.train, steps=1)),
                        tiny_prior(model)).last_metrics["kd_loss"]
    assert result.last_metrics["kd_loss"] < first


@pytest.mark.parametrize("alpha, temperature", [(-0.1, 1.0), (1.5, 1.0), (0.5, 0.0)])
def test_bad_distillation_settings_are_refused(alpha, temperature):
    with pytest.raises(PatchsparseError):
        ObjectiveConfig(distill=alpha, distill_temperature=temperature).check()
