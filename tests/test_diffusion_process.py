"""MDLM text diffusion: schedule, time sampling, corruption, SUBS and the NELBO loss (CPU, fresh random inputs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rwkv_diffusion_rnn.diffusion_process import (
    TEXT_SCHEDULES,
    LogLinearSchedule,
    MaskedDiffusion,
    build_text_schedule,
    sample_uniform_t,
)
from rwkv_diffusion_rnn.errors import DiffRwkvError

VOCAB = 50  # small vocabulary: ids 0..49, <mask> = 50


def _batch(gen: torch.Generator, b: int = 6, t: int = 24, vocab: int = VOCAB):
    """Random ids and a right-padded attention mask with at least one real token per row (pad id 0)."""
    ids = torch.randint(1, vocab, (b, t), generator=gen)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[0] = t  # one unpadded row
    attn = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return ids * attn, attn


def _process(weighting: str = "elbo", eps: float = 1e-3) -> MaskedDiffusion:
    return MaskedDiffusion(LogLinearSchedule(eps=eps), mask_id=VOCAB, weighting=weighting)


# ---------------------------------------------------------------------------------------------------- schedule
def test_loglinear_schedule_values_and_derivative():
    sched = LogLinearSchedule(eps=0.01)
    t = torch.rand(64, dtype=torch.float64) * 0.999 + 0.001
    torch.testing.assert_close(sched.alpha(t), 1 - 0.99 * t)
    torch.testing.assert_close(sched.mask_prob(t), 1 - sched.alpha(t))
    tg = t.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sched.alpha(tg).sum(), tg)
    torch.testing.assert_close(sched.dalpha_dt(t).double(), grad)
    # ELBO weight -alpha'/(1 - alpha) is 1/t for the log-linear schedule, whatever eps.
    torch.testing.assert_close(sched.elbo_weight(t).double(), 1 / t, rtol=1e-6, atol=0)
    # Ends: alpha(0) = 1, alpha(1) = eps; t = 0 gives a finite weight.
    ends = torch.tensor([0.0, 1.0])
    assert sched.alpha(ends).tolist() == pytest.approx([1.0, 0.01])
    assert torch.isfinite(sched.elbo_weight(ends)).all()


def test_schedule_registry_and_bad_names():
    assert isinstance(build_text_schedule("loglinear", eps=0.0), TEXT_SCHEDULES["loglinear"])
    with pytest.raises(DiffRwkvError, match="unknown text noise schedule"):
        build_text_schedule("cosine")
    with pytest.raises(DiffRwkvError, match="weighting"):
        MaskedDiffusion(LogLinearSchedule(), mask_id=VOCAB, weighting="snr")


# -------------------------------------------------------------------------------------------------- sampling t
@pytest.mark.parametrize("b", [1, 7, 64])
def test_antithetic_t_covers_unit_interval_evenly(b):
    gen = torch.Generator().manual_seed(b)
    t_min = 1e-3
    for _ in range(20):
        t = sample_uniform_t(b, "cpu", gen, t_min=t_min)
        assert t.shape == (b,) and t.dtype == torch.float32
        assert (t > t_min).all() and (t <= 1).all()
        # One sample per stratum: the sorted samples are spaced exactly (1 - t_min) / B apart.
        gaps = t.sort().values.diff()
        torch.testing.assert_close(gaps, torch.full_like(gaps, (1 - t_min) / b), atol=1e-5, rtol=0)
    # The strata are shuffled over rows: unshuffled, t would fall along the rows (B - 2 or B - 1 descents).
    if b == 64:
        descents = [(sample_uniform_t(b, "cpu", gen).diff() < 0).sum().item() for _ in range(5)]
        assert all(10 < d < 53 for d in descents), descents


def test_t_sampling_mean_and_plain_mode():
    gen = torch.Generator().manual_seed(0)
    t = torch.cat([_process().sample_t(16, "cpu", gen) for _ in range(500)])
    assert abs(t.mean().item() - (1 + 1e-3) / 2) < 0.01
    plain = MaskedDiffusion(LogLinearSchedule(), VOCAB, antithetic=False).sample_t(10_000, "cpu", gen)
    assert (plain > 1e-3).all() and (plain <= 1).all()
    assert abs(plain.mean().item() - 0.5) < 0.015  # 5 sigma of U(0, 1)'s mean over 10k draws


# -------------------------------------------------------------------------------------------------- corruption
def test_mask_fraction_matches_mask_prob():
    gen = torch.Generator().manual_seed(1)
    proc = _process()
    ts = torch.tensor([0.02, 0.3, 0.5, 0.77, 1.0])
    n = 40_000
    ids = torch.randint(0, VOCAB, (len(ts), n), generator=gen)
    noisy, masked = proc.corrupt(ids, torch.ones_like(ids), ts, gen)
    p = proc.schedule.mask_prob(ts)
    frac = masked.float().mean(dim=1)
    assert (frac - p).abs().max() < 5 * (p * (1 - p) / n).sqrt().max() + 1e-6
    assert torch.equal(noisy == VOCAB, masked)
    assert torch.equal(noisy[~masked], ids[~masked])


def test_padding_never_masked_and_t0_rows_stay_clean():
    gen = torch.Generator().manual_seed(2)
    ids, attn = _batch(gen, b=8, t=40)
    t = torch.rand(8, generator=gen)
    t[1] = 0.0
    t[2] = 1.0
    proc = _process(eps=0.0)
    for _ in range(50):
        noisy, masked = proc.corrupt(ids, attn, t, gen)
        assert not masked[attn == 0].any()
        assert torch.equal(noisy[attn == 0], ids[attn == 0])
        assert not masked[1].any()
        assert masked[2][attn[2] == 1].all()  # eps = 0: t = 1 masks every real token


def test_corrupt_rejects_bad_shapes():
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(DiffRwkvError, match="t must be"):
        _process().corrupt(ids, torch.ones_like(ids), torch.zeros(3))


# -------------------------------------------------------------------------------------------------------- SUBS
@pytest.mark.parametrize("width", [VOCAB + 1, VOCAB])
def test_subs_log_probs(width):
    gen = torch.Generator().manual_seed(3)
    ids, attn = _batch(gen)
    proc = _process()
    noisy, masked = proc.corrupt(ids, attn, torch.full((ids.shape[0],), 0.5), gen)
    logits = torch.randn(*ids.shape, width, generator=gen) * 3
    logits_before = logits.clone()
    lp = proc.subs_log_probs(logits, noisy)
    assert torch.equal(logits, logits_before)  # caller's logits untouched
    assert lp.shape == logits.shape and lp.dtype == torch.float32
    if width == VOCAB + 1:
        assert torch.isneginf(lp[..., VOCAB]).all()  # the mask class is never predicted
    # Carry-over: unmasked positions (incl. padding) put probability 1 on their input token.
    carried = noisy != VOCAB
    on_token = lp.gather(-1, noisy.clamp(max=width - 1)[..., None])[..., 0]
    assert (on_token[carried] == 0).all()
    assert (torch.isneginf(lp[carried]).sum(-1) == width - 1).all()
    # Masked positions: a normalised distribution over the real vocabulary, from the logits.
    ref = torch.log_softmax(logits[..., :VOCAB], dim=-1)
    torch.testing.assert_close(lp[masked][:, :VOCAB], ref[masked])
    torch.testing.assert_close(lp[masked].logsumexp(-1), torch.zeros(int(masked.sum())), atol=1e-5, rtol=0)


def test_logits_width_checked():
    proc = _process()
    noisy = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(DiffRwkvError, match="classes"):
        proc.subs_log_probs(torch.zeros(2, 3, VOCAB + 2), noisy)


# -------------------------------------------------------------------------------------------------------- loss
def _reference_loss(proc, logits, ids, noisy, attn, t):
    """The NELBO written directly from the dense SUBS log-probs (the plain reference of the gathered path)."""
    lp = proc.subs_log_probs(logits, noisy)
    nll = -lp.gather(-1, ids[..., None])[..., 0]  # [B, T]; 0 at carried-over positions
    in_loss = (noisy == VOCAB) & attn.bool()
    nll = torch.where(in_loss, nll, torch.zeros_like(nll))
    return (nll * (1 / t)[:, None]).sum() / attn.sum()


@pytest.mark.parametrize("width", [VOCAB + 1, VOCAB])
def test_loss_matches_dense_reference_and_gradients(width):
    gen = torch.Generator().manual_seed(4)
    ids, attn = _batch(gen)
    proc = _process()
    t = proc.sample_t(ids.shape[0], "cpu", gen)
    noisy, _ = proc.corrupt(ids, attn, t, gen)
    logits = (torch.randn(*ids.shape, width, generator=gen) * 2).requires_grad_(True)
    loss, stats = proc.loss(logits, ids, noisy, attn, t)
    ref = _reference_loss(proc, logits, ids, noisy, attn, t)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
    assert stats["loss"] == pytest.approx(loss.item()) and stats["nelbo"] == pytest.approx(loss.item())
    assert stats["n_tokens"] == attn.sum().item()
    assert stats["n_masked"] == ((noisy == VOCAB) & attn.bool()).sum().item()
    assert all(isinstance(v, float) for v in stats.values())


def test_padding_excluded_from_loss():
    gen = torch.Generator().manual_seed(5)
    ids, attn = _batch(gen)
    proc = _process()
    t = proc.sample_t(ids.shape[0], "cpu", gen)
    noisy, _ = proc.corrupt(ids, attn, t, gen)
    logits = torch.randn(*ids.shape, VOCAB + 1, generator=gen)
    loss, _ = proc.loss(logits, ids, noisy, attn, t)
    pad = attn == 0
    assert pad.any()
    logits2 = logits.clone()
    logits2[pad] = torch.randn(int(pad.sum()), VOCAB + 1, generator=gen) * 10
    ids2 = torch.where(pad, torch.randint(0, VOCAB, ids.shape, generator=gen), ids)
    noisy2 = torch.where(pad, torch.full_like(noisy, VOCAB), noisy)  # even a mask id planted at a pad position
    loss2, _ = proc.loss(logits2, ids2, noisy2, attn, t)
    assert torch.equal(loss, loss2)


def test_padded_and_unpadded_row_give_the_same_loss():
    gen = torch.Generator().manual_seed(6)
    proc = _process()
    ids = torch.randint(1, VOCAB, (1, 16), generator=gen)
    t = torch.tensor([0.6])
    noisy, _ = proc.corrupt(ids, torch.ones_like(ids), t, gen)
    logits = torch.randn(1, 16, VOCAB + 1, generator=gen)
    loss, _ = proc.loss(logits, ids, noisy, torch.ones_like(ids), t)
    pad = 7
    ids_p = F.pad(ids, (0, pad))
    noisy_p = F.pad(noisy, (0, pad))
    attn_p = F.pad(torch.ones_like(ids), (0, pad))
    logits_p = torch.cat([logits, torch.randn(1, pad, VOCAB + 1, generator=gen)], dim=1)
    loss_p, _ = proc.loss(logits_p, ids_p, noisy_p, attn_p, t)
    torch.testing.assert_close(loss_p, loss, rtol=0, atol=0)


def test_uniform_weighting_is_plain_masked_cross_entropy():
    gen = torch.Generator().manual_seed(7)
    ids, attn = _batch(gen)
    proc = _process(weighting="uniform")
    t = proc.sample_t(ids.shape[0], "cpu", gen)
    noisy, masked = proc.corrupt(ids, attn, t, gen)
    logits = torch.randn(*ids.shape, VOCAB + 1, generator=gen)
    loss, stats = proc.loss(logits, ids, noisy, attn, t)
    ref = F.cross_entropy(logits[masked][:, :VOCAB], ids[masked])
    torch.testing.assert_close(loss, ref)
    assert stats["masked_ce"] == pytest.approx(ref.item(), rel=1e-6)
    acc = (logits[masked][:, :VOCAB].argmax(-1) == ids[masked]).float().mean().item()
    assert stats["masked_acc"] == pytest.approx(acc)
    # reduction="sum" hands back the numerator of the mean.
    loss_sum, _ = proc.loss(logits, ids, noisy, attn, t, reduction="sum")
    torch.testing.assert_close(loss_sum / masked.sum(), loss)


def test_bf16_logits_use_float32_softmax():
    gen = torch.Generator().manual_seed(8)
    ids, attn = _batch(gen)
    proc = _process()
    t = proc.sample_t(ids.shape[0], "cpu", gen)
    noisy, _ = proc.corrupt(ids, attn, t, gen)
    logits = (torch.randn(*ids.shape, VOCAB + 1, generator=gen) * 4).bfloat16()
    loss, _ = proc.loss(logits, ids, noisy, attn, t)
    assert loss.dtype == torch.float32
    loss_ref, _ = proc.loss(logits.float(), ids, noisy, attn, t)  # bf16 -> fp32 is exact
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)


def test_clean_rows_and_no_masks_give_zero_loss():
    gen = torch.Generator().manual_seed(9)
    ids, attn = _batch(gen)
    proc = _process()
    t = torch.zeros(ids.shape[0])
    noisy, masked = proc.corrupt(ids, attn, t, gen)
    assert not masked.any()
    logits = torch.randn(*ids.shape, VOCAB + 1, generator=gen, requires_grad=True)
    for weighting in ("elbo", "uniform"):
        loss, stats = _process(weighting).loss(logits, ids, noisy, attn, t)
        assert loss.item() == 0.0 and math.isfinite(stats["nelbo"]) and stats["n_masked"] == 0
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("t_fixed", [0.05, 0.4, 0.95, None])
def test_elbo_weighting_analytic_identity(t_fixed):
    """For a context-free model p(x), E_q[w(t) sum_masked -log p(x_i)] = (1 - eps) * sum_i -log p(x_i) at EVERY t.

    Because -alpha'(t)/(1 - alpha(t)) * P(masked) = -alpha'(t) = 1 - eps, a Monte-Carlo average of the loss at one
    t must equal (1 - eps) * the model's mean NLL per token, and so must its average over sampled t. A wrong
    weighting (e.g. uniform, or 1/t^2) gives a t-dependent answer and fails.
    """
    gen = torch.Generator().manual_seed(10)
    eps = 0.1
    proc = _process(eps=eps)
    ids, attn = _batch(gen, b=32, t=32)
    class_logits = torch.randn(VOCAB + 1, generator=gen) * 2  # same prediction at every position
    logits = class_logits.expand(*ids.shape, VOCAB + 1)
    nll = -torch.log_softmax(class_logits[:VOCAB], -1)[ids]  # [B, T]
    expected = (1 - eps) * (nll * attn).sum() / attn.sum()
    losses = []
    for _ in range(200):
        t = proc.sample_t(32, "cpu", gen) if t_fixed is None else torch.full((32,), t_fixed)
        noisy, _ = proc.corrupt(ids, attn, t, gen)
        losses.append(proc.loss(logits, ids, noisy, attn, t)[0])
    losses = torch.stack(losses)
    se = losses.std() / math.sqrt(len(losses))
    assert abs(losses.mean() - expected) < 5 * se + 1e-3, (losses.mean().item(), expected.item(), se.item())


def test_elbo_bits_per_token():
    gen = torch.Generator().manual_seed(11)
    ids, attn = _batch(gen)
    proc = _process(weighting="uniform")  # bits/token is ELBO-weighted whatever the training weighting
    t = proc.sample_t(ids.shape[0], "cpu", gen)
    noisy, _ = proc.corrupt(ids, attn, t, gen)
    logits = torch.randn(*ids.shape, VOCAB + 1, generator=gen)
    bits = proc.elbo_bits_per_token(logits, ids, noisy, attn, t)
    ref = _reference_loss(proc, logits, ids, noisy, attn, t).item() / math.log(2)
    assert bits == pytest.approx(ref, rel=1e-5)
    nats, n = proc.nelbo_per_row(logits, ids, noisy, attn, t)
    assert nats.shape == n.shape == (ids.shape[0],)
    torch.testing.assert_close(n, attn.sum(1).float())
