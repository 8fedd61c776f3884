"""Samplers and loops (rwkv_diffusion_rnn/samplers.py, sampling.py) and ``diffrwkv sample``.

An ORACLE denoiser (same calls as RWKVDenoiser; it knows the targets) must be decoded exactly: L2T returns the target
text for every strategy, with and without blocks, and T2L the target latent within 1e-4. A tiny random RWKVDenoiser
(time conditioning and latent head made non-zero, so outputs depend on t) checks the exactness claims: the state
cache equals re-reading, the exact no-change cache equals calling the model every step, guidance 0 equals no
guidance, every loop reproduces itself and does not depend on the batch size.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rwkv_diffusion_rnn.continuous_diffusion import CosineVPSchedule, GaussianDiffusion, LatentNormalizer
from rwkv_diffusion_rnn.diffusion_process import LogLinearSchedule, MaskedDiffusion
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, DenoiserOutput, PrefixCache, RWKVDenoiser
from rwkv_diffusion_rnn.samplers import (
    GaussianScheduler,
    MaskedDiffusionScheduler,
    RowGenerators,
    guided_log_probs,
    gumbel_argmax,
    process_logits,
)
from rwkv_diffusion_rnn.sampling import L2T_PRESETS, rerank_l2t, sample_joint, sample_l2t, sample_t2l

V, D, PAD_TO = 300, 8, 10  # vocabulary (mask id = V), latent size, fixed row length of the "pad_to_length" models
STRATEGIES = ("ancestral", "confidence", "threshold")
#: the whole row at once, drawn at temperature 1, no guidance: what the tests of the sampling machinery exercise
#: (sample_l2t's defaults are the left-to-right argmax decoder; tested on their own below)
WHOLE_ROW = dict(temperature=1.0, guidance_scale=0.0, block_size=None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def loaded(den, prediction: str = "eps", pad_to_length: int | None = None, seed: int = 0) -> SimpleNamespace:
    """A LoadedModel-like object around ``den`` with a non-trivial latent normaliser."""
    rng = np.random.default_rng(seed)
    return SimpleNamespace(
        denoiser=den,
        text=MaskedDiffusion(LogLinearSchedule(), V),
        latent=GaussianDiffusion(CosineVPSchedule(), prediction),
        normalizer=LatentNormalizer(rng.normal(0, 0.3, D), rng.uniform(0.5, 2.0, D)),
        tokenizer=SimpleNamespace(eot_id=0),
        config=SimpleNamespace(data=SimpleNamespace(pad_to_length=pad_to_length, max_length=None)),
    )


# ------------------------------------------------------------------------------------------------ the oracle
class _StubState:
    def __init__(self, z: torch.Tensor, k: int) -> None:
        self.z, self.k = z, k

    def index_select(self, rows: torch.Tensor) -> _StubState:
        return _StubState(self.z[rows], self.k)


class OracleDenoiser:
    """RWKVDenoiser's calls, answered from the targets: a row is recognised by its latent (L2T: the clean
    condition) or its text (T2L). Text logits put all mass on the true token; the latent output is the exact eps /
    x0 / v of the target latent at ``(z_t, t_latent)``. ``text_hidden`` carries the target id (C = 1)."""

    def __init__(self, ids: torch.Tensor, z0: torch.Tensor, latent: GaussianDiffusion, texts: list[list[int]]):
        self.ids, self.z0, self.latent = ids, z0.double(), latent  # ids [N, L] (end-of-text padded), z0 standardised
        self.by_text = {tuple(t): i for i, t in enumerate(texts)}
        self.cfg = SimpleNamespace(context="causal", latent_dim=z0.shape[1])
        self.mask_id = V
        self.calls = 0

    def _rows(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cdist(z.double(), self.z0).argmin(1)

    def _latent(self, noisy_ids, attention_mask, z_t, t_latent) -> torch.Tensor:
        out = torch.zeros(z_t.shape, dtype=torch.float64)
        for b in range(len(z_t)):
            row = [int(i) for i, a in zip(noisy_ids[b], attention_mask[b], strict=True) if a]
            while row and row[-1] == 0:
                row.pop()
            k = self.by_text.get(tuple(row))
            if k is not None:  # the exact network output for this target (eps / x0 / v)
                t = t_latent[b : b + 1].double()
                a, s = self.latent.schedule.alpha_sigma(t)
                eps = (z_t[b : b + 1].double() - a * self.z0[k : k + 1]) / s
                out[b] = self.latent.target(self.z0[k : k + 1], eps, t)[0]
        return out.float()

    def __call__(self, noisy_ids, attention_mask, z_t, t_text, t_latent, text_select=None) -> DenoiserOutput:
        self.calls += 1
        hidden = self.ids[self._rows(z_t), : noisy_ids.shape[1], None].float()
        return DenoiserOutput(hidden, self._latent(noisy_ids, attention_mask, z_t, t_latent))

    def prefill(self, z_t, committed_ids, t_latent, cache=None) -> PrefixCache:
        read = cache.state.k if cache is not None else 0  # continuing: the state has read `read` tokens already
        return PrefixCache(_StubState(z_t, read + committed_ids.shape[1]), None)

    def forward_cached(self, cache, block_ids, z_t, t_block, t_latent) -> DenoiserOutput:
        self.calls += 1
        k, kb = cache.state.k, block_ids.shape[1]
        hidden = self.ids[self._rows(cache.state.z), k : k + kb, None].float()
        return DenoiserOutput(hidden, torch.zeros(len(z_t), D))

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        one_hot = torch.nn.functional.one_hot(hidden[..., 0].long(), V).float()
        return (one_hot - 1.0) * 1e4

    sampling_logits = text_logits


def oracle(prediction: str = "eps", pad_to_length: int | None = PAD_TO, n: int = 5, seed: int = 0):
    """``(m, raw_latents [n, D], texts)``; texts of 1..PAD_TO-1 tokens, none containing end-of-text."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, PAD_TO, (n,), generator=g).tolist()
    texts = [torch.randint(1, V, (k,), generator=g).tolist() for k in lengths]
    ids = torch.zeros(n, PAD_TO, dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, : len(t)] = torch.tensor(t)
    m = loaded(None, prediction, pad_to_length, seed)
    raw = torch.randn(n, D, generator=g) * 0.5
    m.denoiser = OracleDenoiser(ids, m.normalizer.normalize(raw), m.latent, texts)
    return m, raw.numpy(), texts


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("block_size,use_cache", [(None, True), (3, True), (4, False)])
def test_oracle_l2t_returns_the_target_text(strategy, block_size, use_cache):
    m, raw, texts = oracle()
    kw = dict(WHOLE_ROW, num_steps=6, strategy=strategy, block_size=block_size, use_cache=use_cache, batch_size=3)
    assert sample_l2t(m, raw, **kw) == texts  # pad_to_length: generate PAD_TO tokens, cut at the end-of-text
    m.config.data.pad_to_length = None
    assert sample_l2t(m, raw, length=[len(t) for t in texts], top_p=0.5, **{**kw, "guidance_scale": 2.0}) == texts


