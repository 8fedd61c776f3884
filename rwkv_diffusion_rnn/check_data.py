"""``diffrwkv check-data DIR``: validate a dataset and print a summary with every problem found.

Commands::

    diffrwkv check-data preprocessed_data/qwen_32d                       # each *_data.json; tokens found beside it
    diffrwkv check-data preprocessed_data/qwen_32d --token-dir preprocessed_data/rwkv_tokens
    diffrwkv check-data preprocessed_data/packed/train                   # a pack
    diffrwkv check-data preprocessed_data                                # every dataset one level down
    diffrwkv check-data preprocessed_data/qwen_32d --json               # machine-readable report

For each split: rows, token-length histogram, latent norms and per-dimension statistics (compared with the saved
``latent_stats.json``), and every problem -- the same checks the loader makes (JSON structure, paths, missing and
extra files, counts, unreadable or truncated files, latent width, NaN/inf, token ids), but collected instead of
stopping at the first. Exit status: 0 clean, 1 problems found, 2 the folder is not a dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from rwkv_diffusion_rnn.data_io import TOKEN_META, LatentStats, file_sha256, latent_norm_summary
from rwkv_diffusion_rnn.data_simple import validate_rows
from rwkv_diffusion_rnn.data_sources import FileStore, PackStore, is_pack, open_store
from rwkv_diffusion_rnn.errors import DiffRwkvError

HIST_EDGES = (8, 16, 32, 64, 128, 256, 512, 1024)


def find_token_dir(json_path: Path, token_root: Path | None) -> Path | None:
    """The token folder of ``<split>_data.json``: ``token_root/<split>`` (or token_root itself), else a folder
    ``<sibling>/<split>`` beside the JSON's folder whose ``_meta.json`` records this JSON's checksum."""
    split = json_path.stem.removesuffix("_data")
    if token_root is not None:
        return token_root / split if (token_root / split).is_dir() else token_root
    candidates = []
    for meta_path in sorted(json_path.parent.parent.glob(f"*/{split}/{TOKEN_META}")):
        try:
            candidates.append((meta_path.parent, json.loads(meta_path.read_text(encoding="utf-8"))))
        except ValueError:
            continue
    sha = file_sha256(json_path) if candidates else None
    for folder, meta in candidates:  # made from this very JSON
        if meta.get("json_sha256") == sha:
            return folder
    for folder, meta in candidates:  # made from an earlier version of it (check_split reports the mismatch)
        if meta.get("json_path") and Path(meta["json_path"]).resolve() == json_path.resolve():
            return folder
    return None


def check_split(json_path: Path | None, token_dir: Path | None, latent_dim: int, *, pack: Path | None = None) -> dict:
    """Check one split; returns ``{"name", "rows", "good_rows", "problems", ...summary}``."""
    problems: list[str] = []
    name = str(pack or json_path)
    report: dict = {"name": name, "problems": problems}
    if token_dir is None and pack is None:
        problems.append(f"{json_path}: no token folder found; expected --token-dir or rwkv_tokens/<split> beside it")
        return report
    try:
        store = open_store(
            None if pack else str(json_path), str(pack or token_dir), latent_dim=latent_dim, on_problem=problems.append
        )
    except DiffRwkvError as exc:
        problems.append(str(exc))
        return report
    report["rows"] = len(store)
    if isinstance(store, PackStore):
        rows = validate_rows(store, np.arange(len(store)), problems)
        lengths = store.lengths[rows]
        latents = np.asarray(store.arrays["latents"][rows], dtype=np.float64)
    else:
        lengths, latents = _read_all(store, problems)
    report["good_rows"] = int(len(lengths))
    if len(lengths) == 0:
        return report
    counts = np.histogram(lengths, bins=(0, *HIST_EDGES, max(HIST_EDGES[-1], int(lengths.max())) + 1))[0]
    labels = [f"<={e}" for e in HIST_EDGES] + [f">{HIST_EDGES[-1]}"]
    report["tokens"] = {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 2), "max": int(lengths.max())}
    report["length_histogram"] = {k: int(c) for k, c in zip(labels, counts, strict=True) if c}
    report["latent_norm"] = {k: round(v, 4) for k, v in latent_norm_summary(latents).items()}
    stats = LatentStats.compute(latents)
    report["latent_mean_abs_max"] = round(float(np.abs(stats.mean).max()), 4)
    report["latent_std"] = {"min": round(float(stats.std.min()), 4), "max": round(float(stats.std.max()), 4)}
    saved = Path(store.stats_path) if store.stats_path else None
    if saved is not None and saved.is_file():
        try:
            ref = LatentStats.load(saved)
        except DiffRwkvError as exc:
            problems.append(str(exc))
        else:
            report.update(_compare_stats(ref, stats, saved, len(lengths), problems))
    return report


def _read_all(store: FileStore, problems: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One pass over a file store: token lengths ``[n]`` and latents ``[n, D]`` of the good rows."""

    def read(row: int):
        try:
            return len(store.tokens(row)), store.latent(row)
        except DiffRwkvError as exc:
            return str(exc), None

    rows = np.flatnonzero(store.good).tolist()
    results = [read(r) for r in rows]
    problems.extend(r for r, z in results if z is None)
    good = [(n, z) for n, z in results if z is not None]
    if not good:
        return np.zeros(0, np.int64), np.zeros((0, 0))
    return np.array([n for n, _ in good]), np.stack([z for _, z in good]).astype(np.float64)


