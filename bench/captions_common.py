"""What the caption scripts share — the bundle as packs, fixed-length rows, the compact vocabulary, the evaluation
inputs every run is scored on (:class:`Eval`), the run log, and the fixed training budget with its time-based
learning-rate schedule.

The budget rule (the same for every run, diffusion or baseline):

* the first ``untimed_steps`` optimizer steps (default 2) run before the clock starts: they carry one-off costs
  (CUDA context, Triton kernel compile / cache load, allocator growth) that would otherwise be charged to whichever
  run happens to come first in a process. They are real training steps and are counted in ``steps``;
* then steps run until ``budget_s`` seconds of wall clock have passed (measured after each step; every step ends
  with a host sync because the loss is read as a Python float, so the clock sees finished GPU work);
* the learning rate is a function of the step (linear warm-up over ``warmup_steps``) and of the ELAPSED SHARE of
  the budget (cosine from the peak to ``min_lr_ratio`` x peak at the end of the budget). A step-based cosine needs
  the number of steps in advance, which a wall-clock budget does not give, and would end the schedule at different
  points for fast and slow variants (``twice`` costs 2x per step); with time as the axis every run ends its
  schedule exactly when its budget ends.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

EOT = 0
_T0 = time.perf_counter()
_LOG: list[Path] = []


class RunError(Exception):
    """A one-line, user-facing problem with the arguments or the data."""


def say(msg: str) -> None:
    """One line of the run log: printed, and appended to the file :func:`log_to` names."""
    line = f"[captions_run {since_start():6.0f}s] {msg}"
    print(line, flush=True)
    for p in _LOG:
        with open(p, "a") as f:
            f.write(line + "\n")


def since_start() -> float:
    """Seconds since this process loaded the harness (what ``--deadline-s`` counts)."""
    return time.perf_counter() - _T0


def log_to(path: Path | None) -> None:
    """Append :func:`say`'s lines to ``path`` from now on (``None``: to no file)."""
    _LOG[:] = [] if path is None else [path]


