"""DDP plumbing for ``torchrun``: who am I, start/stop the process group, sums across ranks.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) everything here is a no-op, so the
training loop has one code path for one process and for many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, differentiable (gradients flow back to every rank's contribution)."""
        return _AllReduceSum.apply(tensor) if self.enabled else tensor

    def mean_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average of a detached tensor over ranks (for logging and agreeing on decisions)."""
        if not self.enabled:
            return tensor
        reduced = tensor.detach().clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


class _AllReduceSum(torch.autograd.Function):
    """``y = sum over ranks of x``, on every rank. Every rank's loss depends on y, so the gradient of
    the ranks' summed loss w.r.t. this rank's x is the sum over ranks of dL/dy: an all-reduce again
    (DDP then averages parameter gradients, i.e. differentiates the mean of the ranks' losses)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        summed = grad.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed


def context_from_env() -> DistributedContext:
    """Rank, world size and local rank as torchrun sets them (0, 1, 0 outside torchrun)."""
    return DistributedContext(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def start_process_group(context: DistributedContext, device: torch.device) -> None:
    """Join torchrun's process group: NCCL between GPUs, gloo on the CPU."""
    if context.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def stop_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
