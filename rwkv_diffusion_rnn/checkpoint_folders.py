"""Checkpoint folders: ``save_dir/step_{step:08d}`` naming, listing, resolving a path to a checkpoint, reading and
migrating ``meta.json``, RNG files, and pruning (both layouts, see :mod:`rwkv_diffusion_rnn.checkpoints` and
:mod:`rwkv_diffusion_rnn.checkpoint_dcp`).

Format versions: ``FORMAT_VERSION`` is written to meta.json. A loader meeting an older version runs the chain
``MIGRATIONS[v]`` (meta of version v -> meta of version v + 1) up to the current one before reading any file; a newer
version is refused with a message. To change the layout: bump ``FORMAT_VERSION``, add the ``MIGRATIONS`` entry that
rewrites an old meta (renamed keys, file names, tensor names), and keep a small checkpoint of the old version under
``tests/`` that must keep loading.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from rwkv_diffusion_rnn.checkpoint_io import load_pickle, one_line
from rwkv_diffusion_rnn.errors import DiffRwkvError

FORMAT_VERSION = 1
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}  # v -> (meta v -> meta v + 1)
STEP_DIR = re.compile(r"^step_(\d{8,})$")
RNG_FILE = re.compile(r"^rng_rank(\d+)\.pt$")
STALE_PREFIXES = (".tmp-step_", ".trash-step_")
DCP_DIR = "dcp"  # the torch.distributed.checkpoint files of a sharded checkpoint, inside its step folder


# --------------------------------------------------------------------------------------------------------- writing


def discard(folder: Path, save_dir: Path) -> None:
    """Remove a folder so that no crash leaves it half-deleted under a ``step_*`` name: rename first."""
    trash = save_dir / f".trash-{folder.name}-{secrets.token_hex(4)}"
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale(save_dir: Path) -> None:
    for child in save_dir.iterdir():
        if child.name.startswith(STALE_PREFIXES) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def build_meta(
    step, config, data_state, backbone, extra, ema_meta, rng_ranks, files, tensors, **layout
) -> dict[str, Any]:
    """The ``meta.json`` of a step folder (both layouts; ``layout`` adds the sharded one's keys)."""
    return {
        "format_version": FORMAT_VERSION,
        **layout,
        "step": step,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "config": config,
        "data_state": data_state,
        "backbone": backbone,
        "extra": extra,
        "ema": ema_meta,
        "rng_ranks": rng_ranks,
        "tensors": tensors,
        "files": files,
    }


def prune(save_dir: Path, written: Path, keep_last: int | None) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints; ``written`` always stays. Never raises."""
    ckpts = list_checkpoints(save_dir)
    newer = [c.name for c in ckpts if step_of(c) > step_of(written)]
    if newer:
        warnings.warn(
            f"{save_dir}: checkpoints of later steps than {written.name} exist ({', '.join(newer)}); "
            "latest_checkpoint() will pick them, not this one",
            stacklevel=3,
        )
    if not keep_last:
        return
    keep = set(ckpts[-keep_last:]) | {written}
    for c in ckpts:
        if c not in keep:
            try:
                discard(c, save_dir)
            except OSError as exc:
                warnings.warn(f"{c}: old checkpoint not pruned ({one_line(exc)})", stacklevel=3)


# --------------------------------------------------------------------------------------------------------- reading


def step_of(folder: Path) -> int:
    m = STEP_DIR.match(folder.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(save_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints in ``save_dir`` (``step_*`` folders holding meta.json), oldest step first."""
    d = Path(save_dir)
    if not d.is_dir():
        return []
    found = [c for c in d.iterdir() if STEP_DIR.match(c.name) and c.is_dir() and (c / "meta.json").is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(save_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint of the highest step in ``save_dir``, or None."""
    ckpts = list_checkpoints(save_dir)
    return ckpts[-1] if ckpts else None


def resolve_folder(path: Path) -> Path:
    if not path.exists():
        raise DiffRwkvError(f"{path}: checkpoint path not found")
    if (path / "meta.json").is_file():
        return path
    if STEP_DIR.match(path.name):
        raise DiffRwkvError(f"{path / 'meta.json'}: missing; not a complete checkpoint")
    latest = latest_checkpoint(path)
    if latest is None:
        raise DiffRwkvError(f"{path}: no complete checkpoint here (no step_* folder holding meta.json)")
    return latest


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffRwkvError(f"{path}: unreadable ({one_line(exc)})") from exc
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int):
        raise DiffRwkvError(f"{path}: no integer format_version; not a DiffRwkv checkpoint")
    if version > FORMAT_VERSION:
        raise DiffRwkvError(f"{path}: format_version {version} is newer than this code reads ({FORMAT_VERSION})")
    while version < FORMAT_VERSION:
        if version not in MIGRATIONS:
            raise DiffRwkvError(f"{path}: format_version {version} is no longer supported")
        meta = MIGRATIONS[version](meta)
        version = meta["format_version"]
    for key, kind in (("step", int), ("files", dict), ("tensors", dict)):
        if not isinstance(meta.get(key), kind):
            raise DiffRwkvError(f"{path}: '{key}' missing or not a {kind.__name__}")
    if meta.get("layout") == "dcp":
        check_files(folder, meta["files"])
        return meta
    for name in meta["files"]:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise DiffRwkvError(f"{path}: file entry {name!r} is not a plain file name (path traversal refused)")
    return meta


def check_files(folder: Path, files: Mapping[str, Any]) -> None:
    for name in files:
        parts = Path(name).parts if isinstance(name, str) else ()
        if not parts or any(p in ("", ".", "..") for p in parts) or Path(name).is_absolute():
            raise DiffRwkvError(f"{folder / 'meta.json'}: file entry {name!r} is not a plain path (refused)")
        if len(parts) > 1 and parts[0] != DCP_DIR:
            raise DiffRwkvError(f"{folder / 'meta.json'}: file entry {name!r} is outside {DCP_DIR}/ (refused)")


def peek_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """``(folder, meta.json)`` of a ``step_*`` folder or of the newest checkpoint in a ``save_dir``, without
    reading or verifying any other file (``meta["layout"]`` is ``"dcp"`` for a distributed checkpoint)."""
    folder = resolve_folder(Path(path))
    return folder, read_meta(folder)


def read_rng_files(folder: Path, files: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """``{rank: RNG state}`` of the ``rng_rank{r}.pt`` files meta.json lists (weights-only loads)."""
    rng = {}
    for name in files:
        m = RNG_FILE.match(name)
        if m:
            state = load_pickle(folder / name, "cpu")
            if not isinstance(state, dict) or "torch" not in state:
                raise DiffRwkvError(f"{folder / name}: not an RNG state")
            rng[int(m.group(1))] = state
    return rng
