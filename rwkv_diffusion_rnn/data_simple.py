"""Paired (text tokens, 32-d latent) data for training: config, dataset, collate, training sample order.

Usage (what the trainer does)::

    cfg = DataConfig(token_dir="preprocessed_data/rwkv_tokens/train",
                     latent_dir="preprocessed_data/qwen_32d/latents/train")
    train_ds, val_ds = build_datasets(cfg)                 # deterministic split, validated structure
    stats = latent_stats(train_ds)                         # LatentStats: mean/std [32], standardize()/unstandardize()
    rows = stream_rows(seed, len(train_ds), step * global_batch, global_batch)     # step's global batch
    for mine in shard_rows(rows, grad_accum_steps, world_size, rank):             # this rank's micro-batches
        batch = collate_batch([train_ds[int(i)] for i in mine])
        # input_ids [B, T] long, attention_mask [B, T] long, latent [B, 32] float32, index [B] long

Both layouts of :mod:`rwkv_diffusion_rnn.data_sources` are read by the same class: per-row files (the original
scripts' layout: ``token_dir`` + ``latent_dir`` + the JSON) and packs (``token_dir`` pointing at a ``diffrwkv pack``
folder).

Bad samples: with ``on_bad_sample="error"`` (default) structure and counts are checked when the dataset is built and
each file's content when it is read -- a bad file raises a one-line DiffRwkvError naming file and row. With
``"skip"`` every row is validated up front (a pack in seconds; per-row files at ~4-6k rows/s), bad rows are dropped,
and ``dataset.problems`` lists them (also logged as one warning). Dropping up front keeps every batch full and all
DDP ranks in step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from rwkv_diffusion_rnn.config import NUM_WORKERS_REFUSED
from rwkv_diffusion_rnn.data_io import LatentStats, split_keys
from rwkv_diffusion_rnn.data_sources import FileStore, PackStore, is_pack, open_store
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.host_sync import HOST_MASK

__all__ = [
    "DataConfig",
    "LatentStats",
    "PairedTextLatentDataset",
    "build_datasets",
    "collate_batch",
    "latent_stats",
]
log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """The ``data.*`` config group. Paths may be relative to the working directory (Hydra runs with chdir off)."""

    json_path: str | None = None
    """Dataset JSON (the original scripts' ``train_data.json``). None: ``<latent_dir>/../../<split>_data.json`` if it
    exists, else rows pair by file name (latent ``<key>.npy`` <-> token ``<key>.npz``) and have no text."""
    token_dir: str = ""
    """Token ``.npz`` folder (originally ``rwkv_tokens/train``), or a pack folder (``diffrwkv pack``; auto-detected)."""
    latent_dir: str = ""
    """Latent ``.npy`` folder (originally ``qwen_32d/latents/train``); used to find the JSON and to pair without one."""
    max_samples: int | None = None
    """Use at most this many rows of each split (after the split, in row order). None: all."""
    num_workers: int = 0
    """Only 0: the trainer reads each step's rows in its own process (on CUDA it reads the next step's rows while
    the GPU computes); there are no worker processes. Any other value is refused."""
    validation_fraction: float = 0.0
    """Validation rows come from, in order: the ``validation_*`` paths when set; else, if > 0, this share of the
    rows (seeded hash of the row key: stable when rows are added); else the sibling ``validation`` split when the
    data has one (prepare-latents writes it); else none."""
    seed: int = 0
    """Seed of the hash split (``validation_fraction``)."""
    on_bad_sample: str = "error"
    """``error``: raise on the first bad row. ``skip``: validate all rows up front, drop and report bad ones."""
    max_length: int | None = None
    """Truncate token sequences to this many positions (including the appended end-of-text). None: as stored."""
    latent_dim: int = 32
    """Expected latent width; any other is an error naming the file."""
    append_eot: bool = False
    """Append the end-of-text id (0) to every sequence, attended, so a model can learn where text ends."""
    validation_json_path: str | None = None
    validation_token_dir: str | None = None
    validation_latent_dir: str | None = None
    """Explicit validation split (same layout rules as the training paths)."""


class PairedTextLatentDataset(Dataset):
    """Map-style dataset over a store's rows.

    ``__getitem__(i)`` -> ``{"input_ids": LongTensor [T], "latent": FloatTensor [D], "index": int}`` where ``index``
    is the row in the source (JSON row / pack row) -- unchanged by split, max_samples and shuffling; ``text(i)``
    gives the sample's text, ``source_text(index)`` a row's text.
    """

    def __init__(
        self,
        store: FileStore | PackStore,
        rows: np.ndarray | Sequence[int] | None = None,
        *,
        max_length: int | None = None,
        append_eot: bool = False,
        eot_id: int = 0,
        problems: list[str] | None = None,
    ) -> None:
        self.store = store
        self.rows = np.arange(len(store)) if rows is None else np.asarray(rows, dtype=np.int64)
        if max_length is not None and max_length < 1 + int(append_eot):
            raise DiffRwkvError(f"data.max_length is {max_length}; expected >= {1 + int(append_eot)}")
        self.max_length = max_length
        self.append_eot = append_eot
        self.eot_id = eot_id
        self.problems = problems if problems is not None else []
        #: optional ids transform (``vocab.TokenMap.to_model`` for a compact vocabulary): samples come out in the
        #: model's ids, so every consumer (trainer, evaluation) batches them the same way
        self.token_map = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        ids = self.store.tokens(row)
        if self.max_length is not None:
            ids = ids[: self.max_length - int(self.append_eot)]
        input_ids = torch.from_numpy(ids)
        if self.append_eot:
            input_ids = torch.cat([input_ids, torch.tensor([self.eot_id])])
        if self.token_map is not None:
            input_ids = self.token_map.to_model(input_ids.long())
        return {"input_ids": input_ids, "latent": torch.from_numpy(self.store.latent(row)), "index": row}

    def subset(self, rows: np.ndarray) -> PairedTextLatentDataset:
        """A dataset over the given SOURCE rows, sharing this one's store and settings."""
        out = PairedTextLatentDataset(
            self.store,
            rows,
            max_length=self.max_length,
            append_eot=self.append_eot,
            eot_id=self.eot_id,
            problems=self.problems,
        )
        out.token_map = self.token_map
        return out

    @property
    def latent_dim(self) -> int | None:
        return self.store.latent_dim

    def text(self, i: int) -> str | None:
        return self.store.text(int(self.rows[i]))

    def source_text(self, index: int) -> str | None:
        return self.store.text(int(index))

    def latent_array(self) -> np.ndarray:
        """All latents of this dataset, float32 ``[len, D]``."""
        if isinstance(self.store, PackStore):
            return np.asarray(self.store.arrays["latents"][np.sort(self.rows)], dtype=np.float32)
        return (
            np.stack([self.store.latent(int(r)) for r in self.rows])
            if len(self.rows)
            else np.zeros((0, self.latent_dim or 0), np.float32)
        )


