"""Tokenize the rows of a dataset JSON into one ``.npz`` per row (step 2 of the original rwkv_diffusion_rnn
scripts).

The original scripts' command (works as written)::

    python rwkv_diffusion_rnn/preprocess_tokenize_text.py \\
      --json_path preprocessed_data/qwen_32d/train_data.json \\
      --output_dir preprocessed_data/rwkv_tokens \\
      --tokenizer BlinkDL/rwkv7-g1 \\
      --max_length 512
    # same as: diffrwkv tokenize --json_path ... --output_dir ...

Writes ``OUTPUT_DIR/<split>/<key>.npz`` with ``input_ids`` int32 ``[L]`` and ``attention_mask`` int32 ``[L]`` (all
ones: files are NOT padded -- the loader pads per batch with pad id 0 and a zero mask). ``<split>`` is the JSON's name
without ``_data`` (``train_data.json`` -> ``train``); ``<key>`` is the stem of the row's ``latent_path``
(``latents/train/00000012.npy`` -> ``00000012.npz``), or the zero-padded row number for rows without one, so
tokens pair with latents by name, deterministically, with or without the JSON. Texts longer than ``--max_length``
tokens are truncated and counted. ``OUTPUT_DIR/<split>/_meta.json`` records the settings, the JSON's checksum, every
row's token length and whether the run completed.

Speed: the RWKV World tokenizer is greedy longest-match, and no vocabulary entry except the single byte ``\\x1f``
contains that byte, so texts joined by ``\\x1f`` tokenize to the rows' ids separated by its id: one Rust call per
~8k rows instead of one per row, chunks encoded in parallel by the Rust tokenizer (identical ids, checked in tests
and bench/data_throughput.py). Writing one small file per row is bound by the filesystem, not the CPU: writer
threads (``--num-workers``) gave no gain on the 2-core development machine, so the default is one. Each file is
written atomically (temporary name, then rename); a rerun skips rows already written (resume).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

from rwkv_diffusion_rnn.data_io import (
    TOKEN_META,
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    npz_bytes,
    read_dataset_json,
)
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.tokenizer import RWKVWorldTokenizer, _read_vocab, load_tokenizer

SEPARATOR = "\x1f"  # ASCII unit separator; World id 32, and the only vocabulary entry containing byte 0x1f
FORMAT = "diffrwkv-tokens/1"


def _separator_is_safe(tok) -> bool:
    """True when ``tok`` is a World tokenizer whose vocabulary has no multi-byte entry containing the separator."""
    return isinstance(tok, RWKVWorldTokenizer) and _vocab_has_lone_separator(tok.vocab_file)


@lru_cache(maxsize=4)
def _vocab_has_lone_separator(vocab_file: str) -> bool:
    sep = SEPARATOR.encode()
    return sum(sep in entry for entry in _read_vocab(vocab_file)) == 1


def encode_texts(tok, texts: Sequence[str], chunk_rows: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``texts`` -> (``ids`` int32 ``[sum L]``, ``offsets`` int64 ``[N + 1]``): row i is
    ``ids[offsets[i]:offsets[i + 1]]``. Uses the separator-joined fast path when it is exact (see module docstring),
    otherwise ``tok.encode_batch``."""
    n = len(texts)
    if n == 0:
        return np.zeros(0, np.int32), np.zeros(1, np.int64)
    if not _separator_is_safe(tok):
        return _encode_rowwise(tok, texts)
    sep_id = tok.encode(SEPARATOR)[0]
    # every row is terminated by the separator, so the concatenated ids hold exactly n separators
    joined = [SEPARATOR.join(texts[i : i + chunk_rows]) + SEPARATOR for i in range(0, n, chunk_rows)]
    encoded = tok.encode_batch(joined)  # the Rust side encodes the chunks in parallel
    ids = np.concatenate([np.fromiter(c, dtype=np.int32, count=len(c)) for c in encoded])
    is_sep = ids == sep_id
    ends = np.flatnonzero(is_sep)
    if len(ends) != n:  # a text contains the separator itself (it always tokenizes alone): encode row by row
        return _encode_rowwise(tok, texts)
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0] = 0
    offsets[1:] = ends - np.arange(n)  # a row's end in the separator-free array
    return ids[~is_sep], offsets


def _encode_rowwise(tok, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    rows = tok.encode_batch(list(texts))
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(lengths.sum()))
    if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(np.int32).max):
        raise DiffRwkvError(f"tokenizer '{tok}' produced ids outside int32; expected 0 <= id < 2**31")
    return flat.astype(np.int32), np.concatenate([[0], np.cumsum(lengths)])


def split_name(json_path: Path) -> str:
    stem = json_path.stem
    return stem[: -len("_data")] if stem.endswith("_data") else stem


