"""torch.distributed for runs launched by torchrun; nothing at all without it.

    torchrun --nproc_per_node=2 main.py --run_config configs/run_template.yaml

`setup()` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), starts the
process group (nccl on CUDA with one GPU per local rank, gloo on CPU), and returns
the rank, the world size and the device this rank trains on (`cuda_device()`: from the
GPUs the process can see). A plain `python main.py` has WORLD_SIZE unset: no process
group, no extra cost.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.distributed as dist

from engine.errors import ConfigError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str) -> tuple[int, int, str]:
    """(rank, world size, device for this rank); starts the process group once."""
    world = world_size()
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = cuda_device(os.environ, torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def cuda_device(environ: Mapping[str, str], visible: int) -> str:
    """The GPU a rank trains on, given its environment and the number of GPUs it can see
    (torch.cuda.device_count(), which honours CUDA_VISIBLE_DEVICES). Under torchrun, or srun
    without GPU binding, every process sees all of the node's GPUs: the local rank picks one.
    Slurm's --gpus-per-task binds each task to GPUs of its own (CUDA_VISIBLE_DEVICES differs per
    task), which it sees from cuda:0 on: it takes cuda:0."""
    local_rank = int(environ.get("LOCAL_RANK", environ.get("SLURM_LOCALID", "0")))
    local_world = int(environ["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in environ else None
    shown = f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']!r}" \
        if "CUDA_VISIBLE_DEVICES" in environ else "CUDA_VISIBLE_DEVICES unset"
    if visible < 1:
        raise ConfigError("device", "", f"local rank {local_rank} sees no GPU ({shown})")
    if visible >= (local_world or local_rank + 1):  # one GPU for each local rank, or more
        return f"cuda:{local_rank}"
    if "CUDA_VISIBLE_DEVICES" not in environ:  # not bound, so all ranks share these few
        raise ConfigError("device", "", f"{local_world or 'more than ' + str(visible)} ranks on this node "
                                        f"share {visible} GPU(s) ({shown}): start one rank per GPU")
    return "cuda:0"  # the first of its own


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
