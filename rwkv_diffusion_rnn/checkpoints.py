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

Format versions: ``FORMAT_VERSION`` is written to meta.json. A loader meeting an older version runs the chain
``_MIGRATIONS[v]`` (meta of version v -> meta of version v + 1) up to the current one before reading any file; a newer
version is refused with a message. To change the layout: bump ``FORMAT_VERSION``, add the ``_MIGRATIONS`` entry that
rewrites an old meta (renamed keys, file names, tensor names), and keep a small checkpoint of the old version under
``tests/`` that must keep loading.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from rwkv_diffusion_rnn.errors import DiffRwkvError

FORMAT_VERSION = 1
_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}  # v -> (meta v -> meta v + 1)
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_RNG_FILE = re.compile(r"^rng_rank(\d+)\.pt$")
_STALE_PREFIXES = (".tmp-step_", ".trash-step_")


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


# --------------------------------------------------------------------------------------------------------- hashing


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read ``chunk`` bytes at a time (constant memory for multi-GB backbones)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    except OSError as exc:
        raise DiffRwkvError(f"{path}: cannot be read for hashing ({_one_line(exc)})") from exc
    return h.hexdigest()


def backbone_reference(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"path", "sha256", "bytes"}`` of a backbone file, or of a folder (hash over its sorted files' hashes)."""
    p = Path(path).resolve()
    if p.is_file():
        return {"path": str(p), "sha256": file_sha256(p), "bytes": p.stat().st_size}
    if not p.is_dir():
        raise DiffRwkvError(f"{p}: backbone not found")
    files = sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p).as_posix()}\0{file_sha256(f)}\n".encode())
    return {"path": str(p), "sha256": h.hexdigest(), "bytes": sum(f.stat().st_size for f in files)}


def verify_backbone(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None, where: str) -> None:
    """Refuse to resume on another backbone than the checkpoint was trained on (compares sha256 only)."""
    if saved is None or current is None:
        return
    if saved.get("sha256") != current.get("sha256"):
        raise DiffRwkvError(
            f"{where}: trained on backbone {saved.get('path')} (sha256 {str(saved.get('sha256'))[:12]}...), "
            f"but this run uses {current.get('path')} (sha256 {str(current.get('sha256'))[:12]}...)"
        )


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
        raise DiffRwkvError(f"RNG state: malformed ({_one_line(exc)})") from exc


# -------------------------------------------------------------------------------------------------------- checking


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_json(obj: Any, where: str) -> None:
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
            _check_json(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_json(v, f"{where}[{i}]")
        return
    raise DiffRwkvError(f"{where}: a {type(obj).__name__} cannot be written to meta.json (JSON values only)")


_PICKLE_LEAVES = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_weights_only(obj: Any, where: str) -> None:
    """Raise naming the first value that ``torch.load(weights_only=True)`` would refuse (custom classes, numpy)."""
    t = type(obj)
    if t in _PICKLE_LEAVES or t is torch.Tensor or t is nn.Parameter:
        return
    if t in (dict, collections.OrderedDict):
        for k, v in obj.items():
            _check_weights_only(k, f"{where} key")
            _check_weights_only(v, f"{where}[{k!r}]")
        return
    if t in (list, tuple):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}[{i}]")
        return
    raise DiffRwkvError(
        f"{where}: a {t.__module__}.{t.__qualname__} would not load with weights_only=True; "
        "save plain tensors, numbers, strings, lists and dicts"
    )


