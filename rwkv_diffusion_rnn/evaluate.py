"""What ``diffrwkv evaluate`` measures on a trained checkpoint: held-out rows, beside a floor.

:func:`evaluate` computes every number (its command-line front, flags and report are
:mod:`rwkv_diffusion_rnn.eval_cli` and :mod:`rwkv_diffusion_rnn.eval_report`; the regression checklist built on it
is :mod:`rwkv_diffusion_rnn.checklist`).

What is measured (definitions in :mod:`rwkv_diffusion_rnn.metrics`):

* likelihood, fixed noise (as the trainer's validation, with condition dropout off): text NELBO in bits per token
  with the latent given (always ELBO-weighted, whatever the training weighting), beside log2(V), the cost of a
  uniform prediction; latent MSE in the training parameterisation with the text given, beside the MSE of the trivial
  predictor that ignores the text (the linear estimate of the target from the noisy latent alone);
* L2T round trip on the first ``--num-samples`` rows: generated text re-encoded with the data's own
  :class:`~rwkv_diffusion_rnn.latent_encoder.LatentEncoder`, cosine to the target latent, retrieval top-1 among the
  evaluated rows, BLEU / chrF / exact match against the source text, distinct-1/2;
* T2L: cosine of the sampled latent to the true latent (raw space); STS-B Spearman of T2L latents beside the
  encoder's own 32-d Spearman (the ceiling);
* the floor on the same rows: a random training sentence returned for every target; and the source text itself
  (re-encoded: checks that the encoder reproduces the stored latents).

When the model was trained without ``data.pad_to_length`` it cannot choose a length, so L2T is given each target's
true token length (oracle length, ``length=[...]`` one per row); the report says so.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from rwkv_diffusion_rnn import metrics as M
from rwkv_diffusion_rnn.data_simple import PairedTextLatentDataset
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.eval_data import (
    EvalData,
    Targets,
    encode_texts,
    floor_texts,
    read_stsb,
    take_targets,
)
from rwkv_diffusion_rnn.pipeline import LoadedModel
from rwkv_diffusion_rnn.train_data import collate
from rwkv_diffusion_rnn.train_metrics import VALIDATION_SALT


class Sampler(Protocol):
    """What evaluation needs from :mod:`rwkv_diffusion_rnn.sampling` (the module itself satisfies it). Keywords
    passed: ``length`` (L2T only: one int per row, or None), ``num_steps``, ``batch_size``, ``seed``, ``device``,
    ``progress``, and the user's ``--l2t-option`` / ``--t2l-option`` pairs."""

    def sample_l2t(self, m: LoadedModel, latents_raw: Any, **kwargs: Any) -> list[list[int]]: ...

    def sample_t2l(self, m: LoadedModel, token_ids: list[list[int]], **kwargs: Any) -> np.ndarray: ...


def default_sampler() -> Sampler:
    """The project's samplers (:mod:`rwkv_diffusion_rnn.sampling`)."""
    try:
        from rwkv_diffusion_rnn import sampling
    except ModuleNotFoundError as exc:
        if exc.name == "rwkv_diffusion_rnn.sampling":
            raise DiffRwkvError("sampling metrics need rwkv_diffusion_rnn/sampling.py, not in this version") from exc
        raise
    return sampling  # type: ignore[return-value]


@dataclass
class EvalOptions:
    """Settings of one evaluation (the CLI's flags)."""

    split: str = "validation"  # which held-out split: "validation" or "train"
    num_samples: int = 256  # rows sampled for L2T / T2L (the first N of the split)
    steps: tuple[int, ...] = (1,)  # sampling steps (L2T: per block); several give metrics-vs-steps
    stsb: str | None = None  # STS-B csv (tab-separated, QUOTE_NONE)
    seed: int = 0  # sampling seed and floor draw
    batch_size: int = 64  # rows per forward / sampler batch
    device: str = "auto"
    elbo_rows: int | None = None  # rows for NELBO / MSE (None: the whole split)
    l2t_options: dict[str, Any] = field(default_factory=dict)  # passed to sample_l2t (strategy, temperature, ...)
    t2l_options: dict[str, Any] = field(default_factory=dict)  # passed to sample_t2l (method, eta, ...)
    examples: int = 8  # example generations in the report
    progress: bool = True


