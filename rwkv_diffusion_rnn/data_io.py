"""Shared low-level pieces of the data pipeline: atomic writes, validated readers, the split, latent statistics.

Every reader here raises :class:`~rwkv_diffusion_rnn.errors.DiffRwkvError` with ONE line of the form
``<file>: row <i>: <what is wrong>; expected <what was expected>``, so the command-line tools print it as-is and
:mod:`rwkv_diffusion_rnn.check_data` can collect it as one problem of many.

Dataset JSON (the original scripts' ``train_data.json``): a list of rows ``{"text": str, "latent_path": str,
...}``. A relative ``latent_path`` is resolved against the JSON file's folder and must stay inside it; extra keys
are kept and ignored.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwkv_diffusion_rnn.errors import DiffRwkvError

TOKEN_META = "_meta.json"  # written by the tokenizer beside its .npz files
LATENT_STATS = "latent_stats.json"  # per-dimension mean/std of the training latents


def one_line(value: object, limit: int = 80) -> str:
    """``repr`` of ``value`` cut to ``limit`` characters, safe to embed in a one-line message."""
    text = repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary name in the same folder, then rename: readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: object, indent: int | None = 1) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8"))


def npy_bytes(array: np.ndarray) -> bytes:
    """The bytes of ``np.save(array)`` (serialising in memory is ~5x faster than through a file object)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """The bytes of ``np.savez(**arrays)`` (uncompressed), built in memory."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@contextmanager
def staged_output(final: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging folder that replaces ``final`` (renamed into place) only if the block succeeds.

    The staging folder is ``<final>.partial/final`` so a tool can keep resumable work beside it in
    ``<final>.partial``. On an exception the staging folder is removed and ``final`` is untouched.
    """
    final = Path(final)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise DiffRwkvError(f"{final}: folder exists and is not empty; expected a new output folder (or --overwrite)")
    stage = final.with_name(final.name + ".partial") / "final"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        with suppress(OSError):
            stage.parent.rmdir()  # only if empty: a tool's resumable work in <final>.partial is kept
        raise
    old = final.with_name(f".{final.name}.old.{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(stage.parent, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- dataset JSON


def resolve_inside(root: Path, rel: str, *, where: str, _dirs: dict[str, str] | None = None) -> str:
    """Resolve ``rel`` against ``root``; refuse a path that leaves ``root`` (``../../etc/passwd``, absolute paths,
    symlinked folders pointing outside). ``root`` must already be resolved. ``_dirs`` caches resolved parent folders
    (resolving every file costs ~40 us; 145k rows share a handful of folders)."""
    joined = os.path.normpath(os.path.join(root, rel))
    parent, name = os.path.split(joined)
    cache = _dirs if _dirs is not None else {}
    if parent not in cache:
        cache[parent] = os.path.realpath(parent)
    real_parent = cache[parent]
    root_s = str(root)
    if not (real_parent == root_s or real_parent.startswith(root_s.rstrip(os.sep) + os.sep)) or name in ("", "..", "."):
        raise DiffRwkvError(
            f"{where}: latent_path {one_line(rel)} escapes the data folder; expected a path inside {root}"
        )
    return os.path.join(real_parent, name)


@dataclass(frozen=True)
class DatasetRow:
    """One validated JSON row: its position, text, and (if given) the latent file and its pairing key."""

    row: int
    text: str
    latent_path: str | None  # absolute path (a string: 145k Path objects cost seconds)
    key: str  # token/latent pairing key: the latent file's stem, or the zero-padded row number


def read_dataset_json(
    path: str | os.PathLike,
    *,
    require_latent: bool = True,
    root: Path | None = None,
    on_problem: Callable[[str], None] | None = None,
) -> list[DatasetRow]:
    """Read and validate a seed-format dataset JSON.

    Checks: valid JSON; a list; every row an object with a non-empty string ``text``; ``latent_path`` (when
    ``require_latent``) a string inside ``root`` (default: the JSON's folder); no two rows with the same latent file
    or pairing key. Raises DiffRwkvError naming the file and row at the first problem -- or, with ``on_problem``,
    reports each bad row to it and leaves the row out (a file that is not a JSON list always raises).
    """
    path = Path(path)
    if not path.is_file():
        raise DiffRwkvError(
            f"{path}: file not found; expected the dataset JSON (a list of rows with 'text', 'latent_path')"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DiffRwkvError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); expected a JSON list of rows"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DiffRwkvError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected a UTF-8 JSON file"
        ) from exc
    if not isinstance(data, list):
        raise DiffRwkvError(f"{path}: top level is a JSON {type(data).__name__}; expected a JSON list of rows")
    root = (root or path.parent).resolve()
    dirs: dict[str, str] = {}
    rows: list[DatasetRow] = []
    seen_latent: dict[str, int] = {}
    seen_key: dict[str, int] = {}
    for i, item in enumerate(data):
        try:
            row = _check_row(path, i, item, root, require_latent, seen_latent, seen_key, dirs)
        except DiffRwkvError as exc:
            if on_problem is None:
                raise
            on_problem(str(exc))
            continue
        rows.append(row)
    return rows


