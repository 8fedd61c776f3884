"""Atomic step checkpoints: enough to resume the exact trajectory and to rebuild the model, and safe to load.

Layout of ``save_dir/step_{step:08d}/`` (format version 1)::

    model.safetensors    trainable tensors only (the frozen backbone is referenced in meta.json, never copied)
    ema.safetensors      EMA shadow tensors (only when an EMA is saved)
    optimizer.pt         {"optimizer": state dict | None, "scheduler": state dict | None}   (torch.save)
    rng_rank{r}.pt       python / numpy / torch CPU / CUDA RNG states of rank r (see capture_rng_state)
    meta.json            format_version, step, created, config, data_state, backbone {"path", "sha256", ...},
                         extra, ema counters, tensor names/shapes/dtypes, and {"bytes", "sha256"} of every file

Guarantees:

* **Atomic.** Everything is written to ``save_dir/.tmp-step_XXXXXXXX-<random>``, each file fsync'd, then the folder is
  renamed with ``os.replace``. A crash at any moment leaves no incomplete ``step_*`` folder; leftovers named
  ``.tmp-*`` / ``.trash-*`` are removed by the next save (one writer per ``save_dir``: rank 0).
* **Verified.** :func:`load_checkpoint` checks every file's size and sha256 against meta.json before reading it.
* **No code on load.** Tensors come from safetensors; ``.pt`` files are read with ``torch.load(weights_only=True)``,
  and :func:`save_checkpoint` refuses, up front, to write anything that such loading would reject.
* **One-line errors.** Every failure is a :class:`DiffRwkvError` naming the folder or file.

Several ranks: only rank 0 calls :func:`save_checkpoint`; it passes every rank's :func:`capture_rng_state` as
``rng={rank: state}`` (gathered by the trainer, e.g. with ``all_gather_object``), so one atomic rename covers all
ranks. Each rank then picks its own with :meth:`Checkpoint.rng_for`.

Modules: this one writes and reads the single-folder file layout; :mod:`~rwkv_diffusion_rnn.checkpoint_dcp` the
sharded one; :mod:`~rwkv_diffusion_rnn.checkpoint_folders` names, lists, resolves and prunes step folders and reads
(and migrates) meta.json; :mod:`~rwkv_diffusion_rnn.checkpoint_io` checks, writes and reads the files;
:mod:`~rwkv_diffusion_rnn.backbone_ref` makes and checks backbone references. Their public names are importable from
here as well.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rwkv_diffusion_rnn.backbone_ref import backbone_reference, backbone_sha256, verify_backbone, with_backbone_digest
from rwkv_diffusion_rnn.checkpoint_dcp import (
    DcpCheckpoint,
    load_dcp_tensors,
    read_dcp_checkpoint,
    save_dcp_checkpoint,
)
from rwkv_diffusion_rnn.checkpoint_folders import (
    DCP_DIR,
    FORMAT_VERSION,
    STEP_DIR,
    build_meta,
    discard,
    latest_checkpoint,
    list_checkpoints,
    peek_checkpoint,
    prune,
    read_meta,
    read_rng_files,
    remove_stale,
    resolve_folder,
    step_of,
)
from rwkv_diffusion_rnn.checkpoint_io import (
    check_json,
    check_weights_only,
    copy_checked,
    fsync_path,
    load_pickle,
    load_safetensors,
    one_line,
    plain_tensors,
    require_finite,
    tensor_info,
    verify_file,
    write_json,
    write_safetensors,
)
from rwkv_diffusion_rnn.checkpoint_io import write_torch as _write_torch  # a global here: tests make it fail
from rwkv_diffusion_rnn.data_io import file_sha256
from rwkv_diffusion_rnn.errors import DiffRwkvError

__all__ = [
    "DCP_DIR",
    "FORMAT_VERSION",
    "Checkpoint",
    "DcpCheckpoint",
    "apply_model_tensors",
    "backbone_reference",
    "backbone_sha256",
    "capture_rng_state",
    "copy_checked",
    "file_sha256",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_dcp_tensors",
    "peek_checkpoint",
    "read_dcp_checkpoint",
    "require_finite",
    "restore_rng_state",
    "save_checkpoint",
    "save_dcp_checkpoint",
    "verify_backbone",
]


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns; the fields mirror :func:`save_checkpoint`'s arguments."""

    path: Path
    step: int
    model_tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    ema: dict[str, Any] | None  # {"shadow": {name: tensor}, **counters} as EMA.state_dict() gives it
    rng: dict[int, dict[str, Any]]  # rank -> capture_rng_state() of that rank
    data_state: dict[str, Any]
    config: dict[str, Any]
    backbone: dict[str, Any] | None
    extra: dict[str, Any] | None
    meta: dict[str, Any] = field(repr=False)

    def rng_for(self, rank: int) -> dict[str, Any]:
        """The RNG state rank ``rank`` saved; a clear error when the run had fewer ranks than now."""
        if rank not in self.rng:
            raise DiffRwkvError(
                f"{self.path}: no RNG state for rank {rank} (saved ranks: {sorted(self.rng)}); "
                "resume with the world size the checkpoint was written with"
            )
        return self.rng[rank]


