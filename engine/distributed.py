"""torch.distributed for runs launched by torchrun; nothing at all without it.

    torchrun --nproc_per_node=2 main.py --run_config configs/run_template.yaml

`setup()` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), starts the
process group (nccl on CUDA with one GPU per local rank, gloo on CPU), and returns
the rank, the world size and the device this rank trains on. A plain `python main.py`
has WORLD_SIZE unset: no process group, no extra cost.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str) -> tuple[int, int, str]:
    """(rank, world size, device for this rank); starts the process group once."""
    world = world_size()
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def teardown() -> None:
    if initialized():
        dist.destroy_process_group()


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum over all ranks (the tensor itself in one process)."""
    if initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if initialized():
        dist.barrier()


def broadcast_from_rank0(objects: list) -> list:
    """Rank 0's picklable objects, on every rank (in place, and returned)."""
    if initialized():
        dist.broadcast_object_list(objects, src=0)
    return objects
