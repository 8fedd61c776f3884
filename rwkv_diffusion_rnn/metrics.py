"""Metric functions on arrays and strings: no model, no files, no torch.

Everything :mod:`rwkv_diffusion_rnn.evaluate` reports is computed here, so each number has one definition that the
tests check against hand-computed values::

    cos = cosine_rows(generated_latents, target_latents)        # [N]  round-trip cosine per row
    r1 = retrieval_top1(generated_latents, target_latents)       # share of rows whose own target is the nearest
    rho = spearman(predicted_cosines, human_scores)              # STS-B: rank correlation, ties averaged
    text_scores(hyps, refs)                                       # {"bleu", "chrf", "exact_match"} (sacrebleu)
    distinct_n(texts, 2)                                          # unique bigrams / all bigrams (Li et al. 2016)

Conventions: latents are ``[N, D]`` rows compared by cosine; a zero row (e.g. the encoding given to an empty
generation) has cosine 0 to everything. Corpus-level BLEU and chrF use sacrebleu's defaults (BLEU-4, ``13a``
tokenizer, ``exp`` smoothing; chrF: character 6-grams, beta 2), on a 0-100 scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "cosine_matrix",
    "cosine_rows",
    "distinct_n",
    "exact_match",
    "mean_and_halfwidth",
    "normalize_text",
    "rankdata",
    "retrieval_ranks",
    "retrieval_top1",
    "spearman",
    "text_scores",
]


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` ``[N, D]`` scaled to unit length in float64; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a [N, D] array, got shape {x.shape}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of row i of ``a`` with row i of ``b``: ``[N, D], [N, D] -> [N]`` float64 (0 where a row is zero)."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"cosine_rows needs equal shapes, got {np.shape(a)} and {np.shape(b)}")
    return np.einsum("nd,nd->n", _unit(a), _unit(b))


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All cosines between the rows of ``a`` ``[N, D]`` and of ``b`` ``[M, D]``: ``[N, M]`` float64."""
    return _unit(a) @ _unit(b).T


def retrieval_ranks(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Rank of each query's own key among all keys by cosine, ``[N]`` int (0 = its own key is the nearest).

    ``queries[i]`` belongs to ``keys[i]``. A tie counts AGAINST the query (rank = number of other keys at least as
    close), so a degenerate decoder that emits the same text for every latent ranks last, not first. Keys that are
    exactly equal to the own key (duplicate targets, e.g. one sentence twice in a split) are not counted: nothing
    can tell them apart.
    """
    queries, keys = np.asarray(queries), np.asarray(keys)
    if queries.shape != keys.shape:
        raise ValueError(f"queries and keys must share one shape [N, D], got {queries.shape} and {keys.shape}")
    sims = cosine_matrix(queries, keys)  # [N, N]
    own = np.diagonal(sims)[:, None]
    _, group = np.unique(keys, axis=0, return_inverse=True)  # equal key rows share a group
    group = np.asarray(group).reshape(-1)
    same_key = group[:, None] == group[None, :]  # includes the diagonal
    return ((sims >= own) & ~same_key).sum(axis=1)


def retrieval_top1(queries: np.ndarray, keys: np.ndarray) -> float:
    """Share of queries whose own key (same row) is strictly the nearest of all keys (see :func:`retrieval_ranks`)."""
    if len(queries) == 0:
        return float("nan")
    return float(np.mean(retrieval_ranks(queries, keys) == 0))


def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..N of ``x`` ``[N]`` with ties given their average rank (scipy's ``rankdata(method="average")``)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # runs of equal values: every member gets the mean of the run's 1-based positions
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]  # exclusive
    avg = (starts + ends + 1) / 2.0  # mean of (starts+1 .. ends)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks. NaN if either side is constant."""
    rx, ry = rankdata(x), rankdata(y)
    if rx.shape != ry.shape:
        raise ValueError(f"spearman needs equal lengths, got {rx.shape[0]} and {ry.shape[0]}")
    if len(rx) < 2:
        return float("nan")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams over all word n-grams of ``texts`` (whitespace words, case
    kept). 0 when there is no n-gram at all."""
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def normalize_text(text: str) -> str:
    """Whitespace-normalised text (strip, runs of whitespace -> one space): what exact match compares."""
    return " ".join(text.split())


def exact_match(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Share of rows where the hypothesis equals the reference after :func:`normalize_text` (case-sensitive)."""
    _same_length(hyps, refs)
    if not refs:
        return float("nan")
    return float(np.mean([normalize_text(h) == normalize_text(r) for h, r in zip(hyps, refs, strict=True)]))


def text_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, 0-100; one reference per row) and exact match (0-1)."""
    _same_length(hyps, refs)
    import sacrebleu  # heavy-ish import (regex tables); only when text is scored

    hyps, refs = list(hyps), list(refs)
    return {
        "bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score),
        "chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score),
        "exact_match": exact_match(hyps, refs),
    }


def mean_and_halfwidth(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval (1.96 standard errors); half-width 0 for one value."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return float("nan"), float("nan")
    half = 1.96 * v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0
    return float(v.mean()), float(half)


def _same_length(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references; expected one per reference")
