"""Everything about processes in one place: init from torchrun's environment, rank helpers, reductions, cleanup.

Single-process runs need none of it: every helper works (as the identity) without an initialised process group.
Launch several processes with ``torchrun --nproc_per_node N rwkv_diffusion_rnn/train_rwkv.py ...``; the backend
is NCCL on CUDA and gloo on the CPU (so CI exercises the same code path). ``training.strategy`` (ddp | fsdp) picks
how the trainer spreads the model over them; see docs/multi_gpu.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> DistInfo:
    """Initialise the process group if torchrun started us (``WORLD_SIZE`` > 1) and choose this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 or dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None
        )
    return DistInfo(rank, world, local, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, returned); identity without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_true(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` holds on every rank (used so that a non-finite step is skipped everywhere)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def all_true_on_device(flag: torch.Tensor) -> torch.Tensor:
    """:func:`all_true` for a 0-dim bool tensor, kept on its device (the host does not wait; one all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = flag.float()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t > 0.5


def gather_objects(obj):
    """Every rank's ``obj`` as a list on rank 0 (None on the others); ``[obj]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out if dist.get_rank() == 0 else None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)