def _check_row(path, i, item, root, require_latent, seen_latent, seen_key, dirs) -> DatasetRow:
    where = f"{path}: row {i}"
    if not isinstance(item, dict):
        raise DiffRwkvError(
            f"{where}: is a JSON {type(item).__name__}; expected an object with 'text' and 'latent_path'"
        )
    if "text" not in item:
        keys = ", ".join(sorted(item)) or "none"
        raise DiffRwkvError(f"{where}: has no 'text' (keys: {keys}); expected a non-empty string")
    text = item["text"]
    if not isinstance(text, str):
        raise DiffRwkvError(f"{where}: 'text' is a {type(text).__name__}; expected a non-empty string")
    if not text.strip():
        raise DiffRwkvError(f"{where}: 'text' is empty; expected a non-empty string")
    latent = item.get("latent_path")
    lpath = None
    if latent is None:
        if require_latent:
            raise DiffRwkvError(f"{where}: has no 'latent_path'; expected the path of its .npy latent file")
        key = f"{i:08d}"
    else:
        if not isinstance(latent, str) or not latent:
            raise DiffRwkvError(f"{where}: 'latent_path' is {one_line(latent)}; expected a non-empty string")
        lpath = resolve_inside(root, latent, where=where, _dirs=dirs)
        if lpath in seen_latent:
            raise DiffRwkvError(
                f"{where}: duplicates row {seen_latent[lpath]} (same latent_path {one_line(latent)}); "
                "expected one row per latent file"
            )
        key = os.path.splitext(os.path.basename(lpath))[0]
    if key in seen_key:
        raise DiffRwkvError(
            f"{where}: pairing key {key!r} (latent file name) is also row {seen_key[key]}'s; "
            "expected unique latent file names"
        )
    if lpath is not None:
        seen_latent[lpath] = i
    seen_key[key] = i
    return DatasetRow(i, text, lpath, key)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read ``chunk`` bytes at a time (constant memory for multi-GB files)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    except OSError as exc:
        raise DiffRwkvError(f"{path}: cannot be read for hashing ({_first_line(exc)})") from exc
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- per-row files


def load_latent(path: str | os.PathLike, *, dim: int | None, where: str) -> np.ndarray:
    """Read one latent ``.npy`` -> float32 ``[D]``; shape ``[1, D]`` is accepted. Checks dim and finiteness."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DiffRwkvError(f"{where}: latent file {path} is missing; expected a .npy file") from exc
    except (ValueError, OSError, EOFError) as exc:
        raise DiffRwkvError(
            f"{where}: cannot read latent file {path} ({_first_line(exc)}); expected a complete .npy array"
        ) from exc
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise DiffRwkvError(
            f"{where}: latent file {path} holds dtype {getattr(arr, 'dtype', type(arr))}; expected a float array"
        )
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    expect = f"({dim},)" if dim else "a 1-D vector"
    if arr.ndim != 1 or (dim is not None and arr.shape[0] != dim):
        raise DiffRwkvError(f"{where}: latent file {path} has shape {tuple(arr.shape)}; expected {expect}")
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise DiffRwkvError(f"{where}: latent file {path} has {arr[bad]} at dimension {bad}; expected finite values")
    return arr.astype(np.float32, copy=False)


def load_tokens(path: str | os.PathLike, *, where: str, vocab_limit: int | None = None) -> np.ndarray:
    """Read one token ``.npz`` -> int64 ``[L]`` (L >= 1) of the attended positions.

    Accepts ``input_ids`` of shape ``[L]`` or ``[1, L]`` and an optional ``attention_mask`` of the same shape; masked
    positions (upstream files were padded) are dropped, so padding never reaches the model as text.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            if "input_ids" not in z.files:
                raise DiffRwkvError(
                    f"{where}: token file {path} has keys {z.files}; expected 'input_ids' (and 'attention_mask')"
                )
            ids = z["input_ids"]
            mask = z["attention_mask"] if "attention_mask" in z.files else None
    except FileNotFoundError as exc:
        raise DiffRwkvError(
            f"{where}: token file {path} is missing; expected a .npz file (run diffrwkv tokenize)"
        ) from exc
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DiffRwkvError(
            f"{where}: cannot read token file {path} ({_first_line(exc)}); expected a complete .npz"
        ) from exc
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
        mask = mask[0] if mask is not None and mask.ndim == 2 else mask
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise DiffRwkvError(
            f"{where}: token file {path} has input_ids {ids.dtype}{list(ids.shape)}; expected a 1-D integer array"
        )
    if mask is not None:
        if mask.shape != ids.shape:
            raise DiffRwkvError(
                f"{where}: token file {path} has attention_mask {list(mask.shape)} vs input_ids {list(ids.shape)}; "
                "expected equal lengths"
            )
        if not mask.all():
            ids = ids[mask.astype(bool)]
    if ids.size == 0:
        raise DiffRwkvError(f"{where}: token file {path} has no tokens; expected at least one")
    ids = ids.astype(np.int64, copy=False)
    if ids.min() < 0 or (vocab_limit is not None and ids.max() >= vocab_limit):
        raise DiffRwkvError(
            f"{where}: token file {path} has ids in [{ids.min()}, {ids.max()}]; expected 0 <= id < {vocab_limit}"
        )
    return ids


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if "pickled data" in text:  # np.load's guess for a file without the .npy/.npz magic bytes
        return "not a NumPy file: no .npy/.npz header"
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