def test_default_decoder_is_the_faithful_preset_and_decodes_the_oracle():
    """sample_l2t's defaults are L2T_PRESETS["faithful"] (left to right, one step a token, argmax, guidance 0.5),
    and that decoder returns the target text of the oracle; "varied" differs from it in every setting it names."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(sample_l2t).parameters.items()}
    assert {k: defaults[k] for k in L2T_PRESETS["faithful"]} == L2T_PRESETS["faithful"]
    assert all(L2T_PRESETS["varied"][k] != v for k, v in L2T_PRESETS["faithful"].items() if k != "strategy")
    m, raw, texts = oracle()
    assert sample_l2t(m, raw, batch_size=3) == texts
    assert sample_l2t(m, raw, batch_size=3, **L2T_PRESETS["varied"]) == texts


@pytest.mark.parametrize("prediction,steps", [("x0", 1), ("eps", 32)])
def test_t2l_default_steps_follow_the_prediction(prediction, steps):
    """One DDIM step on an x0 model (the posterior mean), 32 otherwise: the default equals that many steps, and
    the oracle's latent comes back either way."""
    m, raw, texts = oracle(prediction)
    z = sample_t2l(m, texts, batch_size=2)
    assert np.array_equal(z, sample_t2l(m, texts, num_steps=steps, batch_size=2))
    calls = m.denoiser.calls
    sample_t2l(m, texts, batch_size=len(texts))
    assert m.denoiser.calls - calls == steps and np.abs(z - raw).max() < 1e-4


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("method,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)])
def test_oracle_t2l_returns_the_target_latent(prediction, method, eta):
    m, raw, texts = oracle(prediction)
    z = sample_t2l(m, texts, num_steps=8, method=method, eta=eta, batch_size=2)
    assert z.shape == raw.shape and np.abs(z - raw).max() < 1e-4


def test_oracle_rerank_picks_the_text_of_each_latent():
    """Candidates are the targets in shuffled orders: the oracle's T2L maps text j to latent j exactly, so the
    reranker must pick, for every row, the candidate holding that row's own text (cosine 1)."""
    m, raw, texts = oracle("x0", n=6, seed=21)
    rng = np.random.default_rng(22)
    n, k = len(texts), 4
    perms = [rng.permutation(n) for _ in range(k)]
    where = rng.integers(0, k, n)  # the candidate that holds row i's own text
    for i in range(n):
        j = int(np.nonzero(perms[where[i]] == i)[0][0])
        perms[where[i]][[i, j]] = perms[where[i]][[j, i]]
    cands = [[texts[p[i]] for i in range(n)] for p in perms]
    choice, cos = rerank_l2t(m, raw, cands, batch_size=4)
    for i in range(n):
        right = [c for c in range(k) if perms[c][i] == i]
        assert int(choice[i]) == min(right), (i, right, cos[:, i])
        assert abs(float(cos[choice[i], i]) - 1.0) < 1e-5
    with pytest.raises(DiffRwkvError, match="candidate lists"):
        rerank_l2t(m, raw, [cands[0], cands[1][:-1]])


# -------------------------------------------------------------------------------- a tiny real RWKVDenoiser
def tiny(context: str = "causal", seed: int = 0, pad_to_length: int | None = PAD_TO) -> SimpleNamespace:
    """A random 2-layer RWKV-7 denoiser whose output depends on t and on the latent (the zero-initialised time
    and latent output layers are filled)."""
    torch.manual_seed(seed)
    den = RWKVDenoiser(random_rwkv7(RWKV7Config.for_shape(2, 64, V), seed=seed), DenoiserConfig(D, context=context))
    with torch.no_grad():
        for p in (den.time.out.weight, den.time.out.bias, den.latent_head[2].weight):
            p.normal_(0.0, 0.1)
    return loaded(den.eval(), "v", pad_to_length, seed)


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(1).normal(0, 1, (5, D)).astype(np.float32)


class CountCalls:
    """Wraps a denoiser and counts the rows it evaluates (forward and forward_cached)."""

    def __init__(self, den) -> None:
        self.den, self.rows = den, 0

    def __getattr__(self, name):
        return getattr(self.den, name)

    def __call__(self, ids, *args, **kw):
        self.rows += ids.shape[0]
        return self.den(ids, *args, **kw)

    def forward_cached(self, cache, block_ids, *args):
        self.rows += block_ids.shape[0]
        return self.den.forward_cached(cache, block_ids, *args)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_cache_equals_rereading_the_prefix(model, latents, strategy):
    kw = dict(WHOLE_ROW, length=[7, 3, 9, 9, 5], num_steps=5, strategy=strategy, block_size=3, seed=4,
              guidance_scale=1.5)  # fmt: skip
    cached = sample_l2t(model, latents, use_cache=True, **kw)
    assert cached == sample_l2t(model, latents, use_cache=False, **kw)
    assert [len(x) for x in cached] != [0] * 5


def test_l2t_reproduces_and_ignores_batch_size(model, latents):
    for strategy in STRATEGIES:
        kw = dict(WHOLE_ROW, num_steps=6, strategy=strategy, temperature=0.8, top_p=0.9, seed=7)
        ref = sample_l2t(model, latents, batch_size=5, **kw)
        assert sample_l2t(model, latents, batch_size=5, **kw) == ref
        assert sample_l2t(model, latents, batch_size=2, **kw) == ref
        assert sample_l2t(model, latents, batch_size=5, **{**kw, "seed": 8}) != ref


def test_t2l_and_joint_reproduce_and_ignore_batch_size(model):
    texts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    for method in ("ddpm", "ddim"):
        a = sample_t2l(model, texts, num_steps=5, method=method, eta=0.5, seed=3, batch_size=4)
        assert np.array_equal(a, sample_t2l(model, texts, num_steps=5, method=method, eta=0.5, seed=3, batch_size=4))
        np.testing.assert_allclose(sample_t2l(model, texts, num_steps=5, method=method, eta=0.5, seed=3, batch_size=1),
                                   a, rtol=1e-4, atol=1e-4)  # fmt: skip
        assert not np.allclose(sample_t2l(model, texts, num_steps=5, method=method, eta=0.5, seed=4), a)
    ids, z = sample_joint(model, 3, num_steps=5, seed=2, batch_size=3)
    ids2, z2 = sample_joint(model, 3, num_steps=5, seed=2, batch_size=3)
    assert ids == ids2 and np.array_equal(z, z2) and z.shape == (3, D)
    ids1, z1 = sample_joint(model, 3, num_steps=5, seed=2, batch_size=1)
    assert ids1 == ids and np.allclose(z1, z, rtol=1e-4, atol=1e-4)
    assert all(0 not in r and V not in r and len(r) <= PAD_TO for r in ids)


def test_l2t_candidates_keep_the_one_the_model_embeds_closest(model, latents):
    """candidates=K: candidate 0 is the plain call's text, the rest drawn at the rerank temperature with seeds
    seed+c; each row keeps the candidate whose T2L embedding (one step) has the highest cosine to its latent."""
    kw = dict(WHOLE_ROW, num_steps=4, temperature=0.0, seed=5, batch_size=3)
    rec = {}
    got = sample_l2t(model, latents, candidates=3, rerank_temperature=1.5, rerank_record=rec, **kw)
    cands = [sample_l2t(model, latents, **kw)]
    cands += [sample_l2t(model, latents, **{**kw, "temperature": 1.5, "seed": 5 + c}) for c in (1, 2)]
    assert cands[1] != cands[0] and cands[2] != cands[1]
    emb = np.stack([sample_t2l(model, c, num_steps=1, seed=5, batch_size=3) for c in cands])  # [3, N, D]
    cos = (emb * latents).sum(-1) / (np.linalg.norm(emb, axis=-1) * np.linalg.norm(latents, axis=-1))
    assert got == [cands[int(c)][i] for i, c in enumerate(cos.argmax(0))]
    assert rec["candidates"] == cands and rec["choice"] == cos.argmax(0).tolist()
    np.testing.assert_allclose(rec["cosine"], cos, rtol=1e-5, atol=1e-6)
    assert sample_l2t(model, latents, candidates=1, **kw) == cands[0]
    for bad in (dict(candidates=0), dict(candidates=2, rerank_temperature=0.0),
                dict(candidates=2, rerank_temperature=float("nan"))):  # fmt: skip
        with pytest.raises(DiffRwkvError):
            sample_l2t(model, latents, **{**kw, **bad})
    # a bf16 tensor of latents is accepted (cast to fp32), a wrong width refused in one line
    assert sample_l2t(model, torch.as_tensor(latents).bfloat16(), candidates=2, **kw) is not None
    with pytest.raises(DiffRwkvError, match=r"latents must be \[N, 8\]"):
        rerank_l2t(model, latents[:, :3], [cands[0]])


def test_guidance_zero_is_the_unguided_path(model, latents):
    counted = SimpleNamespace(**{**vars(model), "denoiser": CountCalls(model.denoiser)})
    plain = sample_l2t(counted, latents, **WHOLE_ROW, num_steps=4, seed=1)
    assert counted.denoiser.rows <= 4 * len(latents)  # no unconditional pass
    torch.manual_seed(23)
    c, u = torch.randn(3, V), torch.randn(3, V)
    assert torch.equal(guided_log_probs(c, u, 0.0), torch.log_softmax(c, -1))
    # a denoiser blind to the condition (its input and its time): c = u, so any scale gives the unguided result
    blind = tiny(seed=0)
    den, half = blind.denoiser, blind.denoiser.cfg.time_embed_dim
    with torch.no_grad():
        for p in (den.prefix_proj, den.readout_proj):
            p.weight.zero_()
            p.bias.zero_()
        den.time.mlp[0].weight[:, half:] = 0  # t_latent
    kw = dict(WHOLE_ROW, num_steps=4, seed=1)
    assert sample_l2t(blind, latents, **{**kw, "guidance_scale": 3.0}) == sample_l2t(blind, latents, **kw)
    assert plain != sample_l2t(model, latents, **{**kw, "guidance_scale": 30.0})
    blind = tiny(seed=0)
    den = blind.denoiser
    with torch.no_grad():
        den.time.mlp[0].weight[:, :half] = 0  # t_text
        den.backbone.emb.weight[:] = den.backbone.emb.weight[5].clone()  # every token, <mask> included, alike
        den.mask_emb.copy_(den.backbone.emb.weight[5])
    texts = [[5, 6, 7], [8, 9]]
    kw = dict(num_steps=4, seed=1)
    assert np.array_equal(sample_t2l(blind, texts, guidance_scale=2.0, **kw), sample_t2l(blind, texts, **kw))


def test_no_change_cache_exact_equals_calling_every_step(model, latents):
    runs = {}
    for mode in ("off", "exact", "mdlm"):
        counted = SimpleNamespace(**{**vars(model), "denoiser": CountCalls(model.denoiser)})
        ids = sample_l2t(counted, latents, **WHOLE_ROW, num_steps=24, seed=5, no_change_cache=mode)
        runs[mode] = (ids, counted.denoiser.rows)
    assert runs["exact"][0] == runs["off"][0]
    assert runs["exact"][1] <= runs["mdlm"][1] < runs["off"][1]  # exact skips at least what MDLM's rule skips
    assert runs["off"][1] <= 24 * len(latents)


def test_non_causal_context_runs_uncached_blocks(latents):
    m = tiny("twice", seed=2)
    kw = dict(WHOLE_ROW, num_steps=3, block_size=4, seed=1)
    assert sample_l2t(m, latents, use_cache=True, **kw) == sample_l2t(m, latents, use_cache=False, **kw)


# ------------------------------------------------------------------------------------------- scheduler units
def test_ancestral_unmasking_fraction_matches_the_schedule():
    sched = MaskedDiffusionScheduler(LogLinearSchedule(), V)
    sched.set_timesteps(10)
    t, s = float(sched.timesteps[4]), float(sched.timesteps[5])  # 0.6 -> 0.5
    torch.manual_seed(24)
    sample = torch.full((2000, 16), V)
    sample[:, :4] = 7  # unmasked tokens never change
    out = sched.step(torch.randn(2000, 16, V), t, sample, torch.Generator().manual_seed(0))
    a_t, a_s = 1 - (1 - 1e-3) * t, 1 - (1 - 1e-3) * s
    p = (a_s - a_t) / (1 - a_t)
    frac = out.unmasked[:, 4:].double().mean().item()
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / (2000 * 12)), (frac, p)
    assert torch.equal(out.prev_sample[:, :4], sample[:, :4]) and not out.unmasked[:, :4].any()
    assert ((out.prev_sample == V) | out.unmasked | (sample != V)).all()
    last = sched.step(torch.randn(2000, 16, V), float(sched.timesteps[-1]), sample, torch.Generator().manual_seed(1))
    assert not (last.prev_sample == V).any()  # s = 0: everything unmasks


