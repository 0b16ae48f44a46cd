"""Inside the workers of a data-parallel fine-tune (`accelerate launch`, see `tunelab.finetune.launch`):
the rank and world size, each rank's share of a batch, and the collectives the training loop calls.
With one process (`WORLD_SIZE` unset or 1) nothing here talks to anyone.
"""

from __future__ import annotations

import os
from typing import Any


def device() -> str:
    """Where training runs: the GPU when there is one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed is initialized with several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def init_distributed() -> tuple[int, int]:
    """Join the process group `accelerate launch` (torchrun) described in the environment: nccl
    on GPUs, gloo on CPUs. Returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def shard(batch: list[int], rank: int, size: int) -> list[int]:
    """This rank's share of a global batch (every size-th example, starting at rank)."""
    return batch[rank::size]


def broadcast_params(model) -> None:
    """Start every replica from rank 0's trainable weights."""
    import torch.distributed as dist

    for p in model.parameters():
        if p.requires_grad:
            dist.broadcast(p.data, src=0)


def sum_gradients(model) -> None:
    """Sum the trainable weights' gradients across ranks (one flat all-reduce). A rank whose share
    of a batch was empty contributes zeros."""
    import torch
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def sum_values(*values: float) -> list[float]:
    """Numbers summed across ranks (the step's loss and token counts, for logging)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.tolist()


def from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (e.g. a validation result)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
