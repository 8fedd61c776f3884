"""Distributed (DCP) checkpoints: written by every rank, loadable on any number of ranks.

Layout of ``save_dir/step_{step:08d}/`` when ``meta.json`` says ``"layout": "dcp"``::

    dcp/                 torch.distributed.checkpoint files (``.metadata`` + one ``__<rank>_0.distcp`` per rank):
                         {"model": {name: trainable tensor}, "ema": {name: shadow}, "optim": optimizer state
                         keyed by parameter name} -- saved sharded, loadable on any number of ranks (resharded)
    trainer_state.pt     {"scheduler": state dict} (torch.save, rank 0)
    rng_rank{r}.pt       every saving rank's RNG state (gathered to rank 0)
    meta.json            as for the file layout, plus "layout", "world_size"; "files" lists dcp/* too

The same promises hold: every rank writes into one ``.tmp-step_*`` folder whose name rank 0 chose, rank 0 renames
it after all ranks have finished, keep-last-k prunes, and every file is sha256-verified before a load.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rwkv_diffusion_rnn.backbone_ref import with_backbone_digest
from rwkv_diffusion_rnn.checkpoint_folders import (
    DCP_DIR,
    FORMAT_VERSION,
    build_meta,
    check_files,
    discard,
    prune,
    read_rng_files,
    remove_stale,
    resolve_folder,
)
from rwkv_diffusion_rnn.checkpoint_io import (
    check_json,
    check_weights_only,
    fsync_path,
    load_pickle,
    one_line,
    require_finite,
    verify_file,
    write_json,
    write_torch,
)
from rwkv_diffusion_rnn.data_io import file_sha256
from rwkv_diffusion_rnn.errors import DiffRwkvError


def _collective_broadcast(obj: Any, src: int = 0) -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _raise_if_error(result: Any) -> Any:
    if isinstance(result, dict) and "error" in result:
        raise DiffRwkvError(result["error"])
    return result


def save_dcp_checkpoint(
    save_dir: str | os.PathLike[str],
    step: int,
    *,
    state: dict[str, Any],
    scheduler: dict[str, Any] | None,
    rng: Mapping[int, Any] | None,
    data_state: dict[str, Any],
    config: dict[str, Any],
    backbone: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    ema_meta: dict[str, Any] | None = None,
    keep_last: int | None = 3,
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Write a DCP checkpoint; a collective call (every rank calls it with its own ``state``).

    ``state`` is what :func:`torch.distributed.checkpoint.save` takes (DTensors or plain tensors); ``rng``
    (``{rank: capture_rng_state()}``), ``scheduler`` and the JSON values are read on rank 0 only. Returns the final
    folder on every rank; a failure raises the same one-line :class:`DiffRwkvError` on every rank and leaves no
    ``step_*`` folder behind.
    """
    import torch.distributed.checkpoint as dcp

    save_dir = Path(save_dir)
    final = save_dir / f"step_{step:08d}"
    plan: Any = None
    if rank == 0:
        try:
            backbone = with_backbone_digest(backbone)
            for name, value in (("config", config), ("data_state", data_state), ("backbone", backbone),
                                ("extra", extra), ("ema", ema_meta)):  # fmt: skip
                check_json(value, name)
            check_weights_only({"scheduler": scheduler}, "trainer_state.pt")
            save_dir.mkdir(parents=True, exist_ok=True)
            remove_stale(save_dir)
            tmp = save_dir / f".tmp-{final.name}-{secrets.token_hex(4)}"
            tmp.mkdir()
            plan = {"tmp": str(tmp)}
        except DiffRwkvError as exc:
            plan = {"error": str(exc)}
        except OSError as exc:
            plan = {"error": f"{save_dir}: cannot create a checkpoint folder here ({one_line(exc)})"}
    plan = _raise_if_error(_collective_broadcast(plan))
    tmp = Path(plan["tmp"])
    try:
        dcp.save(state, checkpoint_id=str(tmp / DCP_DIR))
        err = None
    except Exception as exc:  # noqa: BLE001 -- reported on every rank below
        err = f"{final}: checkpoint not written ({one_line(exc)})"
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        errors: list[Any] = [None] * world_size
        dist.all_gather_object(errors, err)
        err = next((e for e in errors if e), None)
    result: Any = None
    if rank == 0:
        try:
            if err:
                raise DiffRwkvError(err)
            write_torch(tmp / "trainer_state.pt", {"scheduler": scheduler})
            for r, s in sorted((rng or {}).items()):
                write_torch(tmp / f"rng_rank{r}.pt", s)
            digests = {}
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel = f.relative_to(tmp).as_posix()
                fsync_path(f)
                digests[rel] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
            fsync_path(tmp / DCP_DIR)
            meta = build_meta(step, config, data_state, backbone, extra, ema_meta, sorted(rng or {}), digests,
                              tensors={}, layout="dcp", world_size=world_size)  # fmt: skip
            write_json(tmp / "meta.json", meta)
            fsync_path(tmp)
            if final.exists():
                discard(final, save_dir)
            os.replace(tmp, final)
            try:
                fsync_path(save_dir)
            except OSError as exc:
                warnings.warn(f"{save_dir}: fsync after the rename failed ({one_line(exc)})", stacklevel=2)
            prune(save_dir, final, keep_last)
            result = {"path": str(final)}
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            msg = str(exc) if isinstance(exc, DiffRwkvError) else f"{final}: checkpoint not written ({one_line(exc)})"
            result = {"error": msg}
    result = _raise_if_error(_collective_broadcast(result))
    return Path(result["path"])