# ------------------------------------------------------------------------------------------------------ split


def split_keys(keys: Sequence[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split -> (train positions, validation positions), both ascending.

    A row goes to validation when its seeded hash is among the ``round(fraction * N)`` smallest (at least one row
    when ``fraction > 0`` and N > 1). Hashing the key rather than shuffling positions keeps a row's side stable when
    rows are added or reordered.
    """
    n = len(keys)
    if not 0.0 <= fraction < 1.0:
        raise DiffRwkvError(f"validation_fraction is {fraction}; expected 0 <= fraction < 1")
    n_val = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    if n_val == 0:
        return np.arange(n), np.arange(0)
    salt = f"{seed}:".encode()
    h = np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + k.encode(), digest_size=8).digest(), "little") for k in keys),
        dtype=np.uint64,
        count=n,
    )
    order = np.argsort(h, kind="stable")
    val = np.sort(order[:n_val])
    mask = np.ones(n, dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask), val


# ------------------------------------------------------------------------------------------------ latent stats


@dataclass
class LatentStats:
    """Per-dimension mean and standard deviation of training latents (the diffusion standardises with them).

    ``mean``, ``std``: float64 ``[D]``; ``count``: rows they were computed on. ``std`` is floored at ``1e-6``.
    """

    mean: np.ndarray
    std: np.ndarray
    count: int

    @classmethod
    def compute(cls, latents: np.ndarray, chunk: int = 1 << 16) -> LatentStats:
        """From ``latents`` ``[N, D]`` (may be a memory map; read in chunks, accumulated in float64)."""
        if latents.ndim != 2 or latents.shape[0] == 0:
            raise DiffRwkvError(f"latent statistics need an [N, D] array with N > 0; got shape {tuple(latents.shape)}")
        n, d = latents.shape
        s = np.zeros(d)
        for i in range(0, n, chunk):
            s += latents[i : i + chunk].sum(0, dtype=np.float64)
        mean = s / n
        ss = np.zeros(d)
        for i in range(0, n, chunk):  # second pass on centred values: no catastrophic cancellation
            ss += ((latents[i : i + chunk] - mean) ** 2).sum(0)
        return cls(mean, np.maximum(np.sqrt(ss / max(n - 1, 1)), 1e-6), n)

    def standardize(self, x):
        """``(x - mean) / std`` for a numpy array or torch tensor ``[..., D]``."""
        mean, std = self._as(x)
        return (x - mean) / std

    def unstandardize(self, x):
        mean, std = self._as(x)
        return x * std + mean

    def _as(self, x):
        if isinstance(x, np.ndarray):
            return self.mean.astype(x.dtype), self.std.astype(x.dtype)
        import torch

        return (
            torch.as_tensor(self.mean, dtype=x.dtype, device=x.device),
            torch.as_tensor(self.std, dtype=x.dtype, device=x.device),
        )

    def to_dict(self) -> dict:
        return {
            "dim": int(self.mean.shape[0]),
            "count": int(self.count),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
        }

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatentStats:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            mean, std = np.asarray(d["mean"], np.float64), np.asarray(d["std"], np.float64)
            count = int(d["count"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DiffRwkvError(
                f"{path}: cannot read latent statistics ({_first_line(exc)}); expected JSON with 'mean', 'std', 'count'"
            ) from exc
        if (
            mean.ndim != 1
            or mean.shape != std.shape
            or not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all())
        ):
            raise DiffRwkvError(
                f"{path}: 'mean' {list(mean.shape)} / 'std' {list(std.shape)}; expected two finite [D] lists, std > 0"
            )
        return cls(mean, std, count)


def latent_norm_summary(latents: np.ndarray) -> dict[str, float]:
    """min / mean / max of the row L2 norms of ``latents`` ``[N, D]`` (for check-data reports)."""
    norms = np.sqrt((np.asarray(latents, dtype=np.float64) ** 2).sum(-1))
    return {"min": float(norms.min()), "mean": float(norms.mean()), "max": float(norms.max())} if norms.size else {}


def extract_tar(archive: tarfile.TarFile, dest: str | os.PathLike) -> None:
    """Extract ``archive`` under ``dest``, plain files and folders only, none outside it: tarfile's "data" filter
    where this Python has it (3.12, and 3.11.4 / 3.10.12 on), else the same refusal by hand, so an older 3.10 or 3.11
    neither fails on the filter argument nor extracts an unchecked archive."""
    if hasattr(tarfile, "data_filter"):
        archive.extractall(dest, filter="data")
        return
    root = Path(dest).resolve()
    for m in archive.getmembers():
        target = (root / m.name).resolve()
        if not (m.isfile() or m.isdir()) or (target != root and root not in target.parents):
            raise DiffRwkvError(
                f"{archive.name}: member {m.name!r}: expected a plain file or folder inside the archive's own folder"
            )
    archive.extractall(root)
