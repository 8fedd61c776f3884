"""Keeping the training step free of host <-> device waits.

A CUDA step is fast only while the host runs ahead of the GPU, queueing kernels. Anything that makes the host wait
for the GPU empties that queue: reading a value (``.item()``, ``float(t)``, ``bool(t)``), an index whose size
depends on values (``nonzero``, boolean indexing), and a copy from ordinary (pageable) host memory, which PyTorch
follows with a stream synchronisation. The training step avoids all three (improved_trainer.py):

* the corruption's random draws and its masks are made on the host, where they cost no wait, and go to the device
  in one non-blocking copy per dtype from pinned memory (:func:`to_device`);
* the finiteness check and the gradient clipping stay on the device (optimizer.py), and the metrics stay tensors
  until they are logged.

:func:`host_side` marks code that works on host tensors by design, so that a test on a CPU-only machine (where the
device IS the host) can still tell a device sync from planned host work; it changes nothing else.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch

_state = threading.local()

#: a batch's key for its attention mask on the host (the trainer's loaders set it): the corruption's masks are made
#: there, so that a GPU step need not wait to read the mask back
HOST_MASK = "host_attention_mask"


@contextlib.contextmanager
def host_side() -> Iterator[None]:
    """Mark the enclosed code as host-side work (see :func:`in_host_side`)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def in_host_side() -> bool:
    """Whether the calling thread is inside :func:`host_side`."""
    return getattr(_state, "depth", 0) > 0


def pack_by_dtype(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, list[int]]]:
    """The tensors of each dtype flattened into one buffer: ``[(buffer, indices into tensors), ...]``."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    return [(torch.cat([tensors[i].reshape(-1) for i in idx]), idx) for idx in by_dtype.values()]


def unpack(packs: Sequence[tuple[torch.Tensor, list[int]]], shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Views of :func:`pack_by_dtype`'s buffers (wherever they now live) in the original order and shapes."""
    out: list[torch.Tensor | None] = [None] * len(shapes)
    for flat, idx in packs:
        start = 0
        for i in idx:
            n = shapes[i].numel()
            out[i] = flat[start : start + n].view(shapes[i])
            start += n
    return out  # type: ignore[return-value]


def to_device(tensors: Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Host tensors onto ``device`` without making the host wait: the tensors of each dtype are packed into one
    pinned buffer and copied with one non-blocking copy, then split back into their shapes on the device.

    On a CPU device the tensors are returned as they are. Packing copies them, so the originals are free to change
    or go once this returns."""
    device = torch.device(device)
    if device.type == "cpu":
        return list(tensors)
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("to_device takes host tensors")
    pin = device.type == "cuda"
    packs = [((flat.pin_memory() if pin else flat).to(device, non_blocking=pin), idx)
             for flat, idx in pack_by_dtype(tensors)]  # fmt: skip
    return unpack(packs, [t.shape for t in tensors])


class DeviceCount:
    """A count that grows on the device between reads (the trainer's skipped steps, the EMA's updates): adding a
    device tensor never waits; ``int(count)`` reads it (one wait) and folds it into the host part."""

    def __init__(self, value: int = 0) -> None:
        self._host, self._pending = int(value), None

    def add(self, x: int | torch.Tensor) -> None:
        """Add a host number, or a 0-dim device tensor (no wait)."""
        if isinstance(x, torch.Tensor):
            self._pending = x if self._pending is None else self._pending + x
        else:
            self._host += int(x)

    def tensor(self, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """The count so far as a 0-dim tensor on ``device``, without a wait."""
        n = torch.full((), self._host, dtype=dtype, device=device)
        return n if self._pending is None else n + self._pending.to(dtype)

    def __int__(self) -> int:
        if self._pending is not None:
            self._host += int(self._pending)
            self._pending = None
        return self._host