def test_draws_follow_the_model_distribution_temperature_and_top_p():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().expand(40000, 4)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(gumbel_argmax(process_logits(logits), torch.tensor([40000]), g), minlength=4) / 40000
    assert torch.allclose(freq, probs, atol=0.01), freq
    nucleus = torch.bincount(gumbel_argmax(process_logits(logits, top_p=0.7), torch.tensor([40000]), g), minlength=4)
    assert nucleus[2:].sum() == 0 and abs(nucleus[0] / 40000 - 2 / 3) < 0.01  # {0.5, 0.25} renormalised
    for kw in ({"top_p": 1e-6}, {"temperature": 1e-3}):
        assert (gumbel_argmax(process_logits(logits[:2000], **kw), torch.tensor([2000]), g) == 0).all()
    hot = torch.bincount(gumbel_argmax(process_logits(logits, temperature=50.0), torch.tensor([40000]), g))
    assert (hot / 40000 - 0.25).abs().max() < 0.02  # high temperature: nearly uniform
    sched = MaskedDiffusionScheduler(LogLinearSchedule(), 4, temperature=0.0)  # greedy
    sched.set_timesteps(1)
    assert (sched.step(logits[:50, None], 1.0, torch.full((50, 1), 4)).prev_sample == 0).all()


def test_gumbel_noise_is_float64(monkeypatch):
    seen = []
    real_rand = torch.rand

    def spy(*args, **kw):
        seen.append(kw.get("dtype"))
        return real_rand(*args, **kw)

    torch.manual_seed(25)
    logp = torch.log_softmax(torch.randn(6, 50), -1)
    expected_u = torch.rand(6, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = (logp.double() - torch.log(-torch.log(expected_u))).argmax(-1)
    monkeypatch.setattr(torch, "rand", spy)
    got = gumbel_argmax(logp, torch.tensor([6]), torch.Generator().manual_seed(3))
    assert seen == [torch.float64] and torch.equal(got, expected)
    rows = RowGenerators(0, [0, 1], stream=0)
    gumbel_argmax(logp[:3], torch.tensor([1, 2]), rows)
    assert seen[1:] == [torch.float64, torch.float64]


def test_confidence_and_threshold_unmask_the_scheduled_counts():
    torch.manual_seed(26)
    sample = torch.full((64, 12), V)
    logits = torch.randn(64, 12, V) * 3
    conf = MaskedDiffusionScheduler(LogLinearSchedule(), V, "confidence")
    conf.set_timesteps(4)
    out = conf.step(logits, 1.0, sample, torch.Generator().manual_seed(0))
    assert (out.unmasked.sum(1) == 3).all()  # round(12 * 0.25)
    chosen = torch.where(out.unmasked, out.pred_original_sample, 0)
    assert (chosen[out.unmasked] < V).all()
    thr = MaskedDiffusionScheduler(LogLinearSchedule(), V, "threshold", threshold=0.99)
    thr.set_timesteps(4)
    out = thr.step(logits, 1.0, sample, torch.Generator().manual_seed(0))
    assert (out.unmasked.sum(1) >= 1).all() and (out.unmasked.sum(1) < 12).any()
    assert not (thr.step(logits, 0.25, sample, torch.Generator().manual_seed(1)).prev_sample == V).any()


def test_ddim_eta1_equals_ddpm_and_eta0_is_deterministic():
    diff = GaussianDiffusion(CosineVPSchedule(), "v")
    torch.manual_seed(27)
    z = torch.randn(4, D, dtype=torch.float64)
    out = torch.randn(4, D)
    ddpm, ddim1 = GaussianScheduler(diff, "ddpm"), GaussianScheduler(diff, "ddim", eta=1.0)
    for s in (ddpm, ddim1):
        s.set_timesteps(5)
    a = ddpm.step(out, 0.6, z, torch.Generator().manual_seed(1)).prev_sample
    b = ddim1.step(out, 0.6, z, torch.Generator().manual_seed(1)).prev_sample
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ddim0 = GaussianScheduler(diff, "ddim")
    ddim0.set_timesteps(5)
    assert torch.equal(ddim0.step(out, 0.6, z, None).prev_sample, ddim0.step(out, 0.6, z, None).prev_sample)
    x0 = ddim0.step(out, 0.2, z).pred_original_sample
    torch.testing.assert_close(ddim0.step(out, 0.2, z).prev_sample, x0)  # the last step returns x0
    clipped = GaussianScheduler(GaussianDiffusion(CosineVPSchedule(), "eps"), "ddim", clip_x0=0.5)
    clipped.set_timesteps(5)
    step = clipped.step(out * 3, 1.0, z)
    assert step.pred_original_sample.abs().max() <= 0.5
    wide = GaussianScheduler(GaussianDiffusion(CosineVPSchedule(), "eps"), "ddim", clip_x0=1e9)
    wide.set_timesteps(5)
    plain = GaussianScheduler(GaussianDiffusion(CosineVPSchedule(), "eps"), "ddim")
    plain.set_timesteps(5)
    torch.testing.assert_close(wide.step(out, 0.6, z).prev_sample, plain.step(out, 0.6, z).prev_sample)


# ------------------------------------------------------------------------------------------ diffrwkv sample
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from rwkv_diffusion_rnn.config import TrainConfig
    from rwkv_diffusion_rnn.improved_trainer import Trainer
    from rwkv_diffusion_rnn.pretrained_rwkv import save_pth
    from tests.data_helpers import make_dataset

    root = tmp_path_factory.mktemp("sample")
    paths = make_dataset(root / "ds", n=8, seed=3)
    save_pth(random_rwkv7(RWKV7Config.for_shape(1, 64), seed=5).state_dict(), root / "bb.pth")
    cfg = TrainConfig()
    cfg.model.rwkv_name = str(root / "bb.pth")
    cfg.data.json_path, cfg.data.token_dir = str(paths["json"]), str(paths["token_dir"])
    cfg.data.latent_dir, cfg.data.validation_fraction, cfg.data.pad_to_length = str(paths["latent_dir"]), 0.0, 12
    t = cfg.training
    t.dtype, t.train_batch_size, t.max_steps, t.warmup_steps = "fp32", 4, 2, 1
    cfg.logging.save_dir, cfg.logging.progress, cfg.logging.tensorboard = str(root / "run"), False, False
    trainer = Trainer(cfg)
    trainer.train_step()
    return root, paths, trainer.save()


def _sample(capsys, *args: str) -> tuple[int, str, str]:
    from rwkv_diffusion_rnn.cli import main as cli_main

    rc = cli_main(["sample", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_sample_command_end_to_end(checkpoint, tmp_path, capsys):
    root, paths, ckpt = checkpoint
    np.save(tmp_path / "z.npy", paths["latents"][:3])
    common = ["--checkpoint", str(root / "run"), "--steps", "3", "--no-progress", "--batch-size", "2"]
    out = tmp_path / "l2t.jsonl"
    rc, _, err = _sample(capsys, *common, "--latents", str(tmp_path / "z.npy"), "--out", str(out))
    assert rc == 0, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["settings"]["mode"] == "l2t" and rows[0]["settings"]["num_steps"] == 3
    for r in rows:
        assert "<mask>" not in r["text"] and "<|endoftext|>" not in r["text"]
        assert 0 not in r["token_ids"] and 65536 not in r["token_ids"] and len(r["token_ids"]) <= 12
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic: no temporary left

    rc, text, err = _sample(capsys, *common, "--data", str(paths["data"]), "--limit", "2", "--block-size", "5",
                            "--strategy", "confidence")  # fmt: skip
    rows = [json.loads(x) for x in text.splitlines()]
    assert rc == 0 and len(rows) == 2 and rows[1]["input"]["reference"] and rows[1]["settings"]["block_size"] == 5

    rc, text, err = _sample(capsys, *common, "--data", str(paths["data"]), "--limit", "2", "--candidates", "3",
                            "--temperature", "0")  # fmt: skip
    rows = [json.loads(x) for x in text.splitlines()]
    assert rc == 0 and len(rows) == 2 and rows[0]["settings"]["candidates"] == 3, err

    rc, text, err = _sample(capsys, *common, "--text", "A dog runs.", "--text", "Two men talk.", "--guidance", "1")
    rows = [json.loads(x) for x in text.splitlines()]
    assert rc == 0 and [r["input"]["text"] for r in rows] == ["A dog runs.", "Two men talk."]
    assert all(len(r["latent"]) == 32 and all(math.isfinite(v) for v in r["latent"]) for r in rows)

    rc, text, err = _sample(capsys, "--checkpoint", str(ckpt), "--unconditional", "2", "--steps", "2",
                            "--no-progress", "--method", "ddpm")  # fmt: skip
    rows = [json.loads(x) for x in text.splitlines()]
    assert rc == 0 and len(rows) == 2 and len(rows[0]["latent"]) == 32 and isinstance(rows[0]["text"], str)


def test_sample_round_trip_needs_no_glue(checkpoint, tmp_path, capsys):
    """text -> latent JSONL feeds --latents as it is (same rows as the .npy of the same latents); --out .npy writes
    the latents; latent -> text JSONL feeds --text-file; --preset varied is its flags; --block-size 0 is no blocks;
    with --encoder, text -> latent prints and records the cosine to the data's own encoder."""
    import tests.data_helpers  # noqa: F401  (registers the test-hash encoder)
    from rwkv_diffusion_rnn.corpus import generate

    root, paths, ckpt = checkpoint
    common = ["--checkpoint", str(ckpt), "--no-progress", "--batch-size", "2"]
    z_jsonl, z_npy = tmp_path / "z.jsonl", tmp_path / "z.npy"
    texts = ["A dog runs.", "Two men talk on a bench."]
    src = sum((["--text", t] for t in texts), [])
    assert _sample(capsys, *common, *src, "--out", str(z_jsonl))[0] == 0
    assert _sample(capsys, *common, *src, "--out", str(z_npy))[0] == 0
    rows = [json.loads(x) for x in z_jsonl.read_text().splitlines()]
    assert np.array_equal(np.load(z_npy), np.array([r["latent"] for r in rows], dtype=np.float32))
    assert rows[0]["settings"]["num_steps"] == 1  # the tiny model predicts x0 (the default): one DDIM step

    rc, from_jsonl, err = _sample(capsys, *common, "--latents", str(z_jsonl))
    assert rc == 0, err
    rc, from_npy, err = _sample(capsys, *common, "--latents", str(z_npy))
    assert rc == 0 and [json.loads(x)["text"] for x in from_jsonl.splitlines()] == [
        json.loads(x)["text"] for x in from_npy.splitlines()
    ]
    settings = json.loads(from_npy.splitlines()[0])["settings"]
    assert settings["preset"] == "faithful" and settings["block_size"] == 1 and settings["guidance_scale"] == 0.5

    l2t = tmp_path / "l2t.jsonl"
    assert _sample(capsys, *common, "--latents", str(z_npy), "--out", str(l2t))[0] == 0
    rc, back, err = _sample(capsys, *common, "--text-file", str(l2t))
    assert rc == 0 and [json.loads(x)["input"]["text"] for x in back.splitlines()] == [
        json.loads(x)["text"] for x in l2t.read_text().splitlines()
    ]

    def decoded(*flags: str) -> tuple[list[str], dict]:
        rc, out, err = _sample(capsys, *common, "--latents", str(z_npy), "--seed", "3", *flags)
        assert rc == 0, err
        recs = [json.loads(x) for x in out.splitlines()]
        return [r["token_ids"] for r in recs], recs[0]["settings"]

    faithful, st = decoded()  # the default: the flags the README recommended before it was the default
    assert faithful == decoded("--block-size", "1", "--steps", "1", "--temperature", "0", "--guidance", "0.5")[0]
    assert st["preset"] == "faithful" and st["num_steps"] == 1
    varied, st = decoded("--preset", "varied")
    assert st["num_steps"] == 32 and st["temperature"] == 1.0 and st["block_size"] is None
    assert decoded("--steps", "32", "--temperature", "1", "--guidance", "0", "--block-size", "0")[0] == varied

    enc_dir = tmp_path / "enc"
    (tmp_path / "c.txt").write_text("\n".join(generate(40, seed=1)) + "\n")
    from rwkv_diffusion_rnn import cli

    assert cli.main(["prepare-latents", "--input", str(tmp_path / "c.txt"), "--output_dir", str(enc_dir),
                     "--encoder", "test-hash"]) == 0  # fmt: skip
    capsys.readouterr()
    rc, out, err = _sample(capsys, *common, *src, "--encoder", str(enc_dir))
    assert rc == 0 and "cosine to the data's encoder" in err, err
    assert all(-1 <= json.loads(x)["encoder_cosine"] <= 1 for x in out.splitlines())
    rc, out, err = _sample(capsys, *common, *src)  # the checkpoint's data has no encoder: said, not an error
    assert rc == 0 and "no data encoder found" in err and "encoder_cosine" not in out


def test_sample_inputs_refused_in_one_line(checkpoint, tmp_path, capsys):
    root, paths, ckpt = checkpoint
    bad = {
        "a.jsonl": ('{"latent": [1, 2]}\n{"text": "no latent"}\n', "line 2: no 'latent' field"),
        "b.jsonl": ('{"latent": [1, 2]}\n{"latent": [1, "x"]}\n', "line 2: 'latent' is not a list of 2 numbers"),
        "c.jsonl": ("not json\n", "line 1: not JSON"),
    }
    for name, (body, needle) in bad.items():
        (tmp_path / name).write_text(body)
        rc, _, err = _sample(capsys, "--checkpoint", str(ckpt), "--latents", str(tmp_path / name), "--no-progress")
        assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    rc, _, err = _sample(capsys, "--checkpoint", str(ckpt), "--latents", "z.npy", "--out", str(tmp_path / "o.npy"))
    assert rc == 2 and "writes text" in err


def test_sample_command_errors_are_one_line(tmp_path, capsys):
    rc, _, err = _sample(capsys, "--checkpoint", str(tmp_path / "nope"), "--unconditional", "1")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:") and "nope" in err
    for args, what in ((["--unconditional", "1", "--candidates", "2"], "latent -> text"),
                       (["--text", "a", "--rerank-temperature", "1"], "--candidates"),
                       (["--latents", "z.npy", "--candidates", "2", "--rerank-temperature", "0"],
                        "--rerank-temperature")):  # fmt: skip
        rc, _, err = _sample(capsys, "--checkpoint", str(tmp_path), *args)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and what in err, err


def test_cli_writes_world_token_ids_for_a_compact_vocabulary(tmp_path):
    """`diffrwkv sample` reports the tokenizer's ids, also when the model uses a compact vocabulary."""
    import json

    from rwkv_diffusion_rnn.config import TrainConfig
    from rwkv_diffusion_rnn.improved_trainer import Trainer
    from rwkv_diffusion_rnn.sample_cli import main
    from rwkv_diffusion_rnn.tokenizer import load_tokenizer
    from tests.data_helpers import make_dataset

    p = make_dataset(tmp_path / "ds", n=16)
    cfg = TrainConfig()
    cfg.model.rwkv_name, cfg.model.n_layer, cfg.model.n_embd = "scratch", 1, 64
    cfg.model.freeze_backbone, cfg.model.vocab = False, "data"
    cfg.data.json_path, cfg.data.token_dir, cfg.data.latent_dir = (
        str(p["json"]),
        str(p["token_dir"]),
        str(p["latent_dir"]),
    )
    cfg.data.pad_to_length = 24
    cfg.training.dtype, cfg.training.train_batch_size, cfg.training.max_steps = "fp32", 8, 1
    cfg.logging.save_dir, cfg.logging.progress, cfg.logging.tensorboard = str(tmp_path / "run"), False, False
    trainer = Trainer(cfg)
    trainer.train_step()
    ckpt = trainer.save()
    out = tmp_path / "s.jsonl"
    assert (
        main(["--checkpoint", str(ckpt), "--unconditional", "3", "--steps", "4", "--out", str(out), "--no-progress"])
        == 0
    )
    world = load_tokenizer("rwkv-world")
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        assert world.decode(rec["token_ids"], skip_special_tokens=True) == rec["text"]
