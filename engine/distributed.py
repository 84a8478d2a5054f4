"""Splitting a run's batches among the processes that ``torchrun`` starts.

Each rank runs every model on its share of the batches (batch ``b`` belongs to rank
``b mod world_size``), accumulates its HSIC sums, and one all-reduce adds the sums of
all ranks. Ranks use NCCL on their local GPU, or gloo on the CPU.
"""

import dataclasses
import datetime
import logging
import os

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "all_reduce_sum", "init_distributed", "shutdown"]

logger = logging.getLogger(__name__)

# Long enough for the slowest rank to finish its forward passes before the all-reduce.
_TIMEOUT = datetime.timedelta(hours=6)


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """The position of this process among the processes of one run.

    Attributes:
        rank: global index of this process, 0 for a single process.
        world_size: number of processes.
        local_rank: index of this process on its machine, which picks its GPU.
        backend: ``"nccl"``, ``"gloo"``, or ``""`` for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """Whether this process writes the files and shows progress."""
        return self.rank == 0

    def batches(self, count: int) -> list[int]:
        """Return the indices of this rank's share of ``count`` batches."""
        return list(range(self.rank, count, self.world_size))

    def device(self, requested: str) -> str:
        """Return this rank's device: its local GPU when the run uses CUDA."""
        if self.world_size > 1 and requested.startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return requested


def init_distributed(use_cuda: bool) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment.

    Without ``torchrun`` (no ``WORLD_SIZE`` above 1) nothing is initialised and the
    context describes a single process.

    Args:
        use_cuda: the run asked for a CUDA device and CUDA is available, so NCCL is used.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()

    backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=_TIMEOUT)
    context = DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    logger.info("rank %d of %d (%s)", context.rank, context.world_size, backend)
    return context


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Return the element-wise sum of ``tensor`` over all ranks, on the CPU in its dtype."""
    if context.world_size <= 1:
        return tensor
    device = torch.device("cuda", context.local_rank) if context.backend == "nccl" else torch.device("cpu")
    reduced = tensor.to(device).clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def shutdown(context: DistributedContext) -> None:
    """Leave the process group, if this process joined one."""
    if context.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