def _compare_stats(ref: LatentStats, stats: LatentStats, path: Path, n: int, problems: list[str]) -> dict:
    if ref.mean.shape != stats.mean.shape:
        problems.append(
            f"{path}: statistics are {ref.mean.shape[0]}-d; expected {stats.mean.shape[0]} like the latents"
        )
        return {}
    dmean = float(np.abs(ref.mean - stats.mean).max())
    dstd = float(np.abs(ref.std / stats.std - 1).max())
    if ref.count == n and (dmean > 1e-4 or dstd > 1e-3):  # computed on these very rows: must agree
        problems.append(
            f"{path}: saved statistics differ from this split's latents (max |mean diff| {dmean:.3g}, "
            f"max std ratio - 1 {dstd:.3g}); expected them to match (recompute: rerun prepare-latents or pack)"
        )
    return {"saved_stats": {"path": str(path), "count": ref.count, "max_abs_mean_diff": round(dmean, 5)}}


def discover(folder: Path, token_root: Path | None) -> list[tuple[Path | None, Path | None, Path | None]]:
    """(json, token dir, pack) triples to check under ``folder`` (itself, or one level down)."""
    if is_pack(folder):
        return [(None, None, folder)]
    if (folder / TOKEN_META).is_file():  # a token folder: check it against the JSON it was made from
        meta = json.loads((folder / TOKEN_META).read_text(encoding="utf-8"))
        return [(Path(meta["json_path"]), folder, None)]
    jsons = sorted(folder.glob("*_data.json"))
    if jsons:
        return [(j, find_token_dir(j, token_root), None) for j in jsons]
    found: list = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if is_pack(sub) or any(sub.glob("*_data.json")):
            found += discover(sub, token_root)
        else:
            found += [(None, None, p) for p in sorted(sub.iterdir()) if is_pack(p)]
    return found


def format_report(report: dict) -> str:
    lines = [f"== {report['name']}"]
    for key in (
        "rows",
        "good_rows",
        "tokens",
        "length_histogram",
        "latent_norm",
        "latent_mean_abs_max",
        "latent_std",
        "saved_stats",
    ):
        if key in report:
            lines.append(f"  {key}: {json.dumps(report[key])}")
    lines.append(f"  problems: {len(report['problems'])}")
    lines += [f"    - {p}" for p in report["problems"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="diffrwkv check-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("dir", help="prepared data folder, token folder, pack, or a folder of those")
    p.add_argument("--token-dir", help="token folder (the tokenizer's --output_dir, or one split of it)")
    p.add_argument("--latent-dim", type=int, default=32, help="expected latent width")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    folder = Path(args.dir)
    if not folder.is_dir():
        raise DiffRwkvError(f"{folder}: not a folder; expected a dataset folder")
    targets = discover(folder, Path(args.token_dir) if args.token_dir else None)
    if not targets:
        raise DiffRwkvError(f"{folder}: no *_data.json, token folder or pack found; expected a dataset folder")
    reports = [check_split(j, t, args.latent_dim, pack=pk) for j, t, pk in targets]
    total = sum(len(r["problems"]) for r in reports)
    if args.json:
        print(json.dumps({"splits": reports, "problems": total}, indent=1))
    else:
        print("\n".join(format_report(r) for r in reports))
        print(f"{total} problem(s) found" if total else "OK: no problems found")
    return 1 if total else 0


if __name__ == "__main__":
    from rwkv_diffusion_rnn.entry import run_main

    sys.exit(run_main(main, None))