@dataclass
class EvalResult:
    """``metrics`` is what ``metrics.json`` holds; ``samples[steps]`` keeps the raw generations for the checklist."""

    metrics: dict[str, Any]
    samples: dict[int, dict[str, Any]]
    targets: Targets


def pick_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def log(msg: str, progress: bool = True) -> None:
    if progress:
        print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------- likelihood


def _autocast(m: LoadedModel, device: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(m.config.training.dtype)
    if dtype is None or not device.startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def collate_rows(m: LoadedModel, samples: list[dict]) -> dict[str, torch.Tensor]:
    """Batch rows as training did (right padding, or end-of-text padding to ``data.pad_to_length``)."""
    return collate(samples, m.config.data.pad_to_length)


@torch.no_grad()
def likelihood_metrics(
    m: LoadedModel,
    rows: PairedTextLatentDataset,
    *,
    batch_size: int = 64,
    max_rows: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Validation text NELBO (bits/token, latent given) and latent MSE (text given) under fixed noise, and the
    reference levels: ``log2(V)`` (uniform prediction) and the trivial latent predictor's MSE on the same noise.

    The noise is the trainer's validation stream (:class:`DiffusionObjective` with its evaluation salt), but with
    condition dropout off (``p_uncond = 0``) and ELBO weighting always: a conditional NELBO comparable across runs.
    """
    from tqdm.auto import tqdm

    from rwkv_diffusion_rnn.diffusion_process import MaskedDiffusion
    from rwkv_diffusion_rnn.objectives import DiffusionObjective

    text = MaskedDiffusion(m.text.schedule, m.text.mask_id, "elbo")
    obj = DiffusionObjective(text, m.latent, m.normalizer, 0.0, 1.0, m.config.data.max_length, seed)
    n = len(rows) if max_rows is None else min(max_rows, len(rows))
    sums = np.zeros(5)  # nelbo nats, tokens, latent sq. error, latent rows, trivial sq. error
    m.denoiser.eval()
    for i in tqdm(range(math.ceil(n / batch_size)), desc="likelihood", disable=not progress, leave=False):
        idx = range(i * batch_size, min((i + 1) * batch_size, n))
        batch = {k: v.to(device) for k, v in collate_rows(m, [rows[j] for j in idx]).items()}
        ones = torch.ones(2, device=device)
        c = obj.corrupt(batch, "l2t", i, 0, 0, 1, salt=VALIDATION_SALT)
        with _autocast(m, device):
            _, st = obj.loss(m.denoiser, c, ones)
        sums[0] += float(st["sums"][0])
        sums[1] += float(c.counts("elbo")[0])
        c = obj.corrupt(batch, "t2l", i, 2, 0, 1, salt=VALIDATION_SALT)
        with _autocast(m, device):
            _, st = obj.loss(m.denoiser, c, ones)
        sums[2] += float(st["sums"][3])
        sums[3] += float(c.counts("elbo")[1])
        # trivial predictor: linear MMSE of (x0, eps) from z_t alone, for a standardised z0 (mean 0, var 1 per dim)
        a, s = m.latent.schedule.alpha_sigma(c.t_latent.float())
        a, s = a[:, None], s[:, None]
        x0_hat, eps_hat = a * c.z_t / (a * a + s * s), s * c.z_t / (a * a + s * s)
        trivial = m.latent.target(x0_hat, eps_hat, c.t_latent)
        err, _ = m.latent.loss(trivial, c.z0, c.eps, c.t_latent, weight=c.latent_rows, reduction="sum")
        sums[4] += float(err)
    return {
        "val_text_nelbo_bits": sums[0] / max(sums[1], 1.0) / math.log(2.0),
        "uniform_bits": math.log2(m.denoiser.vocab_size),
        "val_latent_mse": sums[2] / max(sums[3], 1.0),
        "trivial_latent_mse": sums[4] / max(sums[3], 1.0),
        "rows": n,
        "tokens": int(sums[1]),
    }


# ------------------------------------------------------------------------------------------------------- sampling


def oracle_length(m: LoadedModel) -> bool:
    """True when L2T must be told each target's length (the model was trained without ``data.pad_to_length``)."""
    return not m.config.data.pad_to_length


def generate_l2t(
    m: LoadedModel, sampler: Sampler, t: Targets, *, num_steps: int, opts: EvalOptions, device: str
) -> list[list[int]]:
    """L2T token ids for every target latent, in one sampler call. With oracle length, ``length`` is the list of
    the targets' true token lengths (one per row); otherwise None (the model's ``data.pad_to_length``)."""
    length = [len(x) for x in t.tokens] if oracle_length(m) else None
    kw = dict(num_steps=num_steps, batch_size=opts.batch_size, seed=opts.seed, device=device, **opts.l2t_options)
    kw.setdefault("progress", opts.progress)
    return [list(map(int, r)) for r in sampler.sample_l2t(m, t.latents, length=length, **kw)]


def generate_t2l(
    m: LoadedModel, sampler: Sampler, token_ids: list[list[int]], *, num_steps: int, opts: EvalOptions, device: str
) -> np.ndarray:
    """T2L raw latents ``[N, D]`` for token id lists."""
    kw = dict(num_steps=num_steps, batch_size=opts.batch_size, seed=opts.seed, device=device, **opts.t2l_options)
    kw.setdefault("progress", opts.progress)
    out = sampler.sample_t2l(m, token_ids, **kw)
    out = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    return out.astype(np.float64)


def special_token_rows(m: LoadedModel, samples: list[list[int]]) -> list[int]:
    """Rows holding pad/end-of-text (id 0), ``<mask>`` or an id outside the vocabulary."""
    v = m.denoiser.vocab_size
    return [i for i, ids in enumerate(samples) if any(x <= 0 or x >= v for x in ids)]


def decode(m: LoadedModel, samples: list[list[int]]) -> list[str]:
    """Token ids -> text; ids the tokenizer cannot decode are dropped (they are counted by special_token_rows)."""
    v = m.denoiser.vocab_size
    return [m.tokenizer.decode([x for x in ids if 0 <= x < v]) for ids in samples]


def tokenize(m: LoadedModel, texts: Sequence[str]) -> list[list[int]]:
    """Texts -> token ids as the data pipeline made them, cut to what the model was trained on."""
    d = m.config.data
    limit = d.pad_to_length - 1 if d.pad_to_length else d.max_length
    return [m.tokenizer.encode(t)[:limit] if limit else m.tokenizer.encode(t) for t in texts]


def l2t_scores(texts: list[str], latents: np.ndarray, t: Targets) -> dict[str, float]:
    """Round-trip scores of texts (one per target) and their re-encodings ``[N, D]``."""
    cos, half = M.mean_and_halfwidth(M.cosine_rows(latents, t.latents))
    return {
        "l2t_cosine": cos,
        "l2t_cosine_ci95": half,
        "l2t_retrieval_top1": M.retrieval_top1(latents, t.latents),
        **M.text_scores(texts, t.texts),
        "distinct_1": M.distinct_n(texts, 1),
        "distinct_2": M.distinct_n(texts, 2),
        "empty_fraction": float(np.mean([not x.strip() for x in texts])) if texts else float("nan"),
    }


def sts_spearman(latents_1: np.ndarray, latents_2: np.ndarray, scores: np.ndarray) -> float:
    return M.spearman(M.cosine_rows(latents_1, latents_2), scores)


# ------------------------------------------------------------------------------------------------------ orchestration


def evaluate(
    m: LoadedModel,
    data: EvalData,
    opts: EvalOptions,
    sampler: Sampler | None = None,
    *,
    likelihood: dict[str, float] | None = None,
) -> EvalResult:
    """Everything the module docstring lists, on ``data``; returns :class:`EvalResult` (``metrics`` is JSON-able).
    ``sampler`` defaults to :mod:`sampling`; ``likelihood`` reuses :func:`likelihood_metrics` already computed."""
    device = pick_device(opts.device)
    p = opts.progress
    sampler = sampler or default_sampler()
    enc, bs = data.encoder, opts.batch_size
    t0 = time.perf_counter()
    lik = likelihood
    if lik is None:
        log(f"likelihood on {len(data.rows) if opts.elbo_rows is None else opts.elbo_rows} {data.split} rows", p)
        lik = likelihood_metrics(
            m, data.rows, batch_size=bs, max_rows=opts.elbo_rows, device=device, seed=opts.seed, progress=p
        )
    t = take_targets(data.rows, opts.num_samples)
    log(f"floor and source-text re-encoding on {len(t.texts)} rows", p)
    floor_txt = floor_texts(data.train, len(t.texts), opts.seed)
    floor_lat = encode_texts(enc, floor_txt, bs)
    floor = l2t_scores(floor_txt, floor_lat, t)
    floor["t2l_cosine"], floor["t2l_cosine_ci95"] = M.mean_and_halfwidth(M.cosine_rows(floor_lat, t.latents))
    floor["sts_spearman"] = 0.0  # a latent that ignores the text ranks pairs at random
    source = l2t_scores(t.texts, encode_texts(enc, t.texts, bs), t)
    sts = None
    if opts.stsb:
        s1, s2, scores = read_stsb(opts.stsb)
        sts = {
            "path": str(opts.stsb),
            "pairs": len(scores),
            "encoder_spearman": sts_spearman(encode_texts(enc, s1, bs), encode_texts(enc, s2, bs), scores),
        }
        sts_tokens = tokenize(m, s1 + s2)
    by_steps: dict[str, dict[str, float]] = {}
    samples: dict[int, dict[str, Any]] = {}
    for k in opts.steps:
        log(f"L2T, {k} steps, {len(t.texts)} rows{' (oracle length)' if oracle_length(m) else ''}", p)
        t1 = time.perf_counter()
        ids = generate_l2t(m, sampler, t, num_steps=k, opts=opts, device=device)
        l2t_s = time.perf_counter() - t1
        texts = decode(m, ids)
        row = l2t_scores(texts, encode_texts(enc, texts, bs), t)
        row["special_token_rows"] = len(special_token_rows(m, ids))
        log(f"T2L, {k} steps", p)
        t1 = time.perf_counter()
        z = generate_t2l(m, sampler, t.tokens, num_steps=k, opts=opts, device=device)
        t2l_s = time.perf_counter() - t1
        row["t2l_cosine"], row["t2l_cosine_ci95"] = M.mean_and_halfwidth(M.cosine_rows(z, t.latents))
        if sts is not None:
            log(f"STS-B T2L, {k} steps, {len(sts_tokens)} sentences", p)
            zs = generate_t2l(m, sampler, sts_tokens, num_steps=k, opts=opts, device=device)
            row["sts_spearman"] = sts_spearman(zs[: len(scores)], zs[len(scores) :], scores)
        row.update(l2t_seconds=l2t_s, l2t_sentences_per_s=len(ids) / max(l2t_s, 1e-9), t2l_seconds=t2l_s)
        by_steps[str(k)] = row
        samples[k] = {"ids": ids, "texts": texts, "t2l": z}
    last = samples[opts.steps[-1]]["texts"]
    examples = [
        {"target": t.texts[i], "generated": last[i], "floor": floor_txt[i]}
        for i in range(min(opts.examples, len(t.texts)))
    ]
    metrics = {
        "checkpoint": str(m.path),
        "step": m.step,
        "data": str(data.encoder_dir),
        "split": data.split,
        "split_source": data.source,
        "rows": len(t.texts),
        "seed": opts.seed,
        "device": device,
        "steps": list(opts.steps),
        "oracle_length": oracle_length(m),
        "pad_to_length": m.config.data.pad_to_length,
        "l2t_options": opts.l2t_options,
        "t2l_options": opts.t2l_options,
        "likelihood": lik,
        "floor": floor,
        "source_text": source,
        "by_steps": by_steps,
        "sts": sts,
        "examples": examples,
        "seconds": time.perf_counter() - t0,
    }
    return EvalResult(_jsonable(metrics), samples, t)


def _jsonable(x: Any) -> Any:
    """Plain JSON data: numpy scalars to Python, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x