def _plain_tensors(tensors: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
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


def _tensor_info(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    return {n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for n, t in tensors.items()}


# --------------------------------------------------------------------------------------------------------- writing


def _fsync_path(path: Path) -> None:
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


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync_path(path)


def _write_torch(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _discard(folder: Path, save_dir: Path) -> None:
    """Remove a folder so that no crash leaves it half-deleted under a ``step_*`` name: rename first."""
    trash = save_dir / f".trash-{folder.name}-{secrets.token_hex(4)}"
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale(save_dir: Path) -> None:
    for child in save_dir.iterdir():
        if child.name.startswith(_STALE_PREFIXES) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def _meta(step, config, data_state, backbone, extra, ema_meta, rng_ranks, files, tensors, **layout) -> dict[str, Any]:
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
    model = _plain_tensors(model_tensors, "model_tensors")
    ema_tensors, ema_meta = None, None
    if ema is not None:
        if not isinstance(ema, Mapping) or "shadow" not in ema:
            raise DiffRwkvError("ema: expected EMA.state_dict() output with a 'shadow' dict of tensors")
        ema_tensors = _plain_tensors(ema["shadow"], "ema.shadow")
        ema_meta = {k: v for k, v in ema.items() if k != "shadow"}
    per_rank = dict(rng) if rng and all(isinstance(k, int) and not isinstance(k, bool) for k in rng) else {rank: rng}
    if not all(isinstance(s, Mapping) and "torch" in s for s in per_rank.values()):
        raise DiffRwkvError("rng: expected capture_rng_state() output, or {rank: capture_rng_state()} for every rank")
    opt_payload = {"optimizer": optimizer, "scheduler": scheduler}
    _check_weights_only(opt_payload, "optimizer.pt")
    for r, s in per_rank.items():
        _check_weights_only(s, f"rng_rank{r}.pt")
    for name, value in (("config", config), ("data_state", data_state), ("backbone", backbone), ("extra", extra)):
        _check_json(value, name)
    _check_json(ema_meta, "ema")
    if backbone is not None and not {"path", "sha256"} <= set(backbone):
        raise DiffRwkvError("backbone: expected a reference {'path': ..., 'sha256': ...} (see backbone_reference)")

    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale(save_dir)
        tmp = save_dir / f".tmp-{final.name}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as exc:
        raise DiffRwkvError(f"{save_dir}: cannot create a checkpoint folder here ({_one_line(exc)})") from exc
    try:
        files = {"model.safetensors": lambda p: _write_safetensors(p, model)}
        if ema_tensors is not None:
            files["ema.safetensors"] = lambda p: _write_safetensors(p, ema_tensors)
        files["optimizer.pt"] = lambda p: _write_torch(p, opt_payload)
        for r, s in sorted(per_rank.items()):
            files[f"rng_rank{r}.pt"] = lambda p, s=s: _write_torch(p, s)
        digests = {}
        for name, write in files.items():
            write(tmp / name)
            digests[name] = {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
        tensors = {"model": _tensor_info(model), "ema": _tensor_info(ema_tensors) if ema_tensors else None}
        meta = _meta(step, config, data_state, backbone, extra, ema_meta, sorted(per_rank), digests, tensors)
        _write_json(tmp / "meta.json", meta)
        _fsync_path(tmp)
        if final.exists():
            _discard(final, save_dir)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, DiffRwkvError):
            raise DiffRwkvError(f"{final}: checkpoint not written ({_one_line(exc)})") from exc
        raise
    try:  # make the rename durable; the checkpoint is complete either way
        _fsync_path(save_dir)
    except OSError as exc:
        warnings.warn(f"{save_dir}: fsync after the rename failed ({_one_line(exc)})", stacklevel=2)
    _prune(save_dir, final, keep_last)
    return final


def _prune(save_dir: Path, written: Path, keep_last: int | None) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints; ``written`` always stays. Never raises."""
    ckpts = list_checkpoints(save_dir)
    newer = [c.name for c in ckpts if _step_of(c) > _step_of(written)]
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
                _discard(c, save_dir)
            except OSError as exc:
                warnings.warn(f"{c}: old checkpoint not pruned ({_one_line(exc)})", stacklevel=3)


# --------------------------------------------------------------------------------------------------------- reading


def _step_of(folder: Path) -> int:
    m = _STEP_DIR.match(folder.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(save_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints in ``save_dir`` (``step_*`` folders holding meta.json), oldest step first."""
    d = Path(save_dir)
    if not d.is_dir():
        return []
    found = [c for c in d.iterdir() if _STEP_DIR.match(c.name) and c.is_dir() and (c / "meta.json").is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(save_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint of the highest step in ``save_dir``, or None."""
    ckpts = list_checkpoints(save_dir)
    return ckpts[-1] if ckpts else None


def _resolve(path: Path) -> Path:
    if not path.exists():
        raise DiffRwkvError(f"{path}: checkpoint path not found")
    if (path / "meta.json").is_file():
        return path
    if _STEP_DIR.match(path.name):
        raise DiffRwkvError(f"{path / 'meta.json'}: missing; not a complete checkpoint")
    latest = latest_checkpoint(path)
    if latest is None:
        raise DiffRwkvError(f"{path}: no complete checkpoint here (no step_* folder holding meta.json)")
    return latest


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffRwkvError(f"{path}: unreadable ({_one_line(exc)})") from exc
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int):
        raise DiffRwkvError(f"{path}: no integer format_version; not a DiffRwkv checkpoint")
    if version > FORMAT_VERSION:
        raise DiffRwkvError(f"{path}: format_version {version} is newer than this code reads ({FORMAT_VERSION})")
    while version < FORMAT_VERSION:
        if version not in _MIGRATIONS:
            raise DiffRwkvError(f"{path}: format_version {version} is no longer supported")
        meta = _MIGRATIONS[version](meta)
        version = meta["format_version"]
    for key, kind in (("step", int), ("files", dict), ("tensors", dict)):
        if not isinstance(meta.get(key), kind):
            raise DiffRwkvError(f"{path}: '{key}' missing or not a {kind.__name__}")
    if meta.get("layout") == "dcp":
        _check_files(folder, meta["files"])
        return meta
    for name in meta["files"]:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise DiffRwkvError(f"{path}: file entry {name!r} is not a plain file name (path traversal refused)")
    return meta


def _verify_file(folder: Path, name: str, info: Mapping[str, Any]) -> None:
    path = folder / name
    if not path.is_file():
        raise DiffRwkvError(f"{path}: missing (listed in meta.json)")
    size = path.stat().st_size
    if size != info.get("bytes"):
        raise DiffRwkvError(f"{path}: {size} bytes, meta.json says {info.get('bytes')} (truncated or replaced)")
    if file_sha256(path) != info.get("sha256"):
        raise DiffRwkvError(f"{path}: sha256 does not match meta.json (corrupted or modified)")


def _load_safetensors(path: Path, expected: Mapping[str, Any] | None, device: str) -> dict[str, torch.Tensor]:
    try:
        tensors = safetensors.torch.load_file(str(path), device=device)
    except Exception as exc:  # SafetensorError, OSError, a bad device string: all mean "cannot read this file"
        raise DiffRwkvError(f"{path}: unreadable safetensors ({_one_line(exc)})") from exc
    if expected is not None:
        got = _tensor_info(tensors)
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


def _optimizer_tensors(state: Any) -> dict[str, torch.Tensor]:
    """The per-parameter tensors (Adam moments, ...) of an optimizer state dict, named ``state.<id>.<key>``."""
    per_param = state.get("state", {}) if isinstance(state, Mapping) else {}
    return {f"state.{pid}.{k}": v for pid, entry in per_param.items() if isinstance(entry, Mapping)
            for k, v in entry.items() if isinstance(v, torch.Tensor)}  # fmt: skip


def _load_pickle(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise DiffRwkvError(
                f"{path}: refused, it references {found.group(1)} which weights_only loading does not allow "
                "(a pickle that could run code)"
            ) from exc
        raise DiffRwkvError(f"{path}: unreadable ({_one_line(exc)})") from exc


def load_checkpoint(
    path: str | os.PathLike[str], verify: bool = True, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Load a ``step_*`` folder, or the newest complete checkpoint of a ``save_dir``.

    With ``verify`` (the default) every file listed in meta.json must exist with the recorded size and sha256
    before anything is read. Tensor names, shapes and dtypes are always checked against meta.json. Tensors land
    on ``map_location``.
    """
    folder = _resolve(Path(path))
    meta = _read_meta(folder)
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
            _verify_file(folder, name, info if isinstance(info, Mapping) else {})
    device = str(map_location)
    model = _load_safetensors(folder / "model.safetensors", meta["tensors"].get("model"), device)
    ema = None
    if "ema.safetensors" in files:
        shadow = _load_safetensors(folder / "ema.safetensors", meta["tensors"].get("ema"), device)
        ema = {"shadow": shadow, **(meta.get("ema") or {})}
    payload = _load_pickle(folder / "optimizer.pt", map_location)
    if not isinstance(payload, dict) or not {"optimizer", "scheduler"} <= payload.keys():
        raise DiffRwkvError(f"{folder / 'optimizer.pt'}: expected a dict with 'optimizer' and 'scheduler'")
    require_finite(_optimizer_tensors(payload["optimizer"]), folder / "optimizer.pt")
    rng = {}
    for name in files:
        m = _RNG_FILE.match(name)
        if m:
            state = _load_pickle(folder / name, "cpu")
            if not isinstance(state, dict) or "torch" not in state:
                raise DiffRwkvError(f"{folder / name}: not an RNG state")
            rng[int(m.group(1))] = state
    if meta["step"] != _step_of(folder) and _STEP_DIR.match(folder.name):
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


@torch.no_grad()
def apply_model_tensors(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    where: str = "checkpoint",
    require: Iterable[str] | None = None,
) -> None:
    """Copy checkpoint tensors into ``model`` after checking all of them; a mismatch loads nothing.

    Every name must be a parameter or buffer of ``model`` with the same shape and dtype, and every name in
    ``require`` (e.g. the model's trainable parameters) must be present; else a one-line error names the tensor.
    """
    live = model.state_dict(keep_vars=True)
    for name in sorted(require or ()):
        if name not in tensors:
            raise DiffRwkvError(f"{where}: tensor {name!r} is missing (this model trains it)")
    for name, t in tensors.items():
        if name not in live:
            raise DiffRwkvError(f"{where}: tensor {name!r} does not exist in this model (another configuration?)")
        target = live[name]
        if t.shape != target.shape or t.dtype != target.dtype:
            raise DiffRwkvError(
                f"{where}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, "
                f"this model has {target.dtype} {tuple(target.shape)}"
            )
    for name, t in tensors.items():
        live[name].copy_(t)


# ------------------------------------------------------------------------------ distributed (DCP) checkpoints
#
# Layout of ``save_dir/step_{step:08d}/`` when ``meta.json`` says ``"layout": "dcp"``::
#
#     dcp/                 torch.distributed.checkpoint files (``.metadata`` + one ``__<rank>_0.distcp`` per rank):
#                          {"model": {name: trainable tensor}, "ema": {name: shadow}, "optim": optimizer state
#                          keyed by parameter name} -- saved sharded, loadable on any number of ranks (resharded)
#     trainer_state.pt     {"scheduler": state dict} (torch.save, rank 0)
#     rng_rank{r}.pt       every saving rank's RNG state (gathered to rank 0)
#     meta.json            as for the file layout, plus "layout", "world_size"; "files" lists dcp/* too
#
# The same promises hold: every rank writes into one ``.tmp-step_*`` folder whose name rank 0 chose, rank 0 renames
# it after all ranks have finished, keep-last-k prunes, and every file is sha256-verified before a load.

DCP_DIR = "dcp"


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
            for name, value in (("config", config), ("data_state", data_state), ("backbone", backbone),
                                ("extra", extra), ("ema", ema_meta)):  # fmt: skip
                _check_json(value, name)
            _check_weights_only({"scheduler": scheduler}, "trainer_state.pt")
            save_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale(save_dir)
            tmp = save_dir / f".tmp-{final.name}-{secrets.token_hex(4)}"
            tmp.mkdir()
            plan = {"tmp": str(tmp)}
        except DiffRwkvError as exc:
            plan = {"error": str(exc)}
        except OSError as exc:
            plan = {"error": f"{save_dir}: cannot create a checkpoint folder here ({_one_line(exc)})"}
    plan = _raise_if_error(_collective_broadcast(plan))
    tmp = Path(plan["tmp"])
    try:
        dcp.save(state, checkpoint_id=str(tmp / DCP_DIR))
        err = None
    except Exception as exc:  # noqa: BLE001 -- reported on every rank below
        err = f"{final}: checkpoint not written ({_one_line(exc)})"
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
            _write_torch(tmp / "trainer_state.pt", {"scheduler": scheduler})
            for r, s in sorted((rng or {}).items()):
                _write_torch(tmp / f"rng_rank{r}.pt", s)
            digests = {}
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel = f.relative_to(tmp).as_posix()
                _fsync_path(f)
                digests[rel] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
            _fsync_path(tmp / DCP_DIR)
            meta = _meta(step, config, data_state, backbone, extra, ema_meta, sorted(rng or {}), digests, tensors={},
                         layout="dcp", world_size=world_size)  # fmt: skip
            _write_json(tmp / "meta.json", meta)
            _fsync_path(tmp)
            if final.exists():
                _discard(final, save_dir)
            os.replace(tmp, final)
            try:
                _fsync_path(save_dir)
            except OSError as exc:
                warnings.warn(f"{save_dir}: fsync after the rename failed ({_one_line(exc)})", stacklevel=2)
            _prune(save_dir, final, keep_last)
            result = {"path": str(final)}
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            msg = str(exc) if isinstance(exc, DiffRwkvError) else f"{final}: checkpoint not written ({_one_line(exc)})"
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


def peek_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """``(folder, meta.json)`` of a ``step_*`` folder or of the newest checkpoint in a ``save_dir``, without
    reading or verifying any other file (``meta["layout"]`` is ``"dcp"`` for a distributed checkpoint)."""
    folder = _resolve(Path(path))
    return folder, _read_meta(folder)


def _check_files(folder: Path, files: Mapping[str, Any]) -> None:
    for name in files:
        parts = Path(name).parts if isinstance(name, str) else ()
        if not parts or any(p in ("", ".", "..") for p in parts) or Path(name).is_absolute():
            raise DiffRwkvError(f"{folder / 'meta.json'}: file entry {name!r} is not a plain path (refused)")
        if len(parts) > 1 and parts[0] != DCP_DIR:
            raise DiffRwkvError(f"{folder / 'meta.json'}: file entry {name!r} is outside {DCP_DIR}/ (refused)")


def read_dcp_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> DcpCheckpoint:
    """Read a DCP checkpoint's meta, scheduler and RNG states, after checking every file's size and sha256
    (``verify``) -- on rank 0 only when a process group is up, the verdict is shared so every rank fails alike."""
    import torch.distributed as dist

    folder = Path(path)
    verdict: Any = None
    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if is_main:
        try:
            folder = _resolve(folder)
            meta = _dcp_meta(folder)
            if verify:
                for name, info in meta["files"].items():
                    _verify_file(folder, name, info if isinstance(info, Mapping) else {})
            verdict = {"path": str(folder)}
        except DiffRwkvError as exc:
            verdict = {"error": str(exc)}
    folder = Path(_raise_if_error(_collective_broadcast(verdict))["path"])
    meta = _dcp_meta(folder)
    payload = _load_pickle(folder / "trainer_state.pt", "cpu")
    if not isinstance(payload, dict) or "scheduler" not in payload:
        raise DiffRwkvError(f"{folder / 'trainer_state.pt'}: expected a dict with 'scheduler'")
    rng = {}
    for name in meta["files"]:
        m = _RNG_FILE.match(name)
        if m:
            state = _load_pickle(folder / name, "cpu")
            if not isinstance(state, dict) or "torch" not in state:
                raise DiffRwkvError(f"{folder / name}: not an RNG state")
            rng[int(m.group(1))] = state
    return DcpCheckpoint(folder, meta["step"], payload["scheduler"], rng, meta.get("data_state") or {},
                         meta.get("config") or {}, meta.get("backbone"), meta.get("extra"), meta.get("ema"),
                         meta)  # fmt: skip


def _dcp_meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffRwkvError(f"{path}: unreadable ({_one_line(exc)})") from exc
    if not isinstance(meta, dict) or meta.get("layout") != "dcp":
        raise DiffRwkvError(f"{path}: not a distributed (dcp) checkpoint")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise DiffRwkvError(f"{path}: format_version {meta.get('format_version')} is not one this code reads")
    for key, kind in (("step", int), ("files", dict)):
        if not isinstance(meta.get(key), kind):
            raise DiffRwkvError(f"{path}: '{key}' missing or not a {kind.__name__}")
    _check_files(folder, meta["files"])
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
        raise DiffRwkvError(f"{where}: unreadable distributed checkpoint ({_one_line(exc)})") from exc
    require_finite(want, where)
    out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    for key, t in want.items():
        section, name = key.split(".", 1)
        out[section][name] = t
    return out
