"""Data-parallel primitives on CPU with 2 gloo processes (spawned from the test)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from patchsparse.errors import PatchsparseError
from patchsparse.learn.distributed import (SINGLE, DataParallel, from_environment, make_optimizer,
                                           optimizer_state_for_checkpoint)

STEPS = 3
# torch.distributed.optim still imports torch.jit helpers that warn on import.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _toy_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS, 4, 10, generator=g)   # (steps, global batch, features)
    y = torch.randn(STEPS, 4, generator=g)
    w0 = torch.randn(10, generator=g)
    return x, y, w0


def _train(parallel: DataParallel, shard: bool) -> tuple[torch.Tensor, dict | None]:
    x, y, w0 = _toy_problem()
    w = torch.nn.Parameter(w0.clone())
    optimizer = make_optimizer([w], parallel, shard, lr=0.1, betas=(0.9, 0.95), weight_decay=0.01)
    for step in range(STEPS):
        xs, ys = parallel.slice(x[step]), parallel.slice(y[step])
        loss = ((xs @ w - ys) ** 2).mean()  # a mean over this rank's rows, like the LM loss
        loss.backward()
        parallel.average_gradients_([w])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return w.detach().clone(), optimizer_state_for_checkpoint(optimizer, parallel)


def _worker(rank: int, world: int, port: int, shard: bool, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    parallel = from_environment("cpu")
    w, state = _train(parallel, shard)
    torch.save({"w": w, "state": state, "mean": parallel.mean(float(rank))}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("shard", [False, True])
def test_two_processes_match_one(tmp_path, shard):
    single_w, single_state = _train(SINGLE, shard=False)
    mp.spawn(_worker, args=(2, _free_port(), shard, str(tmp_path / "r")), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"r.{rank}", weights_only=False) for rank in range(2)]
    for r in results:
        torch.testing.assert_close(r["w"], single_w, rtol=1e-5, atol=1e-6)
        assert r["mean"] == 0.5
    assert torch.equal(results[0]["w"], results[1]["w"])  # the ranks never drift apart
    # Rank 0 holds the whole optimizer state for the checkpoint, gathered from the shards if sharded.
    state = results[0]["state"]
    assert results[1]["state"] is None
    torch.testing.assert_close(state["state"][0]["exp_avg"], single_state["state"][0]["exp_avg"], rtol=1e-5, atol=1e-7)


def test_slices_are_disjoint_and_cover_the_batch():
    batch = torch.arange(12).view(6, 2)
    parts = [DataParallel(rank, 3).slice(batch) for rank in range(3)]
    assert torch.equal(torch.cat(parts), batch)
    assert SINGLE.slice(batch) is batch
    with pytest.raises(PatchsparseError, match="multiple of 4"):
        DataParallel(1, 4).slice(batch)


def test_plain_launch_is_single(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert from_environment() == SINGLE and SINGLE.is_main and not SINGLE.active