# ------------------------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and (if initialised) CUDA generator states, as plain data.

    NumPy's key is stored as an int64 tensor so that the file loads with ``weights_only=True``. CUDA states are
    captured only once CUDA is initialised; before that its generators are still at their (lazy) seed.
    """
    np_state = np.random.get_state(legacy=False)
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    version, internal, gauss = random.getstate()
    return {
        "python": (version, tuple(internal), gauss),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored for the devices both runs have; a state
    saved with CUDA and restored without it leaves CUDA alone (the run cannot be bit-exact then anyway)."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        npd = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": npd["bit_generator"],
                "state": {"key": npd["key"].cpu().numpy().astype(np.uint32), "pos": int(npd["pos"])},
                "has_gauss": int(npd["has_gauss"]),
                "gauss": float(npd["gauss"]),
            }
        )
        torch.set_rng_state(state["torch"].cpu())
        cuda = state.get("cuda")
        if cuda and torch.cuda.is_available():
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.cpu(), i)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise DiffRwkvError(f"RNG state: malformed ({one_line(exc)})") from exc


# ------------------------------------------------------------------------------------------------ save and load


def save_checkpoint(
    save_dir: str | os.PathLike[str],
    step: int,
    *,
    model_tensors: Mapping[str, torch.Tensor],
    optimizer: dict[str, Any] | None,
    scheduler: dict[str, Any] | None,
    ema: dict[str, Any] | None,
    rng: Mapping[Any, Any],
    data_state: dict[str, Any],
    config: dict[str, Any],
    backbone: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = 3,
    rank: int = 0,
) -> Path:
    """Write ``save_dir/step_{step:08d}`` atomically, then keep only the newest ``keep_last`` checkpoints.

    Args:
        model_tensors: the trainable tensors by name (the caller picks them; frozen ones stay out).
        optimizer, scheduler: ``state_dict()`` of each, or None.
        ema: ``EMA.state_dict()`` — ``{"shadow": {name: tensor}, **JSON counters}`` — or None.
        rng: one :func:`capture_rng_state` (saved as rank ``rank``) or ``{rank: state}`` for every rank.
        data_state, config, extra: JSON-serialisable (the resolved config, the data position, anything else).
        backbone: ``{"path": ..., "sha256": ...}`` of the frozen backbone (see :func:`backbone_reference`) or None.
        keep_last: how many complete checkpoints to keep (the one just written always stays); None or 0 keeps all.

    Returns:
        The checkpoint folder. An existing folder of the same step is replaced (atomically swapped).

    Raises:
        DiffRwkvError: bad input (checked before anything is written), or a failed write (disk full, permission);
            then the temporary folder is gone and every earlier checkpoint is untouched.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise DiffRwkvError(f"save_checkpoint: step must be a non-negative int, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0):
        raise DiffRwkvError(f"save_checkpoint: keep_last must be a non-negative int or None, got {keep_last!r}")
    save_dir = Path(save_dir)
    final = save_dir / f"step_{step:08d}"

    # Validate and convert everything first: a bad argument must not cost a half-written folder.
    model = plain_tensors(model_tensors, "model_tensors")
    ema_tensors, ema_meta = None, None
    if ema is not None:
        if not isinstance(ema, Mapping) or "shadow" not in ema:
            raise DiffRwkvError("ema: expected EMA.state_dict() output with a 'shadow' dict of tensors")
        ema_tensors = plain_tensors(ema["shadow"], "ema.shadow")
        ema_meta = {k: v for k, v in ema.items() if k != "shadow"}
    per_rank = dict(rng) if rng and all(isinstance(k, int) and not isinstance(k, bool) for k in rng) else {rank: rng}
    if not all(isinstance(s, Mapping) and "torch" in s for s in per_rank.values()):
        raise DiffRwkvError("rng: expected capture_rng_state() output, or {rank: capture_rng_state()} for every rank")
    opt_payload = {"optimizer": optimizer, "scheduler": scheduler}
    check_weights_only(opt_payload, "optimizer.pt")
    for r, s in per_rank.items():
        check_weights_only(s, f"rng_rank{r}.pt")
    for name, value in (("config", config), ("data_state", data_state), ("backbone", backbone), ("extra", extra)):
        check_json(value, name)
    check_json(ema_meta, "ema")
    if backbone is not None and not {"path", "sha256"} <= set(backbone):
        raise DiffRwkvError("backbone: expected a reference {'path': ..., 'sha256': ...} (see backbone_reference)")
    backbone = with_backbone_digest(backbone)  # a folder's reference comes without a digest: record one

    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        remove_stale(save_dir)
        tmp = save_dir / f".tmp-{final.name}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as exc:
        raise DiffRwkvError(f"{save_dir}: cannot create a checkpoint folder here ({one_line(exc)})") from exc
    try:
        files = {"model.safetensors": lambda p: write_safetensors(p, model)}
        if ema_tensors is not None:
            files["ema.safetensors"] = lambda p: write_safetensors(p, ema_tensors)
        files["optimizer.pt"] = lambda p: _write_torch(p, opt_payload)
        for r, s in sorted(per_rank.items()):
            files[f"rng_rank{r}.pt"] = lambda p, s=s: _write_torch(p, s)
        digests = {}
        for name, write in files.items():
            write(tmp / name)
            digests[name] = {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
        tensors = {"model": tensor_info(model), "ema": tensor_info(ema_tensors) if ema_tensors else None}
        meta = build_meta(step, config, data_state, backbone, extra, ema_meta, sorted(per_rank), digests, tensors)
        write_json(tmp / "meta.json", meta)
        fsync_path(tmp)
        if final.exists():
            discard(final, save_dir)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, DiffRwkvError):
            raise DiffRwkvError(f"{final}: checkpoint not written ({one_line(exc)})") from exc
        raise
    try:  # make the rename durable; the checkpoint is complete either way
        fsync_path(save_dir)
    except OSError as exc:
        warnings.warn(f"{save_dir}: fsync after the rename failed ({one_line(exc)})", stacklevel=2)
    prune(save_dir, final, keep_last)
    return final


def _optimizer_tensors(state: Any) -> dict[str, torch.Tensor]:
    """The per-parameter tensors (Adam moments, ...) of an optimizer state dict, named ``state.<id>.<key>``."""
    per_param = state.get("state", {}) if isinstance(state, Mapping) else {}
    return {f"state.{pid}.{k}": v for pid, entry in per_param.items() if isinstance(entry, Mapping)
            for k, v in entry.items() if isinstance(v, torch.Tensor)}  # fmt: skip


def load_checkpoint(
    path: str | os.PathLike[str], verify: bool = True, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Load a ``step_*`` folder, or the newest complete checkpoint of a ``save_dir``.

    With ``verify`` (the default) every file listed in meta.json must exist with the recorded size and sha256
    before anything is read. Tensor names, shapes and dtypes are always checked against meta.json. Tensors land
    on ``map_location``.
    """
    folder = resolve_folder(Path(path))
    meta = read_meta(folder)
    if meta.get("layout") == "dcp":  # a sharded checkpoint, gathered whole into this process (no optimizer)
        ck = read_dcp_checkpoint(folder, verify)
        tensors = load_dcp_tensors(folder)
        ema = {"shadow": tensors["ema"], **(ck.ema_meta or {})} if tensors["ema"] else None
        return Checkpoint(folder, ck.step, {k: v.to(map_location) for k, v in tensors["model"].items()}, None,
                          ck.scheduler, ema, ck.rng, ck.data_state, ck.config, ck.backbone, ck.extra, meta)  # fmt: skip
    files = meta["files"]
    for need in ("model.safetensors", "optimizer.pt"):
        if need not in files:
            raise DiffRwkvError(f"{folder / 'meta.json'}: does not list {need}")
    if verify:
        for name, info in files.items():
            verify_file(folder, name, info if isinstance(info, Mapping) else {})
    device = str(map_location)
    model = load_safetensors(folder / "model.safetensors", meta["tensors"].get("model"), device)
    ema = None
    if "ema.safetensors" in files:
        shadow = load_safetensors(folder / "ema.safetensors", meta["tensors"].get("ema"), device)
        ema = {"shadow": shadow, **(meta.get("ema") or {})}
    payload = load_pickle(folder / "optimizer.pt", map_location)
    if not isinstance(payload, dict) or not {"optimizer", "scheduler"} <= payload.keys():
        raise DiffRwkvError(f"{folder / 'optimizer.pt'}: expected a dict with 'optimizer' and 'scheduler'")
    require_finite(_optimizer_tensors(payload["optimizer"]), folder / "optimizer.pt")
    rng = read_rng_files(folder, files)
    if meta["step"] != step_of(folder) and STEP_DIR.match(folder.name):
        raise DiffRwkvError(f"{folder / 'meta.json'}: step {meta['step']} does not match the folder name")
    return Checkpoint(
        path=folder,
        step=meta["step"],
        model_tensors=model,
        optimizer=payload["optimizer"],
        scheduler=payload["scheduler"],
        ema=ema,
        rng=rng,
        data_state=meta.get("data_state") or {},
        config=meta.get("config") or {},
        backbone=meta.get("backbone"),
        extra=meta.get("extra"),
        meta=meta,
    )


def apply_model_tensors(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    where: str = "checkpoint",
    require: Iterable[str] | None = None,
) -> None:
    """Copy checkpoint tensors into ``model``'s parameters and buffers after checking all of them; a mismatch
    loads nothing (:func:`checkpoint_io.copy_checked`)."""
    copy_checked(model.state_dict(keep_vars=True), tensors, where=where, require=require)
