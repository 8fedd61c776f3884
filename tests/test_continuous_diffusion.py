"""Gaussian VP latent diffusion: cosine schedule, parameterisation conversions, loss, latent standardisation (CPU,
seeded inputs)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rwkv_diffusion_rnn.continuous_diffusion import (
    PREDICTIONS,
    CosineVPSchedule,
    GaussianDiffusion,
    LatentNormalizer,
    build_latent_schedule,
)
from rwkv_diffusion_rnn.diffusion_process import sample_uniform_t
from rwkv_diffusion_rnn.errors import DiffRwkvError

D = 32


# ---------------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_schedule_is_variance_preserving_and_monotone(dtype):
    sched = CosineVPSchedule()
    t = torch.linspace(0, 1, 2001, dtype=dtype)
    alpha, sigma = sched.alpha_sigma(t)
    assert alpha.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert (alpha.square() + sigma.square() - 1).abs().max() < tol
    assert (alpha.diff() < 0).all() and (sigma.diff() > 0).all()
    assert alpha[0].item() == 1.0 and sigma[0].item() == 0.0  # t = 0 is exactly clean
    assert 0 < alpha[-1].item() < 5e-3 and sigma[-1].item() == pytest.approx(1.0, abs=1e-5)


def test_cosine_schedule_matches_nichol_dhariwal_formula():
    s, t_max = 0.008, 0.999
    sched = CosineVPSchedule(s=s, t_max=t_max)
    t = torch.rand(100, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = lambda tau: torch.cos((tau + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731 - the paper's f(t)
    alpha_bar = f(t * t_max) / f(torch.zeros((), dtype=torch.float64))
    alpha, sigma = sched.alpha_sigma(t)
    torch.testing.assert_close(alpha.square(), alpha_bar, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sigma.square(), 1 - alpha_bar, rtol=1e-10, atol=1e-14)


def test_schedule_registry_and_validation():
    assert isinstance(build_latent_schedule("cosine", s=0.01), CosineVPSchedule)
    with pytest.raises(DiffRwkvError, match="unknown latent noise schedule"):
        build_latent_schedule("linear")
    with pytest.raises(DiffRwkvError, match="t_max"):
        CosineVPSchedule(t_max=1.0)
    with pytest.raises(DiffRwkvError, match="prediction"):
        GaussianDiffusion(CosineVPSchedule(), prediction="score")


# -------------------------------------------------------------------------------------------------- q(z_t | z0)
def test_q_sample_and_clean_rows():
    diff = GaussianDiffusion(CosineVPSchedule())
    gen = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(8, D, generator=gen), torch.randn(8, D, generator=gen)
    t = torch.rand(8, generator=gen)
    t[0] = 0.0
    z_t = diff.q_sample(z0, t, noise)
    alpha, sigma = diff.schedule.alpha_sigma(t)
    torch.testing.assert_close(z_t, alpha[:, None] * z0 + sigma[:, None] * noise)
    assert torch.equal(z_t[0], z0[0])  # t = 0: exactly the clean latent
    # Variance preserving: unit-variance data stays unit variance at any t.
    big = torch.randn(20_000, D, generator=gen)
    z = diff.q_sample(big, torch.full((20_000,), 0.6), torch.randn(20_000, D, generator=gen))
    assert abs(z.var().item() - 1) < 0.02


# --------------------------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(
    ("dtype", "t_lo", "t_hi", "atol"),
    [(torch.float64, 0.0, 1.0, 1e-9), (torch.float32, 0.05, 0.9, 1e-5)],
)
def test_parameterisations_round_trip(prediction, dtype, t_lo, t_hi, atol):
    """x0 -> (z_t, target) -> x0 and eps recovered; the target is the parameterisation's (eps, x0 or v). fp64 over
    all of (0, 1]; fp32 away from the ends, where the eps <-> x0 conversions divide by a small alpha or sigma
    (inherent to the parameterisation, not a bug)."""
    diff = GaussianDiffusion(CosineVPSchedule(), prediction=prediction)
    gen = torch.Generator().manual_seed(2)
    b = 256
    x0 = torch.randn(b, D, generator=gen, dtype=dtype)
    eps = torch.randn(b, D, generator=gen, dtype=dtype)
    t = t_lo + (t_hi - t_lo) * (1 - torch.rand(b, generator=gen, dtype=dtype))  # (t_lo, t_hi]
    z_t = diff.q_sample(x0, t, eps)
    out = diff.target(x0, eps, t)
    alpha, sigma = diff.schedule.alpha_sigma(t)
    v = alpha[:, None] * eps - sigma[:, None] * x0
    torch.testing.assert_close(diff.predict_x0(out, z_t, t), x0, rtol=0, atol=atol)
    torch.testing.assert_close(diff.predict_eps(out, z_t, t), eps, rtol=0, atol=atol)
    # Each parameterisation's target is what the others convert to.
    targets = {"eps": eps, "x0": x0, "v": v}
    torch.testing.assert_close(out, targets[prediction], rtol=0, atol=atol)


def test_conversions_upcast_bf16_outputs():
    diff = GaussianDiffusion(CosineVPSchedule(), prediction="v")
    gen = torch.Generator().manual_seed(6)
    z_t = torch.randn(4, D, generator=gen)
    out = torch.randn(4, D, generator=gen).bfloat16()
    t = torch.rand(4, generator=gen)
    x0 = diff.predict_x0(out, z_t, t)
    assert x0.dtype == torch.float32
    torch.testing.assert_close(x0, diff.predict_x0(out.float(), z_t, t), rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_zero_at_target_and_plain_mse_otherwise(prediction):
    diff = GaussianDiffusion(CosineVPSchedule(), prediction=prediction)
    gen = torch.Generator().manual_seed(3)
    z0, noise = torch.randn(16, D, generator=gen), torch.randn(16, D, generator=gen)
    t = sample_uniform_t(16, "cpu", gen, t_min=diff.schedule.t_min)
    target = diff.target(z0, noise, t)
    loss, stats = diff.loss(target.clone(), z0, noise, t)
    assert loss.item() == 0.0 and stats["n_rows"] == 16
    out = target + 0.3 * torch.randn(16, D, generator=gen)
    loss, stats = diff.loss(out, z0, noise, t)
    torch.testing.assert_close(loss, ((out - target) ** 2).mean())
    assert stats["loss"] == pytest.approx(loss.item()) and stats["mse"] == pytest.approx(loss.item())


def test_loss_row_weights_exclude_clean_rows():
    diff = GaussianDiffusion(CosineVPSchedule(), prediction="eps")
    gen = torch.Generator().manual_seed(4)
    z0, noise = torch.randn(10, D, generator=gen), torch.randn(10, D, generator=gen)
    t = sample_uniform_t(10, "cpu", gen, t_min=diff.schedule.t_min)
    t[:3] = 0.0  # clean-condition rows: their eps target is unlearnable
    out = torch.randn(10, D, generator=gen, requires_grad=True)
    keep = t > 0
    loss, stats = diff.loss(out, z0, noise, t, weight=keep)
    ref = ((out - noise) ** 2)[keep].mean()
    torch.testing.assert_close(loss, ref)
    assert stats["n_rows"] == 7
    # Whatever the excluded rows hold, even NaN, the loss and its gradient are unchanged and finite.
    out2 = out.detach().clone()
    out2[:3] = float("nan")
    out2.requires_grad_(True)
    loss2, _ = diff.loss(out2, z0, noise, t, weight=keep)
    assert torch.equal(loss2, loss.detach())
    (g,) = torch.autograd.grad(loss2, out2)
    assert torch.isfinite(g).all() and (g[:3] == 0).all()
    # Float weights: a weighted mean over rows; "sum" returns its numerator.
    w = torch.rand(10, generator=gen)
    per_row = ((out - noise) ** 2).mean(1)
    torch.testing.assert_close(diff.loss(out, z0, noise, t, weight=w)[0], (w * per_row).sum() / w.sum())
    torch.testing.assert_close(diff.loss(out, z0, noise, t, weight=w, reduction="sum")[0], (w * per_row).sum())
    # Every row excluded: 0, not NaN.
    assert diff.loss(out, z0, noise, t, weight=torch.zeros(10))[0].item() == 0.0


# ------------------------------------------------------------------------------------------------- normaliser
def test_latent_normalizer_standardises_and_round_trips():
    rng = np.random.default_rng(5)
    latents = rng.normal(loc=rng.normal(size=D), scale=rng.uniform(0.01, 3, size=D), size=(500, D)).astype(np.float32)
    norm = LatentNormalizer.from_latents(latents)
    z = norm.normalize(torch.from_numpy(latents))
    torch.testing.assert_close(z.mean(0), torch.zeros(D), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(D), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.denormalize(z), torch.from_numpy(latents), rtol=1e-6, atol=1e-6)
    # state_dict is plain JSON and rebuilds the same transform.
    state = json.loads(json.dumps(norm.state_dict()))
    again = LatentNormalizer.from_state_dict(state)
    assert torch.equal(again.normalize(torch.from_numpy(latents)), z)
    z64 = norm.normalize(torch.from_numpy(latents).double())
    assert z64.dtype == torch.float64


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        ([0.0, 0.0], [1.0, 0.0], "dimension 1"),
        ([0.0, 0.0], [float("nan"), 1.0], "dimension 0"),
        ([0.0, float("inf")], [1.0, 1.0], "mean of dimension 1"),
        ([0.0], [1.0, 1.0], r"\[D\]"),
    ],
)
def test_latent_normalizer_refuses_bad_statistics(mean, std, match):
    with pytest.raises(DiffRwkvError, match=match) as info:
        LatentNormalizer(mean, std)
    assert "\n" not in str(info.value)


def test_latent_normalizer_refuses_bad_inputs():
    constant = np.ones((10, 3))
    with pytest.raises(DiffRwkvError, match="std of dimension 0"):
        LatentNormalizer.from_latents(constant)
    bad = np.random.default_rng(0).normal(size=(10, 3))
    bad[4, 1] = np.nan
    with pytest.raises(DiffRwkvError, match="row 4"):
        LatentNormalizer.from_latents(bad)
    with pytest.raises(DiffRwkvError, match="lacks"):
        LatentNormalizer.from_state_dict({"mean": [0.0]})
    with pytest.raises(DiffRwkvError, match="dims"):
        LatentNormalizer([0.0] * 3, [1.0] * 3).normalize(torch.zeros(2, 4))
