"""Builders shared by the data-pipeline tests: small per-row file datasets and a fast fake sentence encoder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from rwkv_diffusion_rnn.corpus import generate
from rwkv_diffusion_rnn.data_io import LatentStats
from rwkv_diffusion_rnn.latent_encoder import register_embedder
from rwkv_diffusion_rnn.preprocess_tokenize_text import tokenize_json

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


class HashEmbedder:
    """Deterministic bag-of-words embedder: each word maps to a fixed random vector (seeded by its hash)."""

    name = "test-hash"

    def __init__(self, dim: int = 48, prompt: str | None = None, fail_after: int | None = None, **_ignored) -> None:
        self.dim = dim
        self.prompt = prompt or None
        self.calls = 0
        self.fail_after = fail_after

    def _word(self, w: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.blake2b(w.lower().encode(), digest_size=8).digest(), "little")
        return np.random.default_rng(seed).standard_normal(self.dim)

    def embed(self, texts, batch_size: int = 64) -> np.ndarray:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        out = np.stack([sum(self._word(w) for w in t.split()) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


LAST_HASH_EMBEDDER: list[HashEmbedder] = []


def _factory(**options) -> HashEmbedder:
    emb = HashEmbedder(**{k: v for k, v in options.items() if k in ("dim", "prompt", "fail_after")})
    LAST_HASH_EMBEDDER.append(emb)
    return emb


register_embedder("test-hash", _factory)


def make_dataset(
    root: Path,
    n: int = 12,
    *,
    dim: int = 32,
    seed: int = 0,
    split: str = "train",
    tokenize: bool = True,
    texts: list[str] | None = None,
) -> dict[str, Path]:
    """Write ``root/qwen_32d/{<split>_data.json, latents/<split>/*.npy, latent_stats.json}`` with fresh random
    unit latents and corpus sentences, and tokenize it into ``root/rwkv_tokens/<split>``. Returns the paths."""
    rng = np.random.default_rng(seed)
    data = root / "qwen_32d"
    lat_dir = data / "latents" / split
    lat_dir.mkdir(parents=True, exist_ok=True)
    texts = texts or generate(n, seed=seed + 100)
    latents = rng.standard_normal((n, dim)).astype(np.float32)
    latents /= np.linalg.norm(latents, axis=1, keepdims=True)
    rows = []
    for i, (text, z) in enumerate(zip(texts, latents, strict=True)):
        np.save(lat_dir / f"{i:08d}.npy", z)
        rows.append({"text": text, "latent_path": f"latents/{split}/{i:08d}.npy"})
    json_path = data / f"{split}_data.json"
    json_path.write_text(json.dumps(rows))
    if split == "train":
        LatentStats.compute(latents).save(data / "latent_stats.json")
    paths = {
        "root": root,
        "data": data,
        "json": json_path,
        "latent_dir": lat_dir,
        "token_dir": root / "rwkv_tokens" / split,
    }
    if tokenize:
        tokenize_json(json_path, root / "rwkv_tokens", max_length=512, num_workers=2)
    paths["latents"] = latents  # type: ignore[assignment]
    return paths


def rewrite_json(json_path: Path, edit) -> None:
    """Load the dataset JSON, let ``edit(rows)`` change it in place (its return value is ignored), write it back."""
    rows = json.loads(json_path.read_text())
    edit(rows)
    json_path.write_text(json.dumps(rows))


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to prove a failed command changed nothing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
