"""MDLM text diffusion (diffusion_process.py): schedule, time sampling, the masking of the forward process, the SUBS
cross-entropy, the loss weighting and its normaliser -- the pieces the training objective composes (its own tests,
through the objective, are in test_objectives.py). CPU, seeded inputs."""

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
    text_loss_count,
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


def _corrupt(proc: MaskedDiffusion, ids, attn, t, gen):
    """What the objective does with its uniforms: mask, then put <mask> there."""
    masked = proc.mask(torch.rand(ids.shape, generator=gen), t, attn)
    return proc.apply_mask(ids, masked), masked


# ---------------------------------------------------------------------------------------------------- schedule
def test_loglinear_schedule_values_and_derivative():
    sched = LogLinearSchedule(eps=0.01)
    t = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.999 + 0.001
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
    t = torch.cat([sample_uniform_t(16, "cpu", gen, t_min=1e-3) for _ in range(500)])
    assert abs(t.mean().item() - (1 + 1e-3) / 2) < 0.01
    plain = sample_uniform_t(10_000, "cpu", gen, t_min=1e-3, antithetic=False)
    assert (plain > 1e-3).all() and (plain <= 1).all()
    assert abs(plain.mean().item() - 0.5) < 0.015  # 5 sigma of U(0, 1)'s mean over 10k draws
    with pytest.raises(DiffRwkvError, match="batch_size"):
        sample_uniform_t(0, "cpu")


# -------------------------------------------------------------------------------------------------- corruption
def test_mask_fraction_matches_mask_prob():
    gen = torch.Generator().manual_seed(1)
    proc = _process()
    ts = torch.tensor([0.02, 0.3, 0.5, 0.77, 1.0])
    n = 40_000
    ids = torch.randint(0, VOCAB, (len(ts), n), generator=gen)
    noisy, masked = _corrupt(proc, ids, torch.ones_like(ids), ts, gen)
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
        noisy, masked = _corrupt(proc, ids, attn, t, gen)
        assert not masked[attn == 0].any()
        assert torch.equal(noisy[attn == 0], ids[attn == 0])
        assert not masked[1].any()
        assert masked[2][attn[2] == 1].all()  # eps = 0: t = 1 masks every real token


def test_mask_rejects_bad_shapes():
    u = torch.zeros(2, 5)
    with pytest.raises(DiffRwkvError, match="t must be"):
        _process().mask(u, torch.zeros(3), torch.ones(2, 5))
    with pytest.raises(DiffRwkvError, match="attention_mask"):
        _process().mask(u, torch.zeros(2), torch.ones(2, 4))


# ------------------------------------------------------------------------------------------ SUBS cross-entropy
@pytest.mark.parametrize("width", [VOCAB + 1, VOCAB])
def test_masked_ce_is_subs_over_the_real_vocabulary(width):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(40, width, generator=gen) * 3
    logits[:7, -1] = 50.0  # a <mask> column (width V + 1) that would win every softmax: SUBS never predicts it
    targets = torch.randint(0, VOCAB, (40,), generator=gen)
    before = logits.clone()
    ce, pred = _process().masked_ce(logits, targets)
    assert torch.equal(logits, before)  # caller's logits untouched
    assert ce.dtype == torch.float32 and ce.shape == pred.shape == (40,)
    log_p = torch.log_softmax(logits[:, :VOCAB], -1)  # normalised over the real tokens only
    torch.testing.assert_close(ce, -log_p.gather(1, targets[:, None])[:, 0])
    assert torch.equal(pred, logits[:, :VOCAB].argmax(-1)) and (pred < VOCAB).all()


def test_masked_ce_of_bf16_logits_runs_in_float32():
    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(30, VOCAB, generator=gen) * 4).bfloat16()
    targets = torch.randint(0, VOCAB, (30,), generator=gen)
    ce, _ = _process().masked_ce(logits, targets)
    assert ce.dtype == torch.float32
    ref, _ = _process().masked_ce(logits.float(), targets)  # bf16 -> fp32 is exact
    assert torch.equal(ce, ref)


