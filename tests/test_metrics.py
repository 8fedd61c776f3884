"""Metric functions against hand-computed values and scipy, on seeded random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from rwkv_diffusion_rnn import metrics as M


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(41)


def test_cosine_rows_and_matrix_match_the_definition(rng):
    a, b = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    want = [float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(M.cosine_rows(a, b), want, rtol=1e-12)
    mat = M.cosine_matrix(a, b[:3])
    assert mat.shape == (7, 3)
    np.testing.assert_allclose(mat[2, 1], a[2] @ b[1] / np.linalg.norm(a[2]) / np.linalg.norm(b[1]), rtol=1e-12)
    # scale invariance, and a zero row has cosine 0 (not NaN)
    np.testing.assert_allclose(M.cosine_rows(3.0 * a, 0.5 * b), want, rtol=1e-12)
    a[0] = 0
    assert M.cosine_rows(a, b)[0] == 0.0


def test_retrieval_top1_with_a_planted_permutation(rng):
    n, d = 40, 16
    keys = rng.standard_normal((n, d))
    right = rng.permutation(n)[:13]  # these rows get their own key back (plus a little noise)
    wrong = np.setdiff1d(np.arange(n), right)
    queries = keys + 0.01 * rng.standard_normal((n, d))
    queries[wrong] = keys[np.roll(wrong, 1)]  # a derangement of the other rows: each points at another key
    assert M.retrieval_top1(queries, keys) == pytest.approx(13 / n)
    ranks = M.retrieval_ranks(queries, keys)
    assert (ranks[right] == 0).all() and (ranks[wrong] > 0).all()
    # ranks by hand for one wrong row: keys at least as close as its own
    i = wrong[0]
    sims = M.cosine_matrix(queries[i : i + 1], keys)[0]
    assert ranks[i] == int((sims >= sims[i]).sum() - 1)


def test_retrieval_ties_count_against_and_duplicate_targets_do_not(rng):
    keys = rng.standard_normal((10, 8))
    constant = np.tile(rng.standard_normal(8), (10, 1))  # a decoder that says the same thing for every latent
    assert M.retrieval_top1(constant, keys) == pytest.approx(1 / 10)  # chance: only the key nearest to it wins
    assert M.retrieval_top1(np.zeros((10, 8)), keys) == 0.0  # empty outputs: every key ties, every row misses
    dup = keys.copy()
    dup[3] = dup[7]  # the same target twice: the two rows cannot be told apart, neither is penalised
    assert M.retrieval_top1(dup, dup) == 1.0


def test_spearman_matches_scipy_with_ties(rng):
    scipy_stats = pytest.importorskip("scipy.stats")
    x = rng.integers(0, 6, size=200).astype(float)  # many ties, like STS-B scores
    y = x + rng.standard_normal(200)
    assert M.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    np.testing.assert_allclose(M.rankdata(x), scipy_stats.rankdata(x))
    z = rng.standard_normal(50)
    assert M.spearman(z, -(z**3)) == pytest.approx(-1.0)
    assert np.isnan(M.spearman(np.ones(5), z[:5]))


def test_text_scores_identity_and_disjoint():
    refs = ["A dog runs on the beach .", "Two men play chess in a park", "a red car"]
    s = M.text_scores(refs, refs)
    assert s == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0), "exact_match": 1.0}
    s = M.text_scores(["zzz qqq", "xxx", "www"], refs)
    assert s["bleu"] < 1 and s["chrf"] < 10 and s["exact_match"] == 0.0
    # exact match ignores whitespace differences only
    assert M.exact_match(["  A dog  runs ", "a dog runs"], ["A dog runs", "A dog runs"]) == 0.5


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 7 total, {a, b, c} unique
    assert M.distinct_n(texts, 1) == pytest.approx(3 / 7)
    # bigrams: (a b)(b a)(a b) + (a b)(b c) -> 5 total, {ab, ba, bc} unique
    assert M.distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert M.distinct_n(["one"], 2) == 0.0
    with pytest.raises(ValueError):
        M.distinct_n(texts, 0)


def test_mean_and_halfwidth(rng):
    v = rng.standard_normal(30)
    mean, half = M.mean_and_halfwidth(v)
    assert mean == pytest.approx(v.mean())
    assert half == pytest.approx(1.96 * v.std(ddof=1) / np.sqrt(30))
    assert M.mean_and_halfwidth([2.0]) == (2.0, 0.0)
