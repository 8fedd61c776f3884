"""The rows of each training step on this process, read and on the device.

The order is a function of ``(seed, epoch)`` (:func:`data_simple.stream_rows`): step ``s`` takes the global batch
at stream positions ``[s x G, (s + 1) x G)``; micro-step ``m`` covers ``G / grad_accum_steps`` consecutive rows of
it and rank ``r`` takes every ``world``-th row from ``r`` (:func:`data_simple.shard_rows`). The data position is
the step, so a resume needs no loader state.
"""

from __future__ import annotations

import numpy as np
import torch

from rwkv_diffusion_rnn import distributed
from rwkv_diffusion_rnn.data_simple import DeviceRows, collate_batch, pad_with_eot, shard_rows, stream_rows
from rwkv_diffusion_rnn.host_sync import HOST_MASK


def collate(samples: list[dict], pad_to_length: int | None) -> dict[str, torch.Tensor]:
    """Right-padded batch, or fixed-length end-of-text padded rows with ``data.pad_to_length``."""
    batch = collate_batch(samples)
    return pad_with_eot(batch, pad_to_length) if pad_to_length else batch


class StepBatches:
    """This rank's micro-batches of every step of a run over ``rows`` (the training dataset).

    ``device_cache`` (``data.device_cache``): every row is held on the device once and batches are indexed from
    there. Otherwise rows are read and collated on the host; with ``prefetch_data`` (on by default on CUDA) the next
    step's rows are read while the device computes this step (on the CPU, one step's reads stay in its own step, so
    an unreadable row is met at its own step)."""

    def __init__(self, rows, *, seed: int, global_batch: int, grad_accum_steps: int, info: distributed.DistInfo,
                 pad_to_length: int | None, device_cache: bool, progress: bool) -> None:  # fmt: skip
        self.rows, self.seed, self.info = rows, seed, info
        self.global_batch, self.grad_accum_steps, self.pad_to_length = global_batch, grad_accum_steps, pad_to_length
        self.device = info.device
        self.prefetch_data = self.device.type == "cuda"
        self._prefetched = None
        self.device_rows = None
        if device_cache:
            self.device_rows = DeviceRows(rows, self.device, pad_to_length, progress=progress)
            distributed.print0(f"data.device_cache: {len(rows):,} training rows on {self.device} "
                               f"({self.device_rows.nbytes / 2**20:.1f} MiB)")  # fmt: skip

    def rank_rows(self, step: int) -> list[np.ndarray]:
        """The dataset rows of this rank's micro-batches at global step ``step``."""
        rows = stream_rows(self.seed, len(self.rows), step * self.global_batch, self.global_batch)
        return shard_rows(rows, self.grad_accum_steps, self.info.world_size, self.info.rank)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of global step ``step`` (on the device): the ones :meth:`prefetch` prepared
        for this step, if any."""
        ready, self._prefetched = self._prefetched, None
        if ready is not None and ready[0] == step:
            return ready[1]
        return self.load(step)

    def load(self, step: int) -> list[dict[str, torch.Tensor]]:
        """Read step ``step``'s micro-batches now."""
        if self.device_rows is not None:
            return [self.device_rows.batch(mine) for mine in self.rank_rows(step)]
        pin = self.device.type == "cuda"  # pinned host memory: the copy is queued, not waited for
        out = []
        for mine in self.rank_rows(step):
            batch = collate([self.rows[int(i)] for i in mine], self.pad_to_length)
            moved = {k: (v.pin_memory() if pin else v).to(self.device, non_blocking=True) for k, v in batch.items()}
            moved[HOST_MASK] = batch["attention_mask"]  # the corruption's masks are made on the host
            out.append(moved)
        return out

    def prefetch(self, step: int) -> None:
        """With ``prefetch_data``: read and collate step ``step``'s rows now (the CPU is otherwise idle while the
        GPU runs this step's backward: on an H200 the step waited ~9 ms on its data). A failure is left for
        :meth:`micro_batches` to raise at its own step, as without prefetching."""
        if not self.prefetch_data:
            return
        try:
            self._prefetched = (step, self.load(step))
        except Exception:
            self._prefetched = None
