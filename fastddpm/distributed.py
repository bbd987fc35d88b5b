"""torch.distributed as fastddpm uses it: the process group torchrun describes, and the few
collectives the trainer and the sampler need (on Gloo and NCCL alike)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device: str | torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device). Under torchrun (``WORLD_SIZE`` > 1) starts the
    process group — NCCL for CUDA, Gloo for the CPU — unless it is running already; a bare
    "cuda" becomes this rank's GPU (``LOCAL_RANK``)."""
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # CUDA tensors go over NCCL, CPU tensors (the sampler gathers images on the host) over Gloo
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, (dist.get_world_size() if world > 1 else 1), device


def gather(values: torch.Tensor, world: int) -> torch.Tensor:
    """The ranks' equal-shaped ``values`` concatenated in rank order, on every rank."""
    if world == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def mean(value: torch.Tensor, world: int) -> float:
    """The mean over ranks of a scalar tensor, on the host."""
    if world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world
    return value.item()


def any_rank(flag: torch.Tensor | bool, world: int, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank."""
    flag = torch.as_tensor(flag, device=device).to(torch.int32)
    if world > 1:
        flag = flag.clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def shutdown() -> None:
    """Wait for every rank, then end the process group (a rank that exits first with the group
    still up can abort in Gloo's threads)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