# ------------------------------------------------------------------------------------------------ bundle -> packs
def materialize_packs(bundle: dict, work: str | Path) -> Path:
    """Write the bundle's train and validation splits as two sibling packs under ``work/packs`` (the layout
    ``diffrwkv pack`` writes; the loader finds ``validation`` beside ``train``). Returns the train pack folder."""
    root = Path(work) / "packs"
    meta_src = bundle["meta"]
    for split in ("train", "val"):
        folder = root / ("train" if split == "train" else "validation")
        folder.mkdir(parents=True, exist_ok=True)
        tokens = np.asarray(bundle[f"{split}_tokens"], dtype=np.uint16)
        offsets = np.asarray(bundle[f"{split}_offsets"], dtype=np.int64)
        latents = np.asarray(bundle[f"{split}_latents"], dtype=np.float32)
        np.save(folder / "tokens.npy", tokens)
        np.save(folder / "offsets.npy", offsets)
        np.save(folder / "latents.npy", latents)
        (folder / "latent_stats.json").write_bytes((Path(bundle["dir"]) / "latent_stats.json").read_bytes())
        meta = {
            "format": "diffrwkv-pack/1",
            "count": int(latents.shape[0]),
            "latent_dim": int(latents.shape[1]),
            "token_dtype": "uint16",
            "num_tokens": int(offsets[-1]),
            "max_length": int(np.diff(offsets).max()),
            "vocab_size": 65536,
            "source": {"bundle": str(bundle["dir"]), "split": split, "format": meta_src["format"]},
            "skipped": 0,
            "problems": [],
        }
        (folder / "pack_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return root / "train"


def truncated_unique(tokens: np.ndarray, offsets: np.ndarray, max_length: int | None) -> np.ndarray:
    """Sorted unique ids among each row's first ``max_length`` tokens (what the trainer's loader yields)."""
    tokens = np.asarray(tokens)
    offsets = np.asarray(offsets, dtype=np.int64)
    if max_length is None:
        return np.unique(tokens)
    lengths = np.diff(offsets)
    pos = np.arange(tokens.shape[0], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    return np.unique(tokens[pos < max_length])


def compact_vocab(tokens: np.ndarray, offsets: np.ndarray, max_length: int | None):
    """The compact vocabulary (``model.vocab=data``) exactly as the Trainer builds it from the training rows."""
    from rwkv_diffusion_rnn.vocab import TokenMap

    ids = set(truncated_unique(tokens, offsets, max_length).tolist()) | {EOT}
    return TokenMap(sorted(ids) + [-1])


def fixed_rows(tokens: np.ndarray, offsets: np.ndarray, length: int, token_map=None) -> tuple[np.ndarray, np.ndarray]:
    """Rows as ``data.pad_to_length`` formats them: each text cut to ``length - 1`` tokens, then end-of-text up to
    ``length``. Returns (ids int64 [N, length] in the model's ids, text lengths int64 [N] after the cut)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = offsets.shape[0] - 1
    lengths = np.minimum(np.diff(offsets), length - 1)
    out = np.full((n, length), EOT, dtype=np.int64)
    pos = np.arange(length)[None, :]
    keep = pos < lengths[:, None]
    src = offsets[:-1, None] + pos
    out[keep] = tokens[np.minimum(src, max(tokens.shape[0] - 1, 0))][keep]
    if token_map is not None:
        out = token_map.to_model(torch.from_numpy(out)).numpy()
    return out, lengths


def id_lists(
    tokens: np.ndarray, offsets: np.ndarray, token_map=None, limit: int | None = None, spell=None
) -> list[list[int]]:
    """Ragged rows as lists of ids (mapped to the model's ids when ``token_map`` is given; with ``spell``, the World
    tokenizer's byte table, ids the model never saw are spelled with ones it did: ``TokenMap.spell``)."""
    n = offsets.shape[0] - 1 if limit is None else min(limit, offsets.shape[0] - 1)
    rows = [np.asarray(tokens[offsets[i] : offsets[i + 1]], dtype=np.int64) for i in range(n)]
    if token_map is None:
        return [r.tolist() for r in rows]
    if spell is not None:
        return [token_map.spell(r.tolist(), spell) for r in rows]
    return [token_map.to_model(torch.from_numpy(r)).tolist() for r in rows]


def to_world(token_map, rows: list[list[int]]) -> list[list[int]]:
    """Model ids -> World ids (the unknown id, never generated, would map to -1)."""
    if token_map is None:
        return [list(map(int, r)) for r in rows]
    table = token_map.vocab_ids
    return [[int(table[i]) for i in r] for r in rows]


def texts(tok, world_rows: list[list[int]]) -> list[str] | None:
    """World-id rows decoded with ``tok`` (``None`` when no tokenizer is installed: the scorer decodes them)."""
    return None if tok is None else [tok.decode(r) for r in world_rows]


# ------------------------------------------------------------------------------------------- evaluation inputs
class Eval:
    """The evaluation inputs, in World ids and raw latents (shared by every run). ``eval_limit`` > 0 keeps only
    that many images and STS-B pairs (tests)."""

    def __init__(self, bundle: dict, eval_limit: int = 0) -> None:
        n_img = int(bundle["meta"]["counts"]["val_images"])
        self.n_img = min(n_img, eval_limit) if eval_limit else n_img
        pairs = int(bundle["meta"]["counts"]["stsb_pairs"])
        self.pairs = min(pairs, eval_limit) if eval_limit else pairs
        self.val_latents = np.array(bundle["val_latents"][: self.n_img], dtype=np.float32)  # a writable copy
        self.val_tokens, self.val_offsets = np.asarray(bundle["val_tokens"]), np.asarray(bundle["val_offsets"])
        self.sts_tokens, self.sts_offsets = np.asarray(bundle["stsb_tokens"]), np.asarray(bundle["stsb_offsets"])
        self.sts_scores = np.asarray(bundle["stsb_scores"][: self.pairs], dtype=np.float64)
        self.sts_rows = list(range(self.pairs)) + list(range(pairs, pairs + self.pairs))  # s1 ..., then s2 ...

    def t2l_inputs(self, token_map, spell=None) -> list[list[int]]:
        """Model-id lists: caption-1 of each image, then the STS-B sentence-1s, then the sentence-2s (``spell``: the
        World byte table, to spell unseen ids with seen ones, ``TokenMap.spell``)."""
        val = id_lists(self.val_tokens, self.val_offsets, token_map, self.n_img, spell)
        sts_all = id_lists(self.sts_tokens, self.sts_offsets, token_map, spell=spell)
        return val + [sts_all[i] for i in self.sts_rows]

    def t2l_fixed(self, token_map, length: int) -> tuple[np.ndarray, np.ndarray]:
        lists = self.t2l_inputs(token_map)
        flat = np.array([i for r in lists for i in r], dtype=np.int64)
        off = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in lists], out=off[1:])
        return fixed_rows(flat, off, length)  # already model ids

    def t2l_metrics(self, pred: np.ndarray) -> dict:
        from rwkv_diffusion_rnn import metrics as M

        val = pred[: self.n_img]
        s1, s2 = pred[self.n_img : self.n_img + self.pairs], pred[self.n_img + self.pairs :]
        cos, half = M.mean_and_halfwidth(M.cosine_rows(val, self.val_latents))
        rho = M.spearman(M.cosine_rows(s1, s2), self.sts_scores) if self.pairs > 1 else float("nan")
        return {
            "val_cosine": finite_or_none(cos),
            "val_cosine_ci95": finite_or_none(half),
            "stsb_spearman": finite_or_none(rho),
            "rows": {"val": self.n_img, "stsb_pairs": self.pairs},
        }


# ------------------------------------------------------------------------------------------ the wall-clock budget
class BudgetClock:
    """Wall clock of the timed part of a run: 0 until :meth:`start`, then seconds since."""

    def __init__(self) -> None:
        self.t0: float | None = None

    def start(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def started(self) -> bool:
        return self.t0 is not None

    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else time.perf_counter() - self.t0

    def tick(self) -> None:
        """A training step starts (the wall clock needs no count)."""

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is not budget time (a validation pass between steps); the lr schedule does not move."""
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.t0 is not None:
                self.t0 += time.perf_counter() - t

    def wall(self) -> float:
        """Seconds since the start, whatever the budget's unit."""
        return BudgetClock.elapsed(self)


class StepClock(BudgetClock):
    """A budget counted in training steps instead of seconds (``captions_run.py --budget-steps``): for studies on a
    shared machine, where the wall clock measures the neighbours as much as the run. ``elapsed()`` is the number of
    timed steps started (:func:`train_for_budget` ticks it), so :class:`TimeCosineLR` follows steps; ``wall()`` is
    the wall clock since the start."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def tick(self) -> None:
        if self.started:
            self.n += 1

    def elapsed(self) -> float:
        return float(self.n)


def budget_of(args) -> float:
    """The training budget in its unit: timed steps with ``--budget-steps``, else seconds."""
    return float(args.budget_steps) if args.budget_steps > 0 else float(args.budget_s)


def budget_text(args) -> str:
    return f"{args.budget_steps} steps" if args.budget_steps > 0 else f"{args.budget_s:.0f} s"


def make_clock(budget_steps: int) -> BudgetClock:
    """A :class:`StepClock` when a step budget is given (> 0), else the wall clock."""
    return StepClock() if budget_steps > 0 else BudgetClock()


class TimeCosineLR:
    """Learning rate ``peak x min(1, (n + 1) / warmup) x cosine(elapsed / budget)`` (floor ``min_ratio``), set on
    every param group. Duck-types the scheduler interface the Trainer calls (``step``, ``get_last_lr``,
    ``state_dict``), so it can replace ``trainer.scheduler``."""

    def __init__(
        self, optimizer, peak_lr: float, warmup_steps: int, budget_s: float, min_ratio: float, clock: BudgetClock
    ) -> None:
        self.optimizer, self.peak, self.warmup = optimizer, float(peak_lr), max(1, int(warmup_steps))
        self.budget, self.min_ratio, self.clock, self.n = float(budget_s), float(min_ratio), clock, 0
        self._apply()

    def factor(self) -> float:
        p = min(1.0, self.clock.elapsed() / self.budget) if self.budget > 0 else 1.0
        cos = self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
        return min(1.0, (self.n + 1) / self.warmup) * cos

    def _apply(self) -> None:
        lr = self.peak * self.factor()
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self) -> None:
        self.n += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"n": self.n, "elapsed": self.clock.elapsed()}


def train_for_budget(
    step_fn,
    budget_s: float,
    clock: BudgetClock,
    *,
    untimed_steps: int = 2,
    before_step=None,
    log=None,
    log_every_s: float = 15.0,
    curve_every: int = 25,
) -> dict:
    """Call ``step_fn() -> dict`` (needs "loss") until the budget is spent (see the module docstring): seconds, or
    timed steps with a :class:`StepClock`. Returns steps, timing (``train_s``: the budget's unit; ``wall_s``:
    seconds), a loss curve (every ``curve_every`` steps) and the last record."""
    steps, curve, last = 0, [], {}
    cuda = torch.cuda.is_available()
    if cuda:  # the training peak: weights, optimiser state and the steps' activations (not the evaluation's)
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    warmup_s = 0.0
    next_log = log_every_s
    while True:
        if steps == untimed_steps and not clock.started:
            warmup_s = time.perf_counter() - t_start
            clock.start()
        if clock.started and clock.elapsed() >= budget_s:
            break
        if before_step is not None:
            before_step(steps)
        clock.tick()  # a step counts when it starts, as the wall clock has run on by the time the step sets its lr
        rec = step_fn()
        steps += 1
        last = rec
        if not math.isfinite(float(rec.get("loss", float("nan")))):
            rec["nonfinite"] = True
        if steps % curve_every == 0 or steps == 1:
            curve.append(
                {
                    "step": steps,
                    "t": round(clock.elapsed(), 2),
                    **{k: round(float(v), 5) for k, v in rec.items() if isinstance(v, (int, float))},
                }
            )
        wall = clock.wall()
        if log is not None and clock.started and wall >= next_log:
            next_log += log_every_s
            log(f"step {steps} t={wall:.0f}s loss {float(rec['loss']):.4f}")
    return {
        "steps": steps,
        "untimed_steps": min(untimed_steps, steps),
        "timed_steps": max(0, steps - untimed_steps),
        "warmup_s": round(warmup_s, 2),
        "train_s": round(clock.elapsed(), 2),
        "wall_s": round(clock.wall(), 2),
        "curve": curve,
        "last": {k: v for k, v in last.items() if isinstance(v, (int, float))},
        "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
    }


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False, default=_default) + "\n")
    os.replace(tmp, path)


def _default(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def finite_or_none(x):
    """Floats for JSON: NaN / inf -> None."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
