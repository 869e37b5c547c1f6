"""Data-parallel mask learning: `torchrun --nproc_per_node N patchsparse learn ...`.

Every rank holds the frozen model and the same mask logits. Each global micro-batch is cut into
`N` disjoint, contiguous slices, one per rank; each rank back-propagates its slice, the logit
gradients are averaged across ranks (one flat all-reduce per optimizer step, after the
micro-batches), and every rank takes the same optimizer step, so the logits stay identical.
Rank 0 alone writes files and shows progress.

Why this reproduces one process: the LM loss is a mean over tokens and every slice holds the
same number of tokens, so the mean of the ranks' gradients is the gradient of the global
micro-batch; the Gumbel noise is a function of (step, layer) shared by all ranks; the
regularisers depend on the logits only, which are identical on every rank.

`shard_optimizer` keeps each rank's share of Adam's moments only (ZeRO stage 1 through
`torch.distributed.optim.ZeroRedundancyOptimizer`): for maskllm and patch-joint, whose logits
are as many as 1.5 per weight, that divides the largest piece of the training state by N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

from patchsparse.errors import PatchsparseError


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def slice(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global micro-batch. (B, T) -> (B / world, T)"""
        if not self.active:
            return batch
        rows = batch.shape[0]
        if rows % self.world:
            raise PatchsparseError(f"a micro-batch of {rows} windows cannot be split evenly over {self.world} "
                                   f"processes; make --batch a multiple of {self.world}")
        share = rows // self.world
        return batch[self.rank * share: (self.rank + 1) * share]

    def average_gradients_(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over the ranks (one coalesced all-reduce)."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean(self, value: float) -> float:
        """Mean of a scalar over the ranks (for logging the global loss)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = DataParallel()


def from_environment(device_type: str = "cpu") -> DataParallel:
    """The process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK),
    initialised on first use; a plain launch gives the single-process `SINGLE`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_available():
        raise PatchsparseError("this torch build has no torch.distributed; run a single process")
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise PatchsparseError("the process group does not match RANK / WORLD_SIZE of the environment")
    return DataParallel(rank, world, local_rank)


def make_optimizer(params: list, parallel: DataParallel, shard: bool, **adamw) -> torch.optim.Optimizer:
    """AdamW over the logits (parameters or param groups); with `shard` (and several ranks) each rank
    keeps only its share of the state."""
    if shard and parallel.active:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **adamw)
    return torch.optim.AdamW(params, **adamw)


def optimizer_state_for_checkpoint(optimizer: torch.optim.Optimizer, parallel: DataParallel) -> dict | None:
    """The full optimizer state on rank 0 (gathered from the shards when sharded); None elsewhere.
    Every rank must call it: gathering the shards is collective."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if parallel.is_main else None
    return optimizer.state_dict() if parallel.is_main else None