def validate_rows(store: FileStore | PackStore, rows: np.ndarray, problems: list[str]) -> np.ndarray:
    """Read every row's tokens and latent; return the rows that are good, appending one message per bad row."""
    rows = rows[store.good[rows]]
    if isinstance(store, PackStore):  # content already checked vectorised when the pack was opened
        return rows

    def check(row: int) -> str | None:
        try:
            store.tokens(row)
            store.latent(row)
        except DiffRwkvError as exc:
            return str(exc)
        return None

    results = [check(r) for r in rows.tolist()]  # a plain loop: np.load holds the GIL, threads only add contention
    bad = [msg for msg in results if msg is not None]
    problems.extend(bad)
    return rows[[msg is None for msg in results]] if bad else rows


def _open(cfg: DataConfig, json_path, token_dir, latent_dir, problems: list[str]) -> FileStore | PackStore:
    if cfg.on_bad_sample not in ("error", "skip"):
        raise DiffRwkvError(f"data.on_bad_sample is {cfg.on_bad_sample!r}; expected 'error' or 'skip'")
    on_problem = problems.append if cfg.on_bad_sample == "skip" else None
    kwargs = {"latent_dim": cfg.latent_dim} | ({"on_problem": on_problem} if on_problem else {})
    return open_store(json_path, token_dir, latent_dir or "", **kwargs)


def _make(cfg: DataConfig, store, rows: np.ndarray, problems: list[str]) -> PairedTextLatentDataset:
    if cfg.on_bad_sample == "skip":
        n = len(rows)
        rows = validate_rows(store, rows, problems)
        if len(rows) < n:
            log.warning("data: skipped %d of %d rows (on_bad_sample=skip); first: %s", n - len(rows), n, problems[0])
    if cfg.max_samples is not None:
        rows = rows[: cfg.max_samples]
    return PairedTextLatentDataset(store, rows, max_length=cfg.max_length, append_eot=cfg.append_eot, problems=problems)


