import dataclasses

from patchsparse.learn.config import OptimConfig, TrainConfig, with_overrides


def test_with_overrides_skips_none_and_sets_the_rest():
    base = TrainConfig(steps=10, batch_size=4)
    changed = with_overrides(base, steps=3, batch_size=None, seed=7)
    assert (changed.steps, changed.batch_size, changed.seed) == (3, 4, 7)
    assert base.steps == 10  # frozen: a new object
    # `dataclasses.replace` would set the None: the reason this helper has its own name
    assert dataclasses.replace(base, batch_size=None).batch_size is None
    assert with_overrides(OptimConfig(), lr=None) == OptimConfig()
