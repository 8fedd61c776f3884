"""``diffrwkv pack``: per-row files -> one memory-mapped array per field (for millions of rows).

Command::

    diffrwkv pack --json_path preprocessed_data/qwen_32d/train_data.json \\
        --token_dir preprocessed_data/rwkv_tokens/train --output_dir preprocessed_data/packed/train
    # then: data.token_dir=preprocessed_data/packed/train (the loader detects the pack)

Output folder (layout read by :class:`~rwkv_diffusion_rnn.data_sources.PackStore`)::

    pack_meta.json     {"format": "diffrwkv-pack/1", "count": N, "latent_dim": D, "token_dtype", "num_tokens", ...}
    latents.npy        float32 [N, D]
    tokens.npy         uint16 [sum L] when every id < 65536 (the World vocabulary), else int32
    offsets.npy        int64 [N + 1]; row i is tokens[offsets[i]:offsets[i + 1]]
    text_bytes.npy     uint8 UTF-8 of all texts; text_offsets.npy int64 [N + 1]   (when the source has texts)
    source_rows.npy    int64 [N]: the source JSON row of each pack row
    latent_stats.json  copied from the source (training statistics) or, if it has none, computed on this pack

Every row is read and validated (the same checks as the loader); the pack is built in ``OUT.partial/final`` and
renamed into place only when complete, so a bad row leaves nothing behind. Rows pack in source order.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from rwkv_diffusion_rnn.data_io import LATENT_STATS, LatentStats, atomic_write_json, staged_output
from rwkv_diffusion_rnn.data_simple import validate_rows
from rwkv_diffusion_rnn.data_sources import PACK_FORMAT, PACK_META, FileStore, open_store
from rwkv_diffusion_rnn.errors import DiffRwkvError


def pack_dataset(
    json_path: str | None,
    token_dir: str,
    output_dir: str,
    *,
    latent_dir: str = "",
    latent_dim: int = 32,
    on_bad_sample: str = "error",
    overwrite: bool = False,
    chunk_rows: int = 8192,
) -> dict:
    """Pack one split; returns the pack metadata."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    problems: list[str] = []
    opts = {"on_problem": problems.append} if on_bad_sample == "skip" else {}
    store = open_store(json_path, token_dir, latent_dir, latent_dim=latent_dim, **opts)
    if not isinstance(store, FileStore):
        raise DiffRwkvError(f"{token_dir}: is already a pack; expected per-row token files")
    rows = np.arange(len(store))
    if on_bad_sample == "skip":
        rows = validate_rows(store, rows, problems)
    if len(rows) == 0:
        raise DiffRwkvError(f"{token_dir}: no usable rows; expected at least one")
    n = len(rows)

    def read(row: int) -> tuple[np.ndarray, np.ndarray]:
        return store.tokens(row), store.latent(row)

    with staged_output(output_dir, overwrite=overwrite) as stage:
        latents = np.lib.format.open_memmap(stage / "latents.npy", mode="w+", dtype=np.float32, shape=(n, latent_dim))
        offsets = np.zeros(n + 1, dtype=np.int64)
        text_offsets = np.zeros(n + 1, dtype=np.int64)
        has_text = store.texts is not None
        max_id = 0
        with open(stage / "tokens.raw", "wb") as tok_f, open(stage / "text.raw", "wb") as txt_f:
            with tqdm(total=n, desc="pack", unit="row", mininterval=2) as bar:
                for lo in range(0, n, chunk_rows):
                    part = rows[lo : lo + chunk_rows]
                    results = [read(r) for r in part.tolist()]
                    lengths = np.fromiter((len(t) for t, _ in results), dtype=np.int64, count=len(part))
                    offsets[lo + 1 : lo + 1 + len(part)] = offsets[lo] + np.cumsum(lengths)
                    flat = np.concatenate([t for t, _ in results])
                    max_id = max(max_id, int(flat.max()))
                    tok_f.write(flat.astype(np.int32).tobytes())
                    latents[lo : lo + len(part)] = np.stack([z for _, z in results])
                    if has_text:
                        blobs = [store.text(int(r)).encode("utf-8") for r in part]
                        sizes = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
                        text_offsets[lo + 1 : lo + 1 + len(part)] = text_offsets[lo] + np.cumsum(sizes)
                        txt_f.write(b"".join(blobs))
                    bar.update(len(part))
        latents.flush()
        del latents
        dtype = np.uint16 if max_id < 65536 else np.int32
        _raw_to_npy(stage / "tokens.raw", stage / "tokens.npy", np.int32, dtype)
        if has_text:
            _raw_to_npy(stage / "text.raw", stage / "text_bytes.npy", np.uint8, np.uint8)
            np.save(stage / "text_offsets.npy", text_offsets)
        else:
            (stage / "text.raw").unlink()
        np.save(stage / "offsets.npy", offsets)
        np.save(stage / "source_rows.npy", rows.astype(np.int64))
        stats_src = Path(store.stats_path) if store.stats_path else None
        if stats_src is not None and stats_src.is_file() and LatentStats.load(stats_src).mean.shape[0] == latent_dim:
            shutil.copyfile(stats_src, stage / LATENT_STATS)
        else:
            LatentStats.compute(np.load(stage / "latents.npy", mmap_mode="r")).save(stage / LATENT_STATS)
        meta = {
            "format": PACK_FORMAT,
            "count": n,
            "latent_dim": latent_dim,
            "token_dtype": np.dtype(dtype).name,
            "num_tokens": int(offsets[-1]),
            "max_length": int(np.diff(offsets).max()),
            "vocab_size": store.vocab_limit,
            "source": {"json_path": str(store.json_path) if store.json_path else None, "token_dir": str(token_dir)},
            "skipped": len(store) - n,
            "problems": problems[:100],
        }
        atomic_write_json(stage / PACK_META, meta)
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    return meta


def _raw_to_npy(raw: Path, out: Path, src_dtype, dst_dtype, chunk: int = 1 << 24) -> None:
    """Copy a headerless binary file into a .npy (converting dtype) in chunks, then delete it."""
    src = np.memmap(raw, dtype=src_dtype, mode="r") if raw.stat().st_size else np.zeros(0, src_dtype)
    dst = np.lib.format.open_memmap(out, mode="w+", dtype=dst_dtype, shape=(src.shape[0],))
    for i in range(0, src.shape[0], chunk):
        dst[i : i + chunk] = src[i : i + chunk]
    dst.flush()
    del dst, src
    raw.unlink()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffrwkv pack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--json_path", "--json-path", help="dataset JSON (default: found from --latent_dir, per-row file layout)"
    )
    p.add_argument("--token_dir", "--token-dir", required=True, help="folder of per-row .npz token files")
    p.add_argument(
        "--latent_dir", "--latent-dir", default="", help="folder of per-row .npy latents (pairing without JSON)"
    )
    p.add_argument("--output_dir", "--output-dir", required=True, help="pack folder to create")
    p.add_argument("--latent-dim", type=int, default=32, help="expected latent width")
    p.add_argument(
        "--on-bad-sample", choices=["error", "skip"], default="error", help="skip: leave bad rows out, report them"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing pack (atomically, at the end)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    meta = pack_dataset(
        args.json_path,
        args.token_dir,
        args.output_dir,
        latent_dir=args.latent_dir,
        latent_dim=args.latent_dim,
        on_bad_sample=args.on_bad_sample,
        overwrite=args.overwrite,
    )
    problems = meta.pop("problems")
    print(json.dumps(meta))
    for msg in problems:
        print(f"skipped: {msg}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from rwkv_diffusion_rnn.entry import run_main

    sys.exit(run_main(main, None))
