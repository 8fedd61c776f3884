"""Reading latents and texts for sampling: a prepared data folder's latents with their texts, a latents file
(``.npy`` or JSON lines with a ``"latent"`` each) and a texts file (plain lines or JSON lines with a ``"text"``
each). Shared by ``diffrwkv sample`` (:mod:`rwkv_diffusion_rnn.sample_cli`) and the Python API
(:mod:`rwkv_diffusion_rnn.api`); every bad input is one line naming the file and row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rwkv_diffusion_rnn.errors import DiffRwkvError


def read_data_latents(
    folder: str | Path, split: str | None = None, limit: int | None = None
) -> tuple[np.ndarray, list[str | None], str]:
    """RAW latents ``[N, D]``, their texts and the split read from a prepared data folder: a prepare-latents output
    (``<split>_data.json`` + ``latents/<split>/``), a folder holding one (``qwen_32d/``), or a pack (``pack_meta.json``,
    itself or in ``<split>/`` or ``packed/<split>/``). ``split`` None: validation if present, else train. ``limit``:
    the first rows only."""
    from rwkv_diffusion_rnn.data_io import load_latent, read_dataset_json
    from rwkv_diffusion_rnn.data_sources import PackStore, is_pack

    root = Path(folder)
    if not root.is_dir():
        raise DiffRwkvError(f"{root}: not a folder; expected a prepared data folder (diffrwkv prepare-latents output)")

    def from_pack(pack: Path, name: str) -> tuple[np.ndarray, list[str | None], str]:
        store = PackStore(str(pack), latent_dim=None)
        n = min(len(store), limit or len(store))
        return np.asarray(store.arrays["latents"][:n], np.float32), [store.text(i) for i in range(n)], name

    if is_pack(root):
        return from_pack(root, "pack")
    for name in [split] if split else ["validation", "train"]:
        for base in (root, root / "qwen_32d"):
            if (base / f"{name}_data.json").is_file():
                rows = read_dataset_json(base / f"{name}_data.json")[:limit]
                lat = [load_latent(r.latent_path, dim=None, where=f"{base}/{name}_data.json row {r.row}") for r in rows]
                if not lat:
                    break
                return np.stack(lat).astype(np.float32), [r.text for r in rows], name
        for pack in (root / name, root / "packed" / name):
            if is_pack(pack):
                return from_pack(pack, name)
    raise DiffRwkvError(f"{root}: no {split or 'validation or train'} rows found; expected <split>_data.json with "
                        "latents/<split>/ (prepare-latents output) or a pack folder")  # fmt: skip


def _json_lines(path: Path, key: str, expected: str) -> list[tuple[int, object]]:
    """``(line number, the key field)`` of every non-empty JSON line of ``path``; one line of error naming the line
    otherwise."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DiffRwkvError(f"{path}: cannot read ({exc}); expected UTF-8 JSON lines") from exc
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise DiffRwkvError(f"{path} line {n}: not JSON ({exc.args[0]}); expected {expected}") from None
        if not isinstance(rec, dict) or key not in rec:
            raise DiffRwkvError(f"{path} line {n}: no '{key}' field; expected {expected}")
        out.append((n, rec[key]))
    if not out:
        raise DiffRwkvError(f"{path}: no rows; expected {expected}")
    return out


def read_latents_file(path: str | Path) -> np.ndarray:
    """RAW latents ``[N, D]`` float32 from a ``.npy`` (``[D]`` is one row) or JSON lines with a ``"latent"`` list
    each (``.jsonl``, as ``diffrwkv sample --text`` writes)."""
    p = Path(path)
    if p.suffix in (".jsonl", ".json"):
        expected = 'one JSON object per line with "latent": [D numbers] (diffrwkv sample --text output)'
        rows = _json_lines(p, "latent", expected)
        width = len(rows[0][1]) if isinstance(rows[0][1], list) else 0
        for n, r in rows:
            ok = isinstance(r, list) and len(r) == width > 0
            if not ok or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in r):
                raise DiffRwkvError(f"{p} line {n}: 'latent' is not a list of {width or 'D'} numbers like line "
                                    f"{rows[0][0]}'s; expected {expected}")  # fmt: skip
        return np.asarray([r for _, r in rows], dtype=np.float32)
    try:
        arr = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DiffRwkvError(f"{p}: cannot read ({exc}); expected a .npy array of latents [N, D] or .jsonl") from exc
    arr = arr[None] if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise DiffRwkvError(f"{p}: holds {arr.dtype} {list(arr.shape)}; expected a float array [N, D]")
    return arr.astype(np.float32)


def read_texts_file(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, or the ``"text"`` of each JSON line of a ``.jsonl`` (latent -> text
    output)."""
    p = Path(path)
    if p.suffix == ".jsonl":
        rows = _json_lines(p, "text", 'one JSON object per line with "text" (diffrwkv sample latent -> text output)')
        bad = next((n for n, s in rows if not isinstance(s, str)), None)
        if bad is not None:
            raise DiffRwkvError(f"{p} line {bad}: 'text' is not a string")
        return [s for _, s in rows]
    try:
        return [s.strip() for s in p.read_text(encoding="utf-8").splitlines() if s.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DiffRwkvError(f"{p}: cannot read ({exc}); expected a UTF-8 text file") from exc