def test_masked_ce_checks_the_logits():
    proc = _process()
    with pytest.raises(DiffRwkvError, match="classes"):
        proc.masked_ce(torch.zeros(3, VOCAB + 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(DiffRwkvError, match=r"\[N, V\]"):
        proc.masked_ce(torch.zeros(2, 3, VOCAB), torch.zeros(6, dtype=torch.long))


# ---------------------------------------------------------------------------------------- weighting and count
def test_position_weights_and_loss_sum():
    gen = torch.Generator().manual_seed(4)
    t_row = torch.tensor([0.25, 0.5, 1.0])
    t_pos = torch.rand(3, 5, generator=gen) * 0.9 + 0.1
    picked = torch.tensor([0, 4, 6, 14])  # (0, 0), (0, 4), (1, 1), (2, 4)
    rows, cols = picked // 5, picked % 5
    ce = torch.rand(4, generator=gen)
    elbo, uniform = _process("elbo"), _process("uniform")
    torch.testing.assert_close(elbo.position_weights(t_row, picked, (3, 5)), 1 / t_row[rows])
    torch.testing.assert_close(elbo.position_weights(t_pos, picked, (3, 5)), 1 / t_pos[rows, cols])
    assert torch.equal(uniform.position_weights(t_pos, picked, (3, 5)), torch.ones(4))
    torch.testing.assert_close(elbo.loss_sum(ce, t_row, picked, (3, 5)), (ce / t_row[rows]).sum())
    assert torch.equal(uniform.loss_sum(ce, t_row, picked, (3, 5)), ce.sum())


def test_text_loss_count():
    positions = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    masked = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert int(text_loss_count("elbo", positions, masked)) == 6
    assert int(text_loss_count("uniform", positions, masked)) == 3


@pytest.mark.parametrize("t_fixed", [0.05, 0.4, 0.95])
def test_elbo_weighting_analytic_identity(t_fixed):
    """For a context-free model p(x), E_q[w(t) sum_masked -log p(x_i)] = (1 - eps) * sum_i -log p(x_i) at EVERY t.

    Because -alpha'(t)/(1 - alpha(t)) * P(masked) = -alpha'(t) = 1 - eps, a Monte-Carlo average of the loss at one
    t must equal (1 - eps) * the model's mean NLL per token. A wrong weighting (e.g. uniform, or 1/t^2) gives a
    t-dependent answer and fails. The loss is put together as the objective does (test_objectives.py checks the
    same identity over the objective's own sampled times).
    """
    gen = torch.Generator().manual_seed(10)
    eps = 0.1
    proc = _process(eps=eps)
    ids, attn = _batch(gen, b=32, t=32)
    class_logits = torch.randn(VOCAB + 1, generator=gen) * 2  # same prediction at every position
    nll = -torch.log_softmax(class_logits[:VOCAB], -1)[ids]  # [B, T]
    expected = (1 - eps) * (nll * attn).sum() / attn.sum()
    t = torch.full((32,), t_fixed)
    losses = []
    for _ in range(200):
        noisy, masked = _corrupt(proc, ids, attn, t, gen)
        picked = masked.flatten().nonzero().squeeze(1)
        ce, _ = proc.masked_ce(class_logits.expand(len(picked), VOCAB + 1), ids.flatten()[picked])
        count = text_loss_count("elbo", attn.bool(), masked)
        losses.append(proc.loss_sum(ce, t, picked, masked.shape) / count)
    losses = torch.stack(losses)
    se = losses.std() / math.sqrt(len(losses))
    assert abs(losses.mean() - expected) < 5 * se + 1e-3, (losses.mean().item(), expected.item(), se.item())


def test_uniform_weighting_is_plain_masked_cross_entropy():
    gen = torch.Generator().manual_seed(7)
    ids, attn = _batch(gen)
    proc = _process(weighting="uniform")
    t = sample_uniform_t(ids.shape[0], "cpu", gen, t_min=1e-3)
    _, masked = _corrupt(proc, ids, attn, t, gen)
    logits = torch.randn(*ids.shape, VOCAB + 1, generator=gen)
    picked = masked.flatten().nonzero().squeeze(1)
    ce, _ = proc.masked_ce(logits.flatten(0, 1)[picked], ids.flatten()[picked])
    loss = proc.loss_sum(ce, t, picked, masked.shape) / text_loss_count("uniform", attn.bool(), masked)
    torch.testing.assert_close(loss, F.cross_entropy(logits[masked][:, :VOCAB], ids[masked]))
