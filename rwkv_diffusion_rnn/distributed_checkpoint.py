"""The trainer's state in sharded checkpoints (torch.distributed.checkpoint, DCP) and resuming on another number of
processes.

``logging.checkpoint_format=dcp`` (the default under ``training.strategy=fsdp``): every rank writes its shards of
the trainable tensors, the optimizer state keyed by parameter name and the EMA shadows; a resume loads them in place
on any number of processes under either strategy (DCP reshards), and :func:`hold_global_batch` keeps the global
batch of the run that saved (docs/multi_gpu.md). The folder layout, its meta.json and the whole-model read for
inference are checkpoint_dcp.py's (:func:`~checkpoint_dcp.save_dcp_checkpoint`,
:func:`~checkpoint_dcp.read_dcp_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rwkv_diffusion_rnn import distributed
from rwkv_diffusion_rnn.checkpoints import (
    capture_rng_state,
    peek_checkpoint,
    read_dcp_checkpoint,
    restore_rng_state,
    save_dcp_checkpoint,
    verify_backbone,
)
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.optimizer import EMA


def hold_global_batch(training, world_size: int) -> None:
    """Resuming with another number of processes: set ``training.grad_accum_steps`` so that the global batch
    (``train_batch_size x world_size x grad_accum_steps``) is the checkpoint's; one-line error when no whole number
    of accumulation steps reaches it. Nothing to do without ``training.resume``."""
    t, w = training, world_size
    if not t.resume:
        return
    folder, meta = peek_checkpoint(t.resume)
    saved = (meta.get("data_state") or {}).get("global_batch")
    if not saved or saved == t.train_batch_size * w * t.grad_accum_steps:
        return
    per_step = t.train_batch_size * w
    if saved % per_step:
        raise DiffRwkvError(
            f"{folder}: trained with global batch {saved}; {w} processes x train_batch_size {t.train_batch_size} "
            f"cannot reach it with whole accumulation steps: set training.train_batch_size to a divisor of "
            f"{saved // w if saved % w == 0 else saved} / grad_accum_steps"
        )
    distributed.print0(
        f"resume: global batch {saved} held with {w} processes: grad_accum_steps {t.grad_accum_steps} -> "
        f"{saved // per_step}"
    )
    t.grad_accum_steps = saved // per_step


def dcp_state(model: torch.nn.Module, optimizer, trainable: dict, ema: EMA | None) -> dict:
    """What DCP saves and loads in place: the trainable tensors (under fsdp this rank's DTensor shards), the
    optimizer state keyed by parameter name (resharding-friendly) and, with an EMA, its shadows."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"model": trainable, "optim": get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        state["ema"] = dict(ema.shadow)
    return state


def save_dcp(save_dir: Path, step: int, *, model, optimizer, scheduler, trainable: dict, ema: EMA | None,
             data_state: dict, config: dict, backbone: dict | None, extra: dict, keep_last: int,
             info: distributed.DistInfo) -> Path:  # fmt: skip
    """Write a sharded checkpoint of ``step`` (every rank calls it and gets the folder): each rank's shards, every
    rank's RNG state, and the scheduler, data position, config and ``extra`` once."""
    rng = distributed.gather_objects(capture_rng_state())
    ema_meta = None if ema is None else {k: v for k, v in ema.state_dict().items() if k != "shadow"}
    return save_dcp_checkpoint(
        save_dir, step, state=dcp_state(model, optimizer, trainable, ema), scheduler=scheduler.state_dict(),
        rng=dict(enumerate(rng)) if rng is not None else None, data_state=data_state, config=config,
        backbone=backbone, extra=extra, ema_meta=ema_meta, keep_last=keep_last, rank=info.rank,
        world_size=info.world_size,
    )  # fmt: skip


def _check_fits(where: str, saved: dict, state: dict) -> None:
    """One-line refusal of a checkpoint whose tensors are not this configuration's trainable set."""
    for section in ("model", "ema") if "ema" in state else ("model",):
        for name, t in state[section].items():
            m = saved.get(f"{section}.{name}")
            if m is None:
                raise DiffRwkvError(f"{where}: checkpoint lacks trainable tensor '{name}' (another configuration?)")
            if tuple(m.size) != tuple(t.shape) or m.properties.dtype != t.dtype:
                raise DiffRwkvError(
                    f"{where}: tensor '{name}' does not fit this model's configuration (checkpoint: "
                    f"{m.properties.dtype} {tuple(m.size)}, this model: {t.dtype} {tuple(t.shape)})"
                )
    extra_names = sorted(k.split(".", 1)[1] for k in saved if k.startswith("model.")
                         and k.split(".", 1)[1] not in state["model"])  # fmt: skip
    if extra_names:
        raise DiffRwkvError(f"{where}: tensor '{extra_names[0]}' is not trainable in this configuration")


def resume_dcp(where: str, *, model, optimizer, scheduler, trainable: dict, ema: EMA | None,
               backbone_ref: dict | None, rank: int) -> tuple[int, int]:  # fmt: skip
    """Load a sharded checkpoint in place into the (sharded or whole) trainable tensors, optimizer, scheduler, EMA
    and this rank's RNG state; returns ``(step, skipped steps so far)``. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    ck = read_dcp_checkpoint(where)
    verify_backbone(ck.backbone, backbone_ref, str(ck.path))
    state = dcp_state(model, optimizer, trainable, ema if ck.ema_meta is not None else None)
    saved = {k: m for k, m in dcp.FileSystemReader(str(ck.dcp_path)).read_metadata().state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata)}  # fmt: skip
    _check_fits(where, saved, state)
    try:
        dcp.load(state, checkpoint_id=str(ck.dcp_path))
        set_optimizer_state_dict(model, optimizer, state["optim"])
    except Exception as exc:  # noqa: BLE001 -- one line, naming the checkpoint
        raise DiffRwkvError(f"{ck.dcp_path}: cannot load ({' '.join(str(exc).split())[:300]})") from exc
    scheduler.load_state_dict(ck.scheduler)
    if ema is not None and ck.ema_meta is not None:
        ema.num_updates = int(ck.ema_meta.get("num_updates", 0))
        ema.decay = float(ck.ema_meta.get("decay", ema.decay))
        ema.warmup = bool(ck.ema_meta.get("warmup", ema.warmup))
    if ck.rng:
        restore_rng_state(ck.rng.get(rank, ck.rng[min(ck.rng)]))
    step = int(ck.step)
    distributed.print0(f"resumed from {ck.path} (saved by {ck.meta.get('world_size')} processes) at step {step}")
    return step, int((ck.extra or {}).get("skipped", 0))