def _sibling_validation(cfg: DataConfig) -> tuple[str | None, str, str] | None:
    """The prepared ``validation`` split beside the training one, if it exists (per-row files or packs)."""
    token_dir = Path(cfg.token_dir)
    val_tokens = token_dir.parent / "validation"
    if token_dir.name == "validation" or not val_tokens.is_dir():
        return None
    if is_pack(val_tokens):
        return None, str(val_tokens), ""
    latent_dir = Path(cfg.latent_dir) if cfg.latent_dir else None
    json_path = Path(cfg.json_path) if cfg.json_path else None
    val_json = json_path.with_name("validation_data.json") if json_path else None
    val_latents = latent_dir.parent / "validation" if latent_dir else None
    if val_json is not None and val_json.is_file():
        return str(val_json), str(val_tokens), str(val_latents or "")
    if val_latents is not None and val_latents.is_dir():
        return None, str(val_tokens), str(val_latents)
    return None


def build_datasets(cfg: DataConfig) -> tuple[PairedTextLatentDataset, PairedTextLatentDataset]:
    """(train, validation) datasets for ``cfg``; the validation source is chosen as ``DataConfig`` documents."""
    if not cfg.token_dir:
        raise DiffRwkvError("data.token_dir is empty; expected the token folder (or a pack folder)")
    if cfg.num_workers != 0:
        raise DiffRwkvError(NUM_WORKERS_REFUSED.format(cfg.num_workers))
    problems: list[str] = []
    store = _open(cfg, cfg.json_path, cfg.token_dir, cfg.latent_dir, problems)
    rows = np.arange(len(store))
    explicit = cfg.validation_token_dir or cfg.validation_json_path
    if cfg.validation_fraction > 0 and not explicit:
        keys = store.keys if store.keys is not None else [str(i) for i in rows]
        train_rows, val_rows = split_keys(keys, cfg.validation_fraction, cfg.seed)
        return _make(cfg, store, train_rows, problems), _make(cfg, store, val_rows, problems)
    train = _make(cfg, store, rows, problems)
    if explicit:
        if not cfg.validation_token_dir:
            raise DiffRwkvError("data.validation_json_path is set without data.validation_token_dir; expected both")
        source = (cfg.validation_json_path, cfg.validation_token_dir, cfg.validation_latent_dir or "")
    else:
        source = _sibling_validation(cfg)
    if source is None:
        return train, PairedTextLatentDataset(
            store, np.zeros(0, np.int64), max_length=cfg.max_length, append_eot=cfg.append_eot
        )
    val_store = _open(cfg, *source, problems)
    return train, _make(cfg, val_store, np.arange(len(val_store)), problems)


def latent_stats(dataset: PairedTextLatentDataset, *, recompute: bool = False) -> LatentStats:
    """Per-dimension latent statistics for standardisation.

    Returns the ``latent_stats.json`` saved with the data (computed by prepare-latents / pack on the TRAINING split)
    when present and of the right width, else computes them from ``dataset`` (pass the training set)."""
    path = getattr(dataset.store, "stats_path", None)
    if not recompute and path is not None and Path(path).is_file():
        stats = LatentStats.load(path)
        if dataset.latent_dim is None or stats.mean.shape[0] == dataset.latent_dim:
            return stats
        log.warning("data: %s is %d-d, latents are %d-d; recomputing", path, stats.mean.shape[0], dataset.latent_dim)
    return LatentStats.compute(dataset.latent_array())


