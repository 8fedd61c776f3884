"""Backbone references: the ``{"path", "sha256", "bytes"}`` a checkpoint or saved model records for a frozen
pretrained backbone it does not copy, and the check that refuses a backbone changed since.

A backbone is a file (BlinkDL ``.pth``, ``.safetensors``) or a Hugging Face folder. A file's digest is its sha256. A
folder's digest covers exactly what :func:`pretrained_rwkv.read_local_checkpoint` reads from it -- its top-level
``*.safetensors`` and ``*.pth`` weight files and ``config.json`` -- in name order: ``sha256`` over one line
``<name>\\0<file sha256>\\n`` per file. Tokenizer files and anything else in the folder are not part of it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rwkv_diffusion_rnn.data_io import file_sha256
from rwkv_diffusion_rnn.errors import DiffRwkvError

FOLDER_PATTERNS = ("*.safetensors", "*.pth", "config.json")
# (folder, ((name, bytes, mtime_ns), ...)) -> digest: a checkpoint save re-hashes a multi-GB folder only when a file
# in it changed
_FOLDER_DIGESTS: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def backbone_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The files of a backbone folder that its digest covers, in name order."""
    p = Path(folder)
    return sorted({f for pattern in FOLDER_PATTERNS for f in p.glob(pattern) if f.is_file()}, key=lambda f: f.name)


def backbone_sha256(path: str | os.PathLike[str]) -> str:
    """The digest of a backbone file or folder (see the module docstring)."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if not p.is_dir():
        raise DiffRwkvError(f"{p}: backbone not found; expected a .pth / .safetensors file or a Hugging Face folder")
    files = backbone_files(p)
    if not files:
        raise DiffRwkvError(f"{p}: backbone folder holds no *.safetensors, *.pth or config.json to hash")
    stats = tuple((f.name, (st := f.stat()).st_size, st.st_mtime_ns) for f in files)
    key = (str(p.resolve()), stats)
    if key not in _FOLDER_DIGESTS:
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
        _FOLDER_DIGESTS[key] = h.hexdigest()
    return _FOLDER_DIGESTS[key]


def backbone_reference(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"path", "sha256", "bytes"}`` of a backbone file or folder (``bytes``: of the files the digest covers)."""
    p = Path(path).resolve()
    digest = backbone_sha256(p)
    files = [p] if p.is_file() else backbone_files(p)
    return {"path": str(p), "sha256": digest, "bytes": sum(f.stat().st_size for f in files)}


def with_backbone_digest(ref: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``ref`` with its ``sha256`` filled in when it has none and its path exists (a folder's reference is made
    without one), so that what a checkpoint records can be checked later; other references as they are."""
    if ref is None:
        return None
    ref = dict(ref)
    if ref.get("sha256") is None and ref.get("path") and Path(ref["path"]).exists():
        ref["sha256"] = backbone_sha256(ref["path"])
    return ref


def verify_backbone(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None, where: str) -> None:
    """Refuse to resume on another backbone than the checkpoint was trained on, or on its file or folder changed
    since (compares digests; a reference without one gets it from its path now)."""
    if saved is None or current is None:
        return
    if saved.get("sha256") is None and current.get("sha256") is None:
        return  # a folder recorded by a checkpoint written before folders were hashed: nothing to compare
    current = with_backbone_digest(current)
    if saved.get("sha256") != current.get("sha256"):
        raise DiffRwkvError(
            f"{where}: trained on backbone {saved.get('path')} (sha256 {str(saved.get('sha256'))[:12]}...), "
            f"but this run uses {current.get('path')} (sha256 {str(current.get('sha256'))[:12]}...)"
        )
