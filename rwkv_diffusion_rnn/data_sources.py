"""Row stores behind :class:`~rwkv_diffusion_rnn.data_simple.PairedTextLatentDataset`: per-row files or a pack.

A store maps a row number (the row of the dataset JSON, or of the pack) to its token ids, latent and text, and
knows how to describe a row in an error message. Two layouts, detected by :func:`open_store`:

* **Per-row files** (the original scripts' layout): ``train_data.json`` + ``latents/train/<key>.npy`` +
  ``rwkv_tokens/train/<key>.npz``. Rows pair by key (the latent file's stem), through the JSON when there is one,
  else by file names.
* **Packed** (``diffrwkv pack``): ``pack_meta.json`` plus memory-mapped ``latents.npy`` float32 ``[N, D]``,
  ``tokens.npy`` uint16/int32 ``[sum L]``, ``offsets.npy`` int64 ``[N + 1]`` and optional ``text_bytes.npy`` uint8 +
  ``text_offsets.npy`` int64. Memory maps are opened lazily in each process, so DataLoader workers share the page
  cache instead of pickling arrays.

Construction checks structure and counts (fast: no file is opened per row). Problems are passed to ``on_problem``;
the default raises, check-data and ``on_bad_sample='skip'`` collect them instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rwkv_diffusion_rnn.data_io import (
    LATENT_STATS,
    TOKEN_META,
    file_sha256,
    load_latent,
    load_tokens,
    read_dataset_json,
)
from rwkv_diffusion_rnn.errors import DiffRwkvError

PACK_META = "pack_meta.json"
PACK_FORMAT = "diffrwkv-pack/1"
Problem = Callable[[str], None]


def _raise(msg: str) -> None:
    raise DiffRwkvError(msg)


def _names(folder: Path, suffix: str) -> set[str]:
    """Stems of the files in ``folder`` ending in ``suffix`` (one directory scan, not one stat per row)."""
    try:
        with os.scandir(folder) as it:
            return {e.name[: -len(suffix)] for e in it if e.name.endswith(suffix) and not e.name.startswith(".")}
    except FileNotFoundError:
        return set()


class FileStore:
    """Per-row file layout. ``rows`` are JSON rows (or, without a JSON, the sorted common file stems)."""

    kind = "files"

    def __init__(
        self,
        json_path: str | None,
        token_dir: str,
        latent_dir: str = "",
        *,
        latent_dim: int | None = 32,
        on_problem: Problem = _raise,
    ) -> None:
        self.token_dir = Path(token_dir)
        if not self.token_dir.is_dir():
            raise DiffRwkvError(f"{self.token_dir}: token folder not found; expected the output of diffrwkv tokenize")
        self.latent_dim = latent_dim
        self.json_path = Path(json_path) if json_path else _find_json(latent_dir)
        meta = _read_token_meta(self.token_dir)
        token_names = _names(self.token_dir, ".npz")
        self.vocab_limit = meta.get("vocab_size") if meta else None
        if self.json_path is not None:
            rows = read_dataset_json(self.json_path, on_problem=None if on_problem is _raise else on_problem)
            self.json_rows = [r.row for r in rows]  # differ from positions only when bad JSON rows were left out
            self.keys = [r.key for r in rows]
            self.texts: list[str] | None = [r.text for r in rows]
            self.latent_paths = [r.latent_path for r in rows]
            self.stats_path = self.json_path.parent / LATENT_STATS
            if meta and meta.get("json_sha256") and meta.get("json_sha256") != file_sha256(self.json_path):
                on_problem(
                    f"{self.token_dir / TOKEN_META}: tokens were made from another version of {self.json_path} "
                    f"({meta.get('rows')} rows then, {len(rows)} now); expected tokens of this JSON (re-run tokenize)"
                )
        else:
            if not latent_dir:
                raise DiffRwkvError(
                    f"{self.token_dir}: no dataset JSON found; expected data.json_path or data.latent_dir"
                )
            latent_root = Path(latent_dir)
            latent_names = _names(latent_root, ".npy")
            self.keys = sorted(latent_names)
            self.texts = None
            self.latent_paths = [os.path.join(latent_root, f"{k}.npy") for k in self.keys]
            self.stats_path = latent_root / LATENT_STATS
            if not self.keys:
                raise DiffRwkvError(f"{latent_root}: no .npy latent files; expected one per row")
        self.good = np.ones(len(self.keys), dtype=bool)
        self._check_files(token_names, on_problem)
        self.lengths = _meta_lengths(meta, self.keys)

    def _check_files(self, token_names: set[str], on_problem: Problem) -> None:
        latent_names: dict[str, set[str]] = {}
        for i, (key, lpath) in enumerate(zip(self.keys, self.latent_paths, strict=True)):
            folder, name = os.path.split(lpath)
            if folder not in latent_names:
                latent_names[folder] = _names(Path(folder), ".npy")
            if not name.endswith(".npy") or name[:-4] not in latent_names[folder]:
                self.good[i] = False
                on_problem(f"{self.describe(i)}: latent file {lpath} is missing; expected a .npy file")
            if key not in token_names:
                self.good[i] = False
                on_problem(
                    f"{self.describe(i)}: token file {self.token_dir / (key + '.npz')} is missing; expected a .npz"
                )
        extra = len(token_names - set(self.keys))
        if extra:
            example = sorted(token_names - set(self.keys))[0]
            on_problem(
                f"{self.token_dir}: {len(token_names)} .npz files but {len(self.keys)} rows ({extra} not referenced, "
                f"e.g. {example}.npz); expected one token file per row (stale files? tokenize into an empty folder)"
            )

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self, row: int) -> str:
        if self.json_path is not None:
            return f"{self.json_path}: row {self.json_rows[row]}"
        return f"{self.token_dir}: row {row} (key {self.keys[row]})"

    def tokens(self, row: int) -> np.ndarray:
        path = os.path.join(self.token_dir, self.keys[row] + ".npz")
        return load_tokens(path, where=self.describe(row), vocab_limit=self.vocab_limit)

    def latent(self, row: int) -> np.ndarray:
        return load_latent(self.latent_paths[row], dim=self.latent_dim, where=self.describe(row))

    def text(self, row: int) -> str | None:
        return self.texts[row] if self.texts is not None else None


class PackStore:
    """Packed layout, memory-mapped. Validation of the whole pack is vectorised (seconds for millions of rows)."""

    kind = "packed"

    def __init__(self, pack_dir: str, *, latent_dim: int | None = 32, on_problem: Problem = _raise) -> None:
        self.dir = Path(pack_dir)
        meta_path = self.dir / PACK_META
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DiffRwkvError(
                f"{meta_path}: cannot read ({exc}); expected the metadata written by diffrwkv pack"
            ) from exc
        if self.meta.get("format") != PACK_FORMAT:
            raise DiffRwkvError(f"{meta_path}: format {self.meta.get('format')!r}; expected {PACK_FORMAT!r}")
        self.latent_dim = latent_dim
        self.stats_path = self.dir / LATENT_STATS
        self.vocab_limit = self.meta.get("vocab_size")
        self._arrays: dict[str, np.ndarray] | None = None
        a = self.arrays
        n = int(self.meta["count"])
        self.where_prefix = f"{self.dir}: row"
        lat, off, tok = a["latents"], a["offsets"], a["tokens"]
        if lat.ndim != 2 or lat.shape[0] != n or off.shape != (n + 1,) or int(off[-1]) != tok.shape[0]:
            raise DiffRwkvError(
                f"{self.dir}: counts disagree (meta {n} rows, latents {list(lat.shape)}, offsets {list(off.shape)}, "
                f"{tok.shape[0]} tokens, last offset {int(off[-1])}); "
                "expected N rows, N + 1 offsets ending at the token count"
            )
        if latent_dim is not None and lat.shape[1] != latent_dim:
            raise DiffRwkvError(f"{self.dir / 'latents.npy'}: latents are {lat.shape[1]}-d; expected {latent_dim}")
        self.good = np.ones(n, dtype=bool)
        lengths = np.diff(off)
        for i in np.flatnonzero(lengths <= 0)[:1000]:
            self.good[i] = False
            on_problem(
                f"{self.where_prefix} {i}: {int(lengths[i])} tokens (offsets {int(off[i])}..{int(off[i + 1])}); "
                "expected >= 1"
            )
        for start in range(0, n, 1 << 18):
            bad = np.flatnonzero(~np.isfinite(lat[start : start + (1 << 18)]).all(1)) + start
            for i in bad[:1000]:
                self.good[i] = False
                on_problem(f"{self.where_prefix} {i}: latent has NaN or inf; expected finite values")
        self.lengths = np.maximum(lengths, 0)
        self.keys = None

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            arrays = {}
            for name in ("latents", "tokens", "offsets", "text_bytes", "text_offsets"):
                path = self.dir / f"{name}.npy"
                if not path.exists() and name.startswith("text"):
                    continue
                try:
                    arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as exc:
                    raise DiffRwkvError(
                        f"{path}: cannot memory-map ({exc}); expected a complete .npy written by diffrwkv pack"
                    ) from exc
            self._arrays = arrays
        return self._arrays

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = None  # each DataLoader worker maps the files itself
        return state

    def __len__(self) -> int:
        return int(self.meta["count"])

    def tokens(self, row: int) -> np.ndarray:
        a = self.arrays
        lo, hi = a["offsets"][row], a["offsets"][row + 1]
        return np.asarray(a["tokens"][lo:hi], dtype=np.int64)

    def latent(self, row: int) -> np.ndarray:
        return np.array(self.arrays["latents"][row], dtype=np.float32)

    def text(self, row: int) -> str | None:
        a = self.arrays
        if "text_bytes" not in a:
            return None
        lo, hi = a["text_offsets"][row], a["text_offsets"][row + 1]
        return bytes(a["text_bytes"][lo:hi]).decode("utf-8")

    def describe(self, row: int) -> str:
        return f"{self.where_prefix} {row}"


def is_pack(folder: str | os.PathLike | None) -> bool:
    return bool(folder) and (Path(folder) / PACK_META).is_file()


def open_store(
    json_path: str | None,
    token_dir: str,
    latent_dir: str = "",
    *,
    latent_dim: int | None = 32,
    on_problem: Problem = _raise,
) -> FileStore | PackStore:
    """A pack when ``token_dir`` holds ``pack_meta.json`` (then json_path and latent_dir are ignored), else files."""
    if is_pack(token_dir):
        return PackStore(token_dir, latent_dim=latent_dim, on_problem=on_problem)
    return FileStore(json_path, token_dir, latent_dir, latent_dim=latent_dim, on_problem=on_problem)


def _find_json(latent_dir: str) -> Path | None:
    """The original scripts pair ``qwen_32d/latents/train`` with ``qwen_32d/train_data.json``: look there."""
    if not latent_dir:
        return None
    folder = Path(latent_dir)
    candidate = folder.parent.parent / f"{folder.name}_data.json"
    return candidate if candidate.is_file() else None


def _read_token_meta(token_dir: Path) -> dict | None:
    path = token_dir / TOKEN_META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DiffRwkvError(
            f"{path}: not valid JSON ({exc}); expected the metadata written by diffrwkv tokenize"
        ) from exc
    if not meta.get("complete", False):
        raise DiffRwkvError(
            f"{path}: tokenization did not complete; expected a finished run (re-run tokenize to resume)"
        )
    return meta


def _meta_lengths(meta: dict | None, keys: list[str]) -> np.ndarray | None:
    """Token lengths per row from the tokenizer's metadata, when it covers exactly these keys."""
    if not meta or "keys" not in meta or "lengths" not in meta:
        return None
    by_key = dict(zip(meta["keys"], meta["lengths"], strict=False))
    if len(by_key) != len(keys) or any(k not in by_key for k in keys):
        return None
    return np.fromiter((by_key[k] for k in keys), dtype=np.int64, count=len(keys))
