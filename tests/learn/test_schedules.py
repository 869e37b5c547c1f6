import math

import pytest

from patchsparse.learn.config import LinearSchedule
from patchsparse.learn.schedules import cosine_lr, linear_value, progress_fraction, weight_reg_decay


def test_linear_schedule_hand_values():
    tau = LinearSchedule(4.0, 0.05)
    assert tau.at(0, 11) == 4.0
    assert tau.at(10, 11) == pytest.approx(0.05)          # the last step reaches the end value
    assert tau.at(5, 11) == pytest.approx(2.025)          # halfway
    assert linear_value(100, 500, 1, 5) == pytest.approx(200.0)
    assert progress_fraction(0, 1) == 1.0                 # a one-step run trains at the end values


def test_cosine_lr_hand_values():
    lr = 1e-3
    assert cosine_lr(0, 105, lr, 5) == pytest.approx(2e-4)     # warm-up: (t + 1)/5
    assert cosine_lr(4, 105, lr, 5) == pytest.approx(1e-3)
    assert cosine_lr(5, 105, lr, 5) == pytest.approx(1e-3)     # cosine starts at the top
    assert cosine_lr(55, 105, lr, 5) == pytest.approx(5e-4)    # halfway down
    assert cosine_lr(104, 105, lr, 5) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert cosine_lr(55, 105, lr, 5, min_lr_ratio=0.1) == pytest.approx(1e-4 + 0.9 * 5e-4)


def test_weight_reg_decay():
    assert weight_reg_decay(0, 10) == 1.0
    assert weight_reg_decay(5, 10) == 0.5
