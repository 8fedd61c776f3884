"""Everything about processes in one place: init from torchrun's environment, rank helpers, reductions, cleanup,
and spreading the model over the processes (:func:`wrap_ddp`, :func:`shard_fsdp`).

Single-process runs need none of it: every helper works (as the identity) without an initialised process group,
and the trainer's model and loop are single-device code that these wrappers parallelise. Launch several processes
with ``torchrun --nproc_per_node N rwkv_diffusion_rnn/train_rwkv.py ...``; the backend is NCCL on CUDA and gloo on
the CPU (so CI exercises the same code path). ``training.strategy`` picks how the model is spread over them
(docs/multi_gpu.md):

* ``ddp``: DistributedDataParallel, every rank holds the whole model and gradients are all-reduced;
* ``fsdp``: FSDP2 ``fully_shard`` per RWKV block, then the root; fp32 master weights, bf16 compute copies under
  ``dtype=bf16``, fp32 gradient reduction. Its checkpoints are sharded (distributed_checkpoint.py).
"""

from __future__ import annotations

import os
import warnings
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


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: call it on every rank); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``model`` under DistributedDataParallel when several processes run, else ``model`` itself. Wrap after the
    trainable set is final (and again when it changes): DDP registers the parameters that need gradients."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def shard_fsdp(model: torch.nn.Module, info: DistInfo, bf16: bool) -> None:
    """FSDP2 in place: ``fully_shard`` every RWKV block of ``model.backbone``, then the root (embeddings, heads,
    conditioning). Master weights stay fp32 (the optimizer updates fp32 shards); with ``bf16`` each block's
    parameters are gathered as bf16 for compute and gradients are reduce-scattered in fp32. Forward inputs are not
    cast (the diffusion times stay fp32); autocast still runs around the loss. Shard before building the optimizer
    and the EMA: they must hold the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Block.forward returns its last-token states as views; nothing modifies them in place (the two-process
    # == one-process test in tests/test_distributed.py would catch a lost gradient), so FSDP2's warning is noise
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                              cast_forward_inputs=False)  # fmt: skip
    for block in model.backbone.blocks:
        if isinstance(getattr(block, "ln0", None), torch.nn.Module):
            # block 0's ln0 runs outside the block's forward (RWKV7.forward_embeds): a unit of its own
            fully_shard(block.ln0, mesh=mesh, mp_policy=mp)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
