"""The data side of ``diffrwkv evaluate``: which rows are evaluated, their targets, the floor, re-encoding, STS-B.

    data = resolve_data(m, "preprocessed_data")        # EvalData: rows (held-out split), train, encoder
    t = take_targets(data.rows, 256)                   # Targets: texts, token ids, raw latents [N, D]
    z = encode_texts(data.encoder, t.texts)            # the data's own encoder + projection, [N, D]
    s1, s2, scores = read_stsb("../shared/data/stsb/sts-dev.csv")

``resolve_data`` rebuilds the split exactly as the training run made it (:func:`improved_trainer.data_config` of
the checkpoint's config, paths moved under ``data_dir``): the ``validation`` split beside the data, or the seeded
hash split of the training rows when the run used ``data.validation_fraction``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rwkv_diffusion_rnn.data_simple import PairedTextLatentDataset, build_datasets
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.latent_encoder import ENCODER_META, LatentEncoder
from rwkv_diffusion_rnn.pipeline import LoadedModel


@dataclass
class EvalData:
    """The evaluated split, the training split (floor sentences) and the encoder that made the latents."""

    rows: PairedTextLatentDataset
    train: PairedTextLatentDataset
    encoder: LatentEncoder
    encoder_dir: Path
    split: str
    source: str = ""  # where the evaluated rows come from, in words (for the report)


@dataclass
class Targets:
    """The first N rows of the split: source texts, clean token ids and raw latents ``[N, D]``."""

    texts: list[str]
    tokens: list[list[int]]
    latents: np.ndarray


def _encoder_dir(root: Path) -> Path | None:
    if (root / ENCODER_META).is_file():
        return root
    found = sorted(p.parent for p in root.glob(f"*/{ENCODER_META}"))
    return found[0] if len(found) == 1 else None


def resolve_data(
    m: LoadedModel, data_dir: str | Path | None, split: str = "validation", *, encoder_device: str = "cpu"
) -> EvalData:
    """The split to evaluate, as the training run split it, with the paths under ``data_dir`` (see module doc).
    ``encoder_device``: where the sentence encoder runs when generated text is re-encoded."""
    from rwkv_diffusion_rnn.improved_trainer import data_config

    if split not in ("validation", "train"):
        raise DiffRwkvError(f"--split is '{split}'; expected 'validation' or 'train'")
    dc = replace(data_config(m.config), max_samples=None, num_workers=0)
    if data_dir is None:
        src = Path(dc.json_path).parent if dc.json_path else Path(dc.latent_dir).parent.parent
        enc_dir = _encoder_dir(src)
        if enc_dir is None:
            raise DiffRwkvError(f"{src / ENCODER_META}: not found; pass --data with the prepare-latents folder")
    else:
        root = Path(data_dir)
        if not root.is_dir():
            raise DiffRwkvError(f"{root}: data folder not found; expected the prepare-latents output or its parent")
        enc_dir = _encoder_dir(root)
        if enc_dir is None:
            raise DiffRwkvError(
                f"{root / ENCODER_META}: not found (nor in one subfolder); expected the folder "
                "written by diffrwkv prepare-latents, or its parent"
            )
        candidates = [root / "rwkv_tokens", enc_dir.parent / "rwkv_tokens", enc_dir / "rwkv_tokens"]
        tokens = next((c for c in candidates if (c / "train").is_dir()), None)
        if tokens is None:
            raise DiffRwkvError(
                f"{candidates[0] / 'train'}: token folder not found; expected diffrwkv tokenize's "
                "output in rwkv_tokens/ beside the latents"
            )
        dc = replace(
            dc,
            json_path=str(enc_dir / "train_data.json"),
            token_dir=str(tokens / "train"),
            latent_dir=str(enc_dir / "latents" / "train"),
            validation_json_path=None,
            validation_token_dir=None,
            validation_latent_dir=None,
        )
    train, val = build_datasets(dc)
    rows = val if split == "validation" else train
    if split == "train":
        source = f"training rows of {dc.token_dir}"
    elif dc.validation_fraction > 0:
        source = f"the seeded {dc.validation_fraction:g} hash split of {dc.token_dir} (data.validation_fraction)"
    else:
        source = f"the validation split beside {dc.token_dir}"
    if len(rows) == 0:
        raise DiffRwkvError(
            f"{dc.token_dir}: no {split} rows (no validation split beside the data and "
            "data.validation_fraction is 0); expected a validation split or --split train"
        )
    if rows.text(0) is None or train.text(0) is None:
        raise DiffRwkvError(f"{dc.token_dir}: rows have no text; expected a dataset JSON with a 'text' per row")
    encoder = LatentEncoder.from_dir(enc_dir, device=encoder_device)
    rows.token_map = train.token_map = m.token_map  # the model's ids (a compact vocabulary maps World ids)
    return EvalData(rows, train, encoder, enc_dir, split, source)


def take_targets(rows: PairedTextLatentDataset, n: int) -> Targets:
    """The first ``n`` rows (all if fewer): texts, token ids (as trained: truncated to data.max_length), latents."""
    n = min(n, len(rows))
    items = [rows[i] for i in range(n)]
    return Targets(
        texts=[rows.text(i) or "" for i in range(n)],
        tokens=[it["input_ids"].tolist() for it in items],
        latents=np.stack([it["latent"].numpy() for it in items]).astype(np.float32),
    )


def floor_texts(train: PairedTextLatentDataset, n: int, seed: int) -> list[str]:
    """``n`` random training sentences (with replacement; seeded): what a decoder that ignores the latent returns."""
    idx = np.random.default_rng([seed, 7]).integers(0, len(train), size=n)
    return [train.text(int(i)) or "" for i in idx]


def encode_texts(encoder: LatentEncoder, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Re-encode texts ``[N] -> [N, D]``; an empty (or blank) text gets a zero row (cosine 0 to everything)."""
    keep = [i for i, t in enumerate(texts) if t.strip()]
    out = np.zeros((len(texts), encoder.projection.out_dim), dtype=np.float32)
    if keep:
        out[keep] = encoder.encode([texts[i] for i in keep], batch_size=batch_size)
    return out


def read_stsb(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """STS-B csv: tab-separated genre, file, year, id, score (0-5), sentence1, sentence2 (QUOTE_NONE; extra
    trailing columns are ignored). Returns (sentence1, sentence2, scores)."""
    path = Path(path)
    s1, s2, scores = [], [], []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if not row or not "".join(row).strip():
                    continue
                try:
                    score = float(row[4])
                    a, b = row[5], row[6]
                except (IndexError, ValueError):
                    raise DiffRwkvError(
                        f"{path}:{n}: expected 7 tab-separated fields with a numeric score in "
                        f"field 5; got {len(row)} fields"
                    ) from None
                s1.append(a)
                s2.append(b)
                scores.append(score)
    except OSError as exc:
        raise DiffRwkvError(f"{path}: cannot read the STS-B file ({exc.strerror})") from exc
    if not scores:
        raise DiffRwkvError(f"{path}: no sentence pairs; expected the STS-B csv (sts-dev.csv)")
    return s1, s2, np.asarray(scores)
