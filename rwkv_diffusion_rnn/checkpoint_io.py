"""Checkpoint files: what may be written (JSON values, weights-only pickles, plain tensors), durable
writes, verified reads, and the one check-then-copy of named tensors into a model.

Every failure is a :class:`~rwkv_diffusion_rnn.errors.DiffRwkvError` of one line naming the file or tensor.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from rwkv_diffusion_rnn.data_io import file_sha256
from rwkv_diffusion_rnn.errors import DiffRwkvError

# -------------------------------------------------------------------------------------------------------- checking


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_json(obj: Any, where: str) -> None:
    """Raise naming the first value meta.json cannot hold as standard JSON (NaN and inf included)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            raise DiffRwkvError(f"{where}: {obj} cannot be written to meta.json (not a finite number)")
        return
    if isinstance(obj, dict):  # not any Mapping: json cannot write an OmegaConf DictConfig (use to_container)
        for k, v in obj.items():
            if not isinstance(k, str):
                raise DiffRwkvError(f"{where}: key {k!r} is not a string; meta.json needs string keys")
            check_json(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_json(v, f"{where}[{i}]")
        return
    raise DiffRwkvError(f"{where}: a {type(obj).__name__} cannot be written to meta.json (JSON values only)")


_PICKLE_LEAVES = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def check_weights_only(obj: Any, where: str) -> None:
    """Raise naming the first value that ``torch.load(weights_only=True)`` would refuse (custom classes, numpy)."""
    t = type(obj)
    if t in _PICKLE_LEAVES or t is torch.Tensor or t is nn.Parameter:
        return
    if t in (dict, collections.OrderedDict):
        for k, v in obj.items():
            check_weights_only(k, f"{where} key")
            check_weights_only(v, f"{where}[{k!r}]")
        return
    if t in (list, tuple):
        for i, v in enumerate(obj):
            check_weights_only(v, f"{where}[{i}]")
        return
    raise DiffRwkvError(
        f"{where}: a {t.__module__}.{t.__qualname__} would not load with weights_only=True; "
        "save plain tensors, numbers, strings, lists and dicts"
    )


def plain_tensors(tensors: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors for safetensors; storage shared between names (tied weights) is copied."""
    if not isinstance(tensors, Mapping):
        raise DiffRwkvError(f"{where}: expected a dict of name -> tensor, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[torch.device, int]] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise DiffRwkvError(f"{where}: entry {name!r} is not a tensor named by a string")
        c = t.detach().cpu().contiguous()
        key = (c.device, c.untyped_storage().data_ptr())
        if key in seen or c.untyped_storage().nbytes() != c.numel() * c.element_size():
            c = c.clone()
        seen.add((c.device, c.untyped_storage().data_ptr()))
        out[name] = c
    return out


def tensor_info(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    return {n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for n, t in tensors.items()}


# --------------------------------------------------------------------------------------------------------- writing


def fsync_path(path: Path) -> None:
    """Flush a file's or folder's data and metadata to disk (folders: where the OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return  # some platforms cannot open folders; their rename is still atomic
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    fsync_path(path)


def write_torch(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------------- reading


def verify_file(folder: Path, name: str, info: Mapping[str, Any]) -> None:
    path = folder / name
    if not path.is_file():
        raise DiffRwkvError(f"{path}: missing (listed in meta.json)")
    size = path.stat().st_size
    if size != info.get("bytes"):
        raise DiffRwkvError(f"{path}: {size} bytes, meta.json says {info.get('bytes')} (truncated or replaced)")
    if file_sha256(path) != info.get("sha256"):
        raise DiffRwkvError(f"{path}: sha256 does not match meta.json (corrupted or modified)")


def load_safetensors(path: Path, expected: Mapping[str, Any] | None, device: str) -> dict[str, torch.Tensor]:
    try:
        tensors = safetensors.torch.load_file(str(path), device=device)
    except Exception as exc:  # SafetensorError, OSError, a bad device string: all mean "cannot read this file"
        raise DiffRwkvError(f"{path}: unreadable safetensors ({one_line(exc)})") from exc
    if expected is not None:
        got = tensor_info(tensors)
        for name in sorted(set(got) | set(expected)):
            if got.get(name) != expected.get(name):
                raise DiffRwkvError(f"{path}: tensor {name!r} is {got.get(name)}, meta.json says {expected.get(name)}")
    require_finite(tensors, path)
    return tensors


def require_finite(tensors: Mapping[str, Any], where: Any) -> None:
    """Refuse floating tensors holding NaN or infinity (a diverged run's save, or a file altered with its checksums
    fixed up): resuming or sampling from them would only spread the NaN."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DiffRwkvError(f"{where}: tensor {name!r} holds NaN or infinite values; expected finite weights")


def load_pickle(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise DiffRwkvError(
                f"{path}: refused, it references {found.group(1)} which weights_only loading does not allow "
                "(a pickle that could run code)"
            ) from exc
        raise DiffRwkvError(f"{path}: unreadable ({one_line(exc)})") from exc


@torch.no_grad()
def copy_checked(
    targets: Mapping[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    *,
    where: str,
    require: Iterable[str] | None = None,
) -> None:
    """Copy ``tensors`` into the same-named ``targets`` (a model's parameters and buffers) after checking all of
    them; a mismatch copies nothing.

    Every name must be in ``targets`` with the same shape and dtype, and every name in ``require`` (e.g. the
    model's trainable parameters) must be present; else a one-line error names the tensor.
    """
    for name in sorted(require or ()):
        if name not in tensors:
            raise DiffRwkvError(f"{where}: tensor {name!r} is missing (this model trains it)")
    for name, t in tensors.items():
        if name not in targets:
            raise DiffRwkvError(f"{where}: tensor {name!r} does not exist in this model (another configuration?)")
        target = targets[name]
        if t.shape != target.shape or t.dtype != target.dtype:
            raise DiffRwkvError(
                f"{where}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, "
                f"this model has {target.dtype} {tuple(target.shape)}"
            )
    for name, t in tensors.items():
        targets[name].copy_(t)