def tokenize_json(
    json_path: str | Path,
    output_dir: str | Path,
    *,
    tokenizer: str = "BlinkDL/rwkv7-g1",
    max_length: int = 512,
    split: str | None = None,
    num_workers: int = 1,
    overwrite: bool = False,
    tokenizer_options: dict | None = None,
) -> dict:
    """Tokenize every row of ``json_path`` into ``output_dir/<split>/<key>.npz``; returns the summary (also the
    content of ``_meta.json``). The JSON is fully validated before any file is written."""
    t0 = time.perf_counter()
    json_path = Path(json_path)
    if max_length < 1:
        raise DiffRwkvError(f"--max_length is {max_length}; expected >= 1")
    rows = read_dataset_json(json_path, require_latent=False)
    if not rows:
        raise DiffRwkvError(f"{json_path}: the list is empty; expected at least one row")
    split = split or split_name(json_path)
    out = Path(output_dir) / split
    settings = {
        "format": FORMAT,
        "json_path": str(json_path.resolve()),
        "json_sha256": file_sha256(json_path),
        "rows": len(rows),
        "tokenizer": tokenizer,
        "max_length": max_length,
    }
    skip_existing = _prepare_output(out, settings, overwrite)
    tok = load_tokenizer(tokenizer, **(tokenizer_options or {}))
    t1 = time.perf_counter()
    flat, offsets = encode_texts(tok, [r.text for r in rows])
    t_encode = time.perf_counter() - t1
    lengths = np.diff(offsets)
    truncated = int((lengths > max_length).sum())
    keep = np.minimum(lengths, max_length)
    keys = [r.key for r in rows]
    written = _write_files(out, keys, flat, offsets, keep, num_workers, skip_existing)
    meta = {
        **settings,
        "vocab_size": int(getattr(tok, "vocab_size", 0)) or None,
        "truncated": truncated,
        "written": written,
        "tokens": int(keep.sum()),
        "encode_seconds": round(t_encode, 3),
        "seconds": round(time.perf_counter() - t0, 2),
        "complete": True,
        "keys": keys,
        "lengths": keep.tolist(),
    }
    atomic_write_json(out / TOKEN_META, meta, indent=None)
    return meta


def _prepare_output(out: Path, settings: dict, overwrite: bool) -> bool:
    """Create ``out``; decide whether existing files may be kept (a resumed run with identical settings)."""
    meta_path = out / TOKEN_META
    if out.exists():
        old = None
        if meta_path.is_file():
            try:
                old = json.loads(meta_path.read_text(encoding="utf-8"))
            except ValueError:
                old = None
        same = old is not None and all(old.get(k) == v for k, v in settings.items())
        stray = next(out.glob("*.npz"), None)
        if not same and stray is not None and not overwrite:
            raise DiffRwkvError(
                f"{out}: holds .npz files from another run (e.g. {stray.name}); expected an empty folder, "
                "the same settings (resume), or --overwrite"
            )
        if overwrite and not same:
            for f in out.glob("*.npz"):
                f.unlink()
        resume = same
    else:
        resume = False
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, {**settings, "complete": False}, indent=None)
    return resume


def _write_files(out, keys, flat, offsets, keep, num_workers: int, skip_existing: bool) -> int:
    from tqdm import tqdm

    def write_range(lo: int, hi: int) -> int:
        n = 0
        for i in range(lo, hi):
            path = out / f"{keys[i]}.npz"
            if skip_existing and path.exists():
                continue
            ids = flat[offsets[i] : offsets[i] + keep[i]]
            atomic_write_bytes(path, npz_bytes(input_ids=ids, attention_mask=np.ones_like(ids)))
            n += 1
        return n

    step = 2048
    ranges = [(lo, min(lo + step, len(keys))) for lo in range(0, len(keys), step)]
    written = 0
    with (
        ThreadPoolExecutor(max(1, num_workers)) as pool,
        tqdm(total=len(keys), desc="write", unit="row", mininterval=2) as bar,
    ):
        for (lo, hi), n in zip(ranges, pool.map(lambda r: write_range(*r), ranges), strict=True):
            written += n
            bar.update(hi - lo)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffrwkv tokenize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json_path", "--json-path", required=True, help="dataset JSON (list of rows with 'text')")
    p.add_argument(
        "--output_dir", "--output-dir", required=True, help="token folder; files go to <output_dir>/<split>/"
    )
    p.add_argument("--tokenizer", default="BlinkDL/rwkv7-g1", help="BlinkDL/rwkv7-g1 / rwkv-world (offline), or HF id")
    p.add_argument("--max_length", "--max-length", type=int, default=512, help="longer texts are truncated (counted)")
    p.add_argument("--split", help="sub-folder name (default: the JSON name without '_data')")
    p.add_argument("--num-workers", type=int, default=1, help="threads writing files (see module docstring)")
    p.add_argument("--overwrite", action="store_true", help="replace token files made with other settings")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a HF tokenizer's own code (trusted only)")
    p.add_argument("--local-files-only", action="store_true", help="HF tokenizers: never contact the hub")
    p.add_argument("--cache-dir", help="HF tokenizers: cache folder")
    p.add_argument("--revision", help="HF tokenizers: pinned revision")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    meta = tokenize_json(
        args.json_path,
        args.output_dir,
        tokenizer=args.tokenizer,
        max_length=args.max_length,
        split=args.split,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        tokenizer_options={
            "trust_remote_code": args.trust_remote_code,
            "local_files_only": args.local_files_only,
            "cache_dir": args.cache_dir,
            "revision": args.revision,
        },
    )
    summary = {k: v for k, v in meta.items() if k not in ("keys", "lengths")}
    print(json.dumps(summary))
    if meta["truncated"]:
        print(
            f"note: {meta['truncated']} of {meta['rows']} rows were truncated to {meta['max_length']} tokens",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    from rwkv_diffusion_rnn.entry import run_main

    sys.exit(run_main(main, None))