@dataclass
class DcpCheckpoint:
    """What :func:`read_dcp_checkpoint` returns: everything but the tensors, which the caller loads in place with
    ``torch.distributed.checkpoint.load(state, checkpoint_id=ckpt.dcp_path)`` (resharded to its ranks)."""

    path: Path
    step: int
    scheduler: dict[str, Any] | None
    rng: dict[int, dict[str, Any]]
    data_state: dict[str, Any]
    config: dict[str, Any]
    backbone: dict[str, Any] | None
    extra: dict[str, Any] | None
    ema_meta: dict[str, Any] | None
    meta: dict[str, Any] = field(repr=False)

    @property
    def dcp_path(self) -> Path:
        return self.path / DCP_DIR


def read_dcp_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> DcpCheckpoint:
    """Read a DCP checkpoint's meta, scheduler and RNG states, after checking every file's size and sha256
    (``verify``) -- on rank 0 only when a process group is up, the verdict is shared so every rank fails alike."""
    import torch.distributed as dist

    folder = Path(path)
    verdict: Any = None
    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if is_main:
        try:
            folder = resolve_folder(folder)
            meta = _dcp_meta(folder)
            if verify:
                for name, info in meta["files"].items():
                    verify_file(folder, name, info if isinstance(info, Mapping) else {})
            verdict = {"path": str(folder)}
        except DiffRwkvError as exc:
            verdict = {"error": str(exc)}
    folder = Path(_raise_if_error(_collective_broadcast(verdict))["path"])
    meta = _dcp_meta(folder)
    payload = load_pickle(folder / "trainer_state.pt", "cpu")
    if not isinstance(payload, dict) or "scheduler" not in payload:
        raise DiffRwkvError(f"{folder / 'trainer_state.pt'}: expected a dict with 'scheduler'")
    rng = read_rng_files(folder, meta["files"])
    return DcpCheckpoint(folder, meta["step"], payload["scheduler"], rng, meta.get("data_state") or {},
                         meta.get("config") or {}, meta.get("backbone"), meta.get("extra"), meta.get("ema"),
                         meta)  # fmt: skip


def _dcp_meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffRwkvError(f"{path}: unreadable ({one_line(exc)})") from exc
    if not isinstance(meta, dict) or meta.get("layout") != "dcp":
        raise DiffRwkvError(f"{path}: not a distributed (dcp) checkpoint")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise DiffRwkvError(f"{path}: format_version {meta.get('format_version')} is not one this code reads")
    for key, kind in (("step", int), ("files", dict)):
        if not isinstance(meta.get(key), kind):
            raise DiffRwkvError(f"{path}: '{key}' missing or not a {kind.__name__}")
    check_files(folder, meta["files"])
    for need in ("trainer_state.pt", f"{DCP_DIR}/.metadata"):
        if need not in meta["files"]:
            raise DiffRwkvError(f"{path}: does not list {need}")
    return meta


def load_dcp_tensors(folder: Path, prefixes: tuple[str, ...] = ("model", "ema")) -> dict[str, dict[str, torch.Tensor]]:
    """Full (unsharded) tensors of a DCP checkpoint's ``prefixes`` sections in this one process, e.g. for
    inference: ``{"model": {name: tensor}, "ema": {...}}`` (absent sections are empty). Reads nothing else."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    where = folder / DCP_DIR
    try:
        md = dcp.FileSystemReader(str(where)).read_metadata()
        want = {
            key: torch.empty(tuple(m.size), dtype=m.properties.dtype)
            for key, m in md.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata) and key.split(".", 1)[0] in prefixes
        }
        dcp.load(want, checkpoint_id=str(where), no_dist=True)
    except Exception as exc:  # noqa: BLE001
        raise DiffRwkvError(f"{where}: unreadable distributed checkpoint ({one_line(exc)})") from exc
    require_finite(want, where)
    out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    for key, t in want.items():
        section, name = key.split(".", 1)
        out[section][name] = t
    return out
