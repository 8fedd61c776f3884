"""Captions harness, step 1 (CPU): one compact bundle with everything the GPU runs need, encoded with ONE encoder.

    python bench/captions_prepare.py --pack /tmp/flickr/packed/train --encoder-dir /tmp/flickr/qwen_32d \\
        --stsb ../shared/data/stsb/sts-dev.csv --out .device/captions/bundle

Inputs (made earlier by ``diffrwkv prepare-latents`` / ``tokenize`` / ``pack`` on the 145k Flickr30k training
captions, with the 5 x 1014 validation captions as its validation split):

* ``--pack``: the packed training split (World token ids, MiniLM + PCA-32 latents, texts, latent_stats.json);
* ``--encoder-dir``: the prepare-latents folder: ``latent_encoder.json`` + ``latent_projection.npz`` (the encoder
  and its PCA), ``validation_data.json`` + ``latents/validation/*.npy`` (the validation captions, already encoded);
* ``--stsb``: STS-B dev (tab-separated, QUOTE_NONE), encoded here with the SAME encoder and projection.

Before anything is written, the first validation captions are re-encoded and compared with their stored latents
(cosine > 0.999), so the bundle cannot mix two encoders.

Bundle (``--out``; ~15 MB; everything the GPU needs is arrays, it needs no encoder, no text and no network)::

    bundle.json              format, counts, sources, encoder metadata, sha256 of every file, the encoder's own
                             STS-B Spearman at 32-d (the ceiling of T2L on STS-B)
    latent_stats.json        per-dimension training statistics (copied from the pack)
    train_tokens.npy         uint16 [sum L]  World ids;  train_offsets.npy int64 [N + 1]
    train_latents.npy        float16 [N, 32] (the GPU widens to float32; 2.4e-4 worst absolute error)
    val_tokens.npy / val_offsets.npy / val_latents.npy (float32)   5 x 1014 rows: val.1 (image i = row i), val.2 ...
    stsb_tokens.npy / stsb_offsets.npy / stsb_latents.npy (float32) 2 x P rows: all sentence-1 then all sentence-2
    stsb_scores.npy          float32 [P] human similarity 0-5
    val_texts.json           the 5 x 1014 validation captions (the scorer's references; not used on the GPU)
    floor.json / floor_latents.npy   the floor: one random TRAINING caption per validation image (seeded), and its
                             stored latent (its encoding by the same encoder)

``captions_run.py`` turns the bundle into two packs (train + its sibling validation) that the project's data loader
reads unchanged. Errors are one line naming the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

FORMAT = "diffrwkv-captions-bundle/1"
N_IMAGES = 1014  # Flickr30k validation images (val.K.en.gz has one caption per image, K = 1..5)


class BundleError(Exception):
    """A one-line, user-facing problem with the inputs or the bundle."""


def _say(msg: str) -> None:
    print(f"[captions_prepare] {msg}", flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ragged(rows: list[list[int]] | list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> (uint16 flat ids, int64 offsets [N + 1])."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if rows else np.zeros(0, np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= 65536):
        raise BundleError(f"token ids outside 0..65535 (min {flat.min()}, max {flat.max()}); expected World ids")
    return flat.astype(np.uint16), offsets


def rows_of(tokens: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [tokens[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def _load(path: Path, **kw) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, **kw)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: cannot read ({exc})") from exc


def read_pack(pack: Path) -> dict:
    meta_path = pack / "pack_meta.json"
    if not meta_path.is_file():
        raise BundleError(f"{pack}: no pack_meta.json; expected a folder written by diffrwkv pack")
    meta = json.loads(meta_path.read_text())
    out = {name: _load(pack / f"{name}.npy", mmap_mode="r") for name in ("tokens", "offsets", "latents")}
    n = int(meta["count"])
    if out["latents"].shape != (n, 32) or out["offsets"].shape != (n + 1,):
        raise BundleError(
            f"{pack}: expected {n} rows of 32-d latents and {n + 1} offsets; got "
            f"{out['latents'].shape} and {out['offsets'].shape}"
        )
    for name in ("text_bytes", "text_offsets"):
        if not (pack / f"{name}.npy").is_file():
            raise BundleError(f"{pack}: no {name}.npy; the floor needs the training texts")
        out[name] = _load(pack / f"{name}.npy", mmap_mode="r")
    if not (pack / "latent_stats.json").is_file():
        raise BundleError(f"{pack}: no latent_stats.json; expected the training statistics beside the pack")
    out["meta"] = meta
    return out


def pack_text(p: dict, i: int) -> str:
    a, b = int(p["text_offsets"][i]), int(p["text_offsets"][i + 1])
    return bytes(p["text_bytes"][a:b]).decode("utf-8")


def read_validation(encoder_dir: Path, n_images: int = N_IMAGES) -> tuple[list[str], np.ndarray]:
    """The validation split of a prepare-latents folder: texts (row order val.1 ... val.5) and latents [N, 32]."""
    path = encoder_dir / "validation_data.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: cannot read ({exc}); expected the prepare-latents validation split") from exc
    if len(rows) != 5 * n_images:
        raise BundleError(f"{path}: {len(rows)} rows; expected {5 * n_images} (val.1-5 x {n_images} images)")
    for k, i in ((1, 0), (2, n_images), (5, 5 * n_images - 1)):  # row order: val.1 first, one caption per image
        src = str(rows[i].get("source", ""))
        if f"val.{k}." not in src:
            raise BundleError(f"{path}: row {i} comes from {src!r}; expected val.{k} (rows in val.1..val.5 order)")
    texts = [str(r["text"]) for r in rows]
    lat = np.stack([_load(encoder_dir / r["latent_path"]).astype(np.float32).reshape(-1) for r in rows])
    if lat.shape[1] != 32 or not np.isfinite(lat).all():
        raise BundleError(f"{encoder_dir}: validation latents are {lat.shape}, or not finite; expected [N, 32]")
    return texts, lat


def check_encoder(encoder, texts: list[str], stored: np.ndarray, n: int = 8) -> float:
    """Re-encode the first ``n`` texts; the worst cosine to their stored latents (must be ~1)."""
    from rwkv_diffusion_rnn.metrics import cosine_rows

    worst = float(cosine_rows(encoder.encode(texts[:n]), stored[:n]).min())
    if worst < 0.999:
        raise BundleError(
            f"the encoder re-encodes stored validation latents at cosine {worst:.4f} (expected > 0.999): "
            "--encoder-dir is not the folder these latents were made with"
        )
    return worst


def build(args: argparse.Namespace, encoder=None, tokenizer=None) -> dict:
    """Write the bundle; ``encoder`` (``encode(texts) -> [N, 32]``) and ``tokenizer`` default to the encoder
    folder's LatentEncoder and the World tokenizer (tests inject stubs). Returns bundle.json's content."""
    from rwkv_diffusion_rnn.eval_data import read_stsb
    from rwkv_diffusion_rnn.evaluate import sts_spearman
    from rwkv_diffusion_rnn.preprocess_tokenize_text import encode_texts

    t0 = time.perf_counter()
    pack, enc_dir, out = Path(args.pack), Path(args.encoder_dir), Path(args.out)
    if out.exists() and not args.overwrite:
        raise BundleError(f"{out}: exists; pass --overwrite to replace it")
    p = read_pack(pack)
    n_images = int(getattr(args, "val_images", N_IMAGES))
    val_texts, val_lat = read_validation(enc_dir, n_images)
    if encoder is None:
        from rwkv_diffusion_rnn.latent_encoder import LatentEncoder

        encoder = LatentEncoder.from_dir(enc_dir)
    if tokenizer is None:
        from rwkv_diffusion_rnn.tokenizer import load_tokenizer

        tokenizer = load_tokenizer("rwkv-world")
    worst = check_encoder(encoder, val_texts, val_lat)
    _say(f"encoder check: first 8 validation captions re-encode at cosine >= {worst:.5f}")
    s1, s2, scores = read_stsb(args.stsb)
    _say(f"encoding {2 * len(scores)} STS-B sentences with the same encoder ...")
    sts_lat = np.asarray(encoder.encode(s1 + s2), dtype=np.float32)
    ceiling = sts_spearman(sts_lat[: len(scores)], sts_lat[len(scores) :], scores)
    _say(f"encoder's own 32-d STS-B Spearman: {ceiling:.4f}")

    val_flat, val_off = encode_texts(tokenizer, val_texts)
    sts_flat, sts_off = encode_texts(tokenizer, s1 + s2)
    n_train = int(p["meta"]["count"])
    rng = np.random.default_rng([args.seed, 7])
    floor_rows = rng.integers(0, n_train, size=n_images)

    stage = out.with_name(out.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    arrays = {
        "train_tokens": np.asarray(p["tokens"], dtype=np.uint16),
        "train_offsets": np.asarray(p["offsets"], dtype=np.int64),
        "train_latents": np.asarray(p["latents"], dtype=np.float32).astype(np.float16),
        "val_tokens": np.asarray(val_flat, dtype=np.uint16),
        "val_offsets": np.asarray(val_off, dtype=np.int64),
        "val_latents": val_lat.astype(np.float32),
        "stsb_tokens": np.asarray(sts_flat, dtype=np.uint16),
        "stsb_offsets": np.asarray(sts_off, dtype=np.int64),
        "stsb_latents": sts_lat,
        "stsb_scores": np.asarray(scores, dtype=np.float32),
        "floor_latents": np.asarray(p["latents"][floor_rows], dtype=np.float32),
    }
    for name, a in arrays.items():
        np.save(stage / f"{name}.npy", a)
    shutil.copyfile(pack / "latent_stats.json", stage / "latent_stats.json")
    (stage / "val_texts.json").write_text(json.dumps(val_texts, ensure_ascii=False) + "\n", encoding="utf-8")
    floor = {
        "train_rows": floor_rows.tolist(),
        "texts": [pack_text(p, int(i)) for i in floor_rows],
        "note": "one random training caption per validation image (rng [seed, 7]); its stored latent in "
        "floor_latents.npy is its encoding by the same encoder",
    }
    (stage / "floor.json").write_text(json.dumps(floor, ensure_ascii=False) + "\n", encoding="utf-8")
    enc_meta = (
        json.loads((enc_dir / "latent_encoder.json").read_text()) if (enc_dir / "latent_encoder.json").is_file() else {}
    )
    meta = {
        "format": FORMAT,
        "counts": {
            "train": n_train,
            "val": len(val_texts),
            "val_images": n_images,
            "stsb_pairs": len(scores),
            "train_tokens": int(arrays["train_offsets"][-1]),
        },
        "sources": {"pack": str(pack), "encoder_dir": str(enc_dir), "stsb": str(args.stsb)},
        "encoder": enc_meta,
        "encoder_check_min_cosine": worst,
        "stsb_encoder_spearman": ceiling,
        "seed": args.seed,
        "files": {f.name: sha256(f) for f in sorted(stage.iterdir())},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (stage / "bundle.json").write_text(json.dumps(meta, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    _say(f"bundle {out}: {size / 2**20:.1f} MiB, {len(meta['files']) + 1} files, {meta['seconds']} s")
    return meta


def load_bundle(folder: str | Path, verify: bool = False) -> dict:
    """Read a bundle (arrays memory-mapped). ``verify``: check every file's sha256 against bundle.json."""
    folder = Path(folder)
    path = folder / "bundle.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(
            f"{path}: cannot read ({exc}); expected a bundle written by bench/captions_prepare.py"
        ) from exc
    if meta.get("format") != FORMAT:
        raise BundleError(f"{path}: format {meta.get('format')!r}; expected {FORMAT!r}")
    b = {"meta": meta, "dir": folder}
    for name in meta["files"]:
        f = folder / name
        if not f.is_file():
            raise BundleError(f"{f}: missing from the bundle")
        if verify and sha256(f) != meta["files"][name]:
            raise BundleError(f"{f}: sha256 differs from bundle.json (damaged copy)")
        if name.endswith(".npy"):
            b[name[:-4]] = _load(f, mmap_mode="r")
    return b


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", default="/tmp/flickr/packed/train", help="packed training split (diffrwkv pack)")
    ap.add_argument("--encoder-dir", default="/tmp/flickr/qwen_32d", help="prepare-latents folder (encoder + val)")
    ap.add_argument("--stsb", default=str(Path(__file__).resolve().parents[2] / "shared/data/stsb/sts-dev.csv"))
    ap.add_argument("--out", default=".device/captions/bundle")
    ap.add_argument("--seed", type=int, default=0, help="seed of the floor's random training captions")
    ap.add_argument("--val-images", type=int, default=N_IMAGES, help="images in the validation split (5 captions each)")
    ap.add_argument("--overwrite", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rwkv_diffusion_rnn.errors import DiffRwkvError

    try:
        build(args)
    except (BundleError, DiffRwkvError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