def collate_batch(samples: Sequence[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample of the batch.

    Returns ``input_ids`` long ``[B, T]`` (padding ``pad_id``), ``attention_mask`` long ``[B, T]`` (1 = token),
    ``latent`` float32 ``[B, D]``, ``index`` long ``[B]``."""
    if not samples:
        raise DiffRwkvError("collate_batch got an empty batch; expected at least one sample")
    lengths = torch.tensor([s["input_ids"].shape[0] for s in samples])
    input_ids = torch.nn.utils.rnn.pad_sequence(
        [s["input_ids"] for s in samples], batch_first=True, padding_value=pad_id
    )
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "latent": torch.stack([s["latent"] for s in samples]).float(),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
    }


def pad_with_eot(batch: dict[str, torch.Tensor], length: int, eot_id: int = 0) -> dict[str, torch.Tensor]:
    """Fixed-length rows for MDLM-style training (``data.pad_to_length``): each row becomes its text, then
    end-of-text tokens up to exactly ``length`` tokens, all real (attention 1, in the loss), so the model learns
    where a text ends and a sampler can generate ``length`` tokens and cut at the first end-of-text. Longer rows are
    cut to ``length - 1`` tokens plus one end-of-text."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    B, T = ids.shape
    lengths = mask.sum(1).clamp(max=length - 1)
    out = torch.full((B, length), eot_id, dtype=ids.dtype, device=ids.device)
    pos = torch.arange(length, device=ids.device)[None]
    keep = pos < lengths[:, None]
    width = min(T, length)
    out[:, :width] = torch.where(keep[:, :width], ids[:, :width], out[:, :width])
    return dict(batch, input_ids=out, attention_mask=torch.ones_like(out))


class DeviceRows:
    """A dataset's samples collated once into padded tensors on a device (``data.device_cache``).

    ``batch(rows)`` equals ``collate_batch([dataset[i] for i in rows])`` (then :func:`pad_with_eot` with
    ``pad_to_length``) moved to the device, dtypes included, but is an index on the device: no per-row reads and no
    host collation each step. Every row is read once here, so an unreadable row fails now, naming its file."""

    def __init__(self, dataset, device: torch.device | str, pad_to_length: int | None = None,
                 progress: bool = False) -> None:  # fmt: skip
        n = len(dataset)
        if n == 0:
            raise DiffRwkvError("data.device_cache: the training split is empty")
        samples = []
        rows = range(n)
        if progress:
            from tqdm.auto import tqdm

            rows = tqdm(rows, desc="device cache", unit="row", dynamic_ncols=True)
        for i in rows:
            samples.append(dataset[i])
        batch = collate_batch(samples)
        self.lengths = np.asarray([len(s["input_ids"]) for s in samples], dtype=np.int64)  # a batch's width, no sync
        self.fixed = bool(pad_to_length)
        if self.fixed:
            batch = pad_with_eot(batch, int(pad_to_length))
        self.device = torch.device(device)
        self.ids = batch["input_ids"].to(self.device)
        self.latent = batch["latent"].to(self.device)
        self.index = batch["index"].to(self.device)
        self.lengths_dev = torch.as_tensor(self.lengths).to(self.device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ids, self.latent, self.index, self.lengths_dev))

    def batch(self, rows: np.ndarray | Sequence[int]) -> dict[str, torch.Tensor]:
        host = np.asarray(rows, dtype=np.int64)
        r = torch.from_numpy(host)
        if self.device.type == "cuda":  # pinned + non-blocking: a pageable copy would wait for the whole stream
            r = r.pin_memory().to(self.device, non_blocking=True)
        else:
            r = r.to(self.device)
        ids = self.ids.index_select(0, r)
        if self.fixed:
            mask = torch.ones_like(ids)
            host_mask = torch.ones(ids.shape, dtype=torch.long)
        else:
            width = int(self.lengths[host].max())
            ids = ids[:, :width]
            mask = (torch.arange(width, device=self.device)[None, :] < self.lengths_dev[r][:, None]).long()
            host_mask = (torch.arange(width)[None, :] < torch.from_numpy(self.lengths[host])[:, None]).long()
        # the same mask on the host (host_sync.HOST_MASK): the corruption makes its masks there, without a wait
        return {"input_ids": ids, "attention_mask": mask, "latent": self.latent.index_select(0, r),
                "index": self.index.index_select(0, r), HOST_MASK: host_mask}  # fmt: skip


# ------------------------------------------------------------------------------------------ training sample order


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of epoch ``epoch``: a permutation of ``range(n)`` that depends on ``(seed, epoch)`` only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def stream_rows(seed: int, n: int, start: int, count: int) -> np.ndarray:
    """Rows at positions ``[start, start + count)`` of the training stream: epoch 0's permutation, then epoch 1's,
    ... concatenated. A global batch is a consecutive slice of it, so a batch that crosses an epoch's end takes the
    rest of that epoch and the start of the next one: every row is seen exactly once per ``n`` positions (no row is
    dropped, none repeated), whatever the batch size, and a position in global samples fixes the order whatever the
    number of processes."""
    if n <= 0 or start < 0 or count < 0:
        raise DiffRwkvError(f"stream_rows: need n > 0, start >= 0, count >= 0 (got {n}, {start}, {count})")
    out, pos, end = [], start, start + count
    while pos < end:
        epoch, k = divmod(pos, n)
        take = min(n - k, end - pos)
        out.append(epoch_permutation(seed, epoch, n)[k : k + take])
        pos += take
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def shard_rows(rows: np.ndarray, micro_steps: int, world: int, rank: int) -> list[np.ndarray]:
    """Rank ``rank``'s rows of a global batch ``rows``, per micro-step: micro-step ``m`` covers the ``m``-th of
    ``micro_steps`` equal consecutive slices and rank ``r`` takes every ``world``-th row of it from ``r``. Ranks are
    disjoint and together cover ``rows``, and the global micro-batch is the same for every ``(world, per-rank
    batch)`` with the same product."""
    if len(rows) % (micro_steps * world):
        raise DiffRwkvError(f"shard_rows: {len(rows)} rows do not split into {micro_steps} micro-steps x {world} ranks")
    per_micro = len(rows) // micro_steps
    return [rows[m * per_micro : (m + 1) * per_micro][rank::world] for m in range(micro_steps)]
