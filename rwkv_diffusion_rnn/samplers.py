"""Schedulers for the two diffusion processes, in the diffusers style: ``set_timesteps(n)``, then one
``step(model_output, t, sample, generator)`` per time, returning a small output dataclass. They hold no weights and
use exactly the training parameterisation: :class:`MaskedDiffusionScheduler` the SUBS parameterisation over the
masking schedule of :mod:`diffusion_process` (MDLM, Sahoo et al. 2024), :class:`GaussianScheduler` the eps / x0 / v
conversions of :class:`~rwkv_diffusion_rnn.continuous_diffusion.GaussianDiffusion`. The loops that call a denoiser
live in :mod:`rwkv_diffusion_rnn.sampling`.

Times run from 1 (all ``<mask>`` / pure noise) down to 0 on a uniform grid of ``n + 1`` points; the model is called at
the first ``n`` (``timesteps``), and step ``i`` moves from ``t = times[i]`` to ``s = times[i + 1]``.

Randomness: every draw takes ``generator``, either one ``torch.Generator`` for the whole batch or a
:class:`RowGenerators` (one stream per row, seeded by the row's global index), which makes a row's sample independent
of the batch it was drawn in. Categorical draws use the Gumbel-max trick with float64 noise: float32 uniforms sit on a
2^-24 grid, so ``-log(-log(u))`` is truncated at ~16.6 and coarsely quantised above ~10, which under-samples
low-probability tokens (Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic masked models and
exploit inaccurate categorical sampling", §4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rwkv_diffusion_rnn.continuous_diffusion import GaussianDiffusion
from rwkv_diffusion_rnn.diffusion_process import LogLinearSchedule, MaskingSchedule
from rwkv_diffusion_rnn.errors import DiffRwkvError

__all__ = [
    "GaussianScheduler",
    "GaussianSchedulerOutput",
    "LATENT_METHODS",
    "MaskedDiffusionScheduler",
    "MaskedSchedulerOutput",
    "MaskedStepPlan",
    "RowGenerators",
    "TEXT_STRATEGIES",
    "gumbel_argmax",
    "guided_log_probs",
    "process_logits",
    "time_grid",
    "time_for_mask_fraction",
]

TEXT_STRATEGIES = ("ancestral", "confidence", "threshold")
LATENT_METHODS = ("ddim", "ddpm")

#: Largest float64 noise block drawn at once in :func:`gumbel_argmax` (elements; 2^25 x 8 bytes = 256 MiB).
_GUMBEL_CHUNK = 1 << 25


def time_grid(num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[num_steps + 1]`` float64 times from 1 down to 0 (uniform)."""
    if num_steps < 1:
        raise DiffRwkvError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64, device=device)


# ------------------------------------------------------------------------------------------------ randomness
class RowGenerators:
    """One ``torch.Generator`` per row, seeded from ``(seed, stream, global row index)`` with numpy's SeedSequence
    (independent, well-mixed streams). ``stream`` separates uses (text draws, guidance noise, latent noise), so
    switching guidance on does not shift the text draws."""

    def __init__(self, seed: int, rows: Sequence[int], device: torch.device | str = "cpu", stream: int = 0) -> None:
        self.device = torch.device(device)
        self.rows = [int(r) for r in rows]
        self.gens = []
        for r in self.rows:
            state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream), r]).generate_state(2, np.uint32)
            g = torch.Generator(device=self.device)
            g.manual_seed((int(state[0]) << 31) ^ int(state[1]))  # < 2^63
            self.gens.append(g)

    def __len__(self) -> int:
        return len(self.gens)

    def rand(self, width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Uniform [0, 1), ``[B, width]``."""
        return _stack([torch.rand(width, generator=g, device=self.device, dtype=dtype) for g in self.gens], width)

    def randn(self, width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Standard normal, ``[B, width]``."""
        return _stack([torch.randn(width, generator=g, device=self.device, dtype=dtype) for g in self.gens], width)


def _stack(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack(parts) if parts else torch.zeros(0, width, dtype=torch.float64)


Generator = torch.Generator | RowGenerators | None


def _uniform(generator: Generator, batch: int, width: int, device: torch.device) -> torch.Tensor:
    """float64 uniforms ``[B, width]`` on ``device``."""
    if isinstance(generator, RowGenerators):
        return generator.rand(width).to(device)
    return torch.rand(batch, width, generator=generator, dtype=torch.float64, device=device)


def _normal(generator: Generator, batch: int, width: int, device: torch.device) -> torch.Tensor:
    """float64 standard normals ``[B, width]`` on ``device``."""
    if isinstance(generator, RowGenerators):
        return generator.randn(width).to(device)
    return torch.randn(batch, width, generator=generator, dtype=torch.float64, device=device)


def gumbel_argmax(log_probs: torch.Tensor, counts: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Draw one category per row of ``log_probs`` ``[N, V]`` (any float dtype; -inf = excluded) by the Gumbel-max
    trick, ``argmax(log_probs + g)`` with ``g = -log(-log(u))``, ``u`` float64: returns ``[N]`` long.

    ``counts`` ``[B]``: how many of the N rows belong to each batch row, in order (with :class:`RowGenerators` row
    b's draws come from stream b). Noise is drawn in blocks of at most ``_GUMBEL_CHUNK`` elements to bound memory.
    """
    N, V = log_probs.shape
    dev = log_probs.device
    out = torch.empty(N, dtype=torch.long, device=dev)
    if N == 0:
        return out
    per_row = counts.tolist()
    if isinstance(generator, RowGenerators):
        if len(per_row) != len(generator):
            raise DiffRwkvError(f"{len(per_row)} rows of counts for {len(generator)} row generators")
        owners = [(g, n) for g, n in zip(generator.gens, per_row, strict=True) if n]
    else:
        owners = [(generator, N)]
    chunk_rows = max(1, _GUMBEL_CHUNK // V)
    u = torch.empty(min(N, chunk_rows), V, dtype=torch.float64, device=dev)
    lo, filled = 0, 0  # rows of log_probs done; rows of u filled
    for g, n in owners:
        while n:
            m = min(n, chunk_rows - filled)
            if g is None or g.device == dev:
                torch.rand(m, V, generator=g, dtype=torch.float64, device=dev, out=u[filled : filled + m])
            else:
                u[filled : filled + m] = torch.rand(m, V, generator=g, dtype=torch.float64, device=g.device)
            filled, n = filled + m, n - m
            if filled == len(u) or lo + filled == N:  # one batched Gumbel-max per block of noise
                gumbel = -torch.log(-torch.log(u[:filled]))  # u = 0 gives -inf: never chosen
                out[lo : lo + filled] = (log_probs[lo : lo + filled].double() + gumbel).argmax(-1)
                lo, filled = lo + filled, 0
    return out


# ------------------------------------------------------------------------------------------ token distributions
def guided_log_probs(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance in log-probability space: ``log_softmax(c + w (c - u))`` with ``c, u`` the
    log-softmax of the conditional and unconditional logits ``[..., V]``, float32.

    ``c + w (c - u) = u + (1 + w)(c - u)``: the scale counts from the conditional model (Ho & Salimans 2022's w), so
    ``scale = 0`` is the plain conditional model and returns ``log_softmax(cond)`` without reading ``uncond``;
    diffusers' ``guidance_scale`` is ``1 + w``."""
    c = torch.log_softmax(cond.float(), dim=-1)
    if scale == 0.0 or uncond is None:
        return c
    u = torch.log_softmax(uncond.float(), dim=-1)
    # where either log-prob is -inf (no linear head produces it) c - u is undefined: keep the conditional value
    diff = torch.where(torch.isfinite(c) & torch.isfinite(u), c - u, torch.zeros_like(c))
    guided = torch.where(torch.isfinite(c), c + scale * diff, c)
    return torch.log_softmax(guided, dim=-1)


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Logits or log-probabilities ``[N, V]`` -> log-probabilities ``[N, V]`` float32 of the distribution to sample:
    divided by ``temperature`` (> 0), then restricted to the nucleus (Holtzman et al. 2020): the smallest set of
    most probable tokens whose mass reaches ``top_p`` (the most probable token is always kept), renormalised."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    logp = torch.log_softmax(x, dim=-1)
    if top_p >= 1.0 or logp.numel() == 0:
        return logp
    sorted_lp, order = torch.sort(logp, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_lp.exp(), dim=-1) - sorted_lp.exp()  # mass of the strictly more probable
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)


def time_for_mask_fraction(schedule: MaskingSchedule, frac: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """The time ``t`` ``[B]`` whose expected masked share, relative to t = 1, is ``frac`` ``[B]``:
    ``mask_prob(t) / mask_prob(1) = frac`` (bisection; ``mask_prob`` rises with t). Log-linear: ``t = frac``."""
    f = frac.double().clamp(0.0, 1.0)
    if isinstance(schedule, LogLinearSchedule):  # mask_prob(t) = (1 - eps) t
        return f
    top = schedule.mask_prob(torch.ones_like(f))
    lo, hi = torch.zeros_like(f), torch.ones_like(f)
    for _ in range(iters):
        mid = (lo + hi) / 2
        below = schedule.mask_prob(mid) < f * top
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


# ------------------------------------------------------------------------------------------------ text (L2T)
@dataclass
class MaskedStepPlan:
    """What a step will do, decided BEFORE the model is called (so a loop can skip the model where nothing changes).

    need: ``[B, T]`` bool, the positions whose model output the step reads (``step`` takes dense ``[B, T, V]`` output
    or just these rows, ``[N, V]`` in row-major order). unmask: ``[B, T]`` (ancestral) the positions that unmask;
    k: ``[B]`` (confidence) how many positions unmask. A row with no ``need`` changes nothing in this step."""

    need: torch.Tensor
    unmask: torch.Tensor | None = None
    k: torch.Tensor | None = None

    @property
    def rows(self) -> torch.Tensor:
        """``[B]`` bool: rows that need the model in this step."""
        return self.need.any(1)


@dataclass
class MaskedSchedulerOutput:
    prev_sample: torch.Tensor  # [B, T] ids at time s (mask_id where still masked)
    pred_original_sample: torch.Tensor  # [B, T] the token drawn at every ``need`` position, mask_id elsewhere
    unmasked: torch.Tensor  # [B, T] bool: positions unmasked by this step


class _TimeGrid:
    """The diffusers-style time grid both schedulers share: ``set_timesteps`` and ``next_time``."""

    def set_timesteps(self, num_steps: int, device: torch.device | str | None = None) -> None:
        """``times`` ``[n + 1]`` from 1 to 0; ``timesteps`` ``[n]`` the times at which the model is called."""
        self.num_inference_steps = int(num_steps)
        self.times = time_grid(num_steps)
        self.timesteps = self.times[:-1]

    def next_time(self, t: float | torch.Tensor) -> float:
        """The grid time after ``t`` (``t`` must be one of ``timesteps``)."""
        i = int(torch.argmin((self.times - float(t)).abs()))
        if i >= self.num_inference_steps:
            raise DiffRwkvError(f"t = {float(t)} is the end of the grid; nothing follows it")
        return float(self.times[i + 1])


class MaskedDiffusionScheduler(_TimeGrid):
    """Reverse process of absorbing-state (masked) text diffusion over ``schedule`` (MDLM §3.2, SUBS).

    Strategies (which masked positions unmask in a step from t to s):

    * ``ancestral``: MDLM's ancestral sampler, exact for the model: each masked position unmasks independently with
      probability ``(alpha(s) - alpha(t)) / (1 - alpha(t))`` and takes a token drawn from the model's distribution;
      unmasked tokens never change (carry-over). At s = 0 every remaining mask unmasks.
    * ``confidence``: draw a token at every masked position and unmask the ``k`` whose drawn token is most
      probable, ``k = round(n_masked * (alpha(s) - alpha(t)) / (1 - alpha(t)))`` (the ancestral step's expected
      count; all at s = 0). Greedy "low-confidence remasking" (Chang et al. 2022 MaskGIT; Nie et al. 2025 LLaDA).
    * ``threshold``: unmask every masked position whose drawn token has probability > ``threshold``, at least the
      most confident one per row; everything left at s = 0 (Wu et al. 2025, Fast-dLLM's parallel decoding).

    ``temperature`` (0 = greedy argmax) and ``top_p`` shape the distribution tokens are drawn from; "probability" for
    the confidence strategies is that of the drawn token under this distribution. ``model_output`` is logits (or
    log-probabilities, e.g. from :func:`guided_log_probs`) over the ``mask_id`` real tokens; a ``<mask>`` column
    (width ``mask_id + 1``) is dropped, which is SUBS's "never predict <mask>".
    """

    order = 1

    def __init__(
        self,
        schedule: MaskingSchedule,
        mask_id: int,
        strategy: str = "ancestral",
        temperature: float = 1.0,
        top_p: float = 1.0,
        threshold: float = 0.9,
    ) -> None:
        if strategy not in TEXT_STRATEGIES:
            raise DiffRwkvError(f"unknown text sampling strategy {strategy!r}; expected one of {TEXT_STRATEGIES}")
        if temperature < 0 or not 0 < top_p <= 1 or not 0 <= threshold <= 1:
            raise DiffRwkvError(f"need temperature >= 0, 0 < top_p <= 1, 0 <= threshold <= 1; got "
                                f"{temperature}, {top_p}, {threshold}")  # fmt: skip
        self.schedule, self.mask_id, self.strategy = schedule, int(mask_id), strategy
        self.temperature, self.top_p, self.threshold = float(temperature), float(top_p), float(threshold)
        self.set_timesteps(1)

    def unmask_probability(self, t: float, s: float) -> float:
        """``(alpha(s) - alpha(t)) / (1 - alpha(t))``: chance that a token masked at t is unmasked at s < t."""
        a_t, a_s = (float(self.schedule.alpha(torch.tensor([x], dtype=torch.float64))) for x in (t, s))
        return 1.0 if s <= 0.0 else min(1.0, max(0.0, (a_s - a_t) / max(1.0 - a_t, 1e-12)))

    def plan(self, t: float | torch.Tensor, sample: torch.Tensor, generator: Generator = None) -> MaskedStepPlan:
        """Decide, before the model is called, what the step from ``t`` will change in ``sample`` ``[B, T]``.
        ``ancestral`` draws its unmasking uniforms here (float64, one per position, masked or not)."""
        masked = sample == self.mask_id
        p = self.unmask_probability(float(t), self.next_time(t))
        if self.strategy == "ancestral":
            u = _uniform(generator, sample.shape[0], sample.shape[1], sample.device)
            unmask = masked & (u < p)
            return MaskedStepPlan(need=unmask, unmask=unmask)
        if self.strategy == "confidence":
            k = torch.round(masked.sum(1).double() * p).long()
            return MaskedStepPlan(need=masked & (k > 0)[:, None], k=k)
        return MaskedStepPlan(need=masked)

    def step(
        self,
        model_output: torch.Tensor,
        t: float | torch.Tensor,
        sample: torch.Tensor,
        generator: Generator = None,
        plan: MaskedStepPlan | None = None,
    ) -> MaskedSchedulerOutput:
        """One reverse step from ``t`` to the next grid time.

        model_output: ``[B, T, V]`` logits, or ``[N, V]`` at the ``plan.need`` positions only (row-major); sample:
        ``[B, T]`` ids at time t. ``plan`` from :meth:`plan` (made here if None, with ``generator``)."""
        plan = plan if plan is not None else self.plan(t, sample, generator)
        need = plan.need
        s = self.next_time(t)
        logits = model_output[need] if model_output.dim() == 3 else model_output
        if logits.shape[0] != int(need.sum()):
            raise DiffRwkvError(f"model_output has {logits.shape[0]} rows for {int(need.sum())} needed positions")
        logits = logits[:, : self.mask_id]
        if self.temperature == 0:
            logp = torch.log_softmax(logits.float(), dim=-1)
            tokens = logp.argmax(-1)
        else:
            logp = process_logits(logits, self.temperature, self.top_p)
            tokens = gumbel_argmax(logp, need.sum(1), generator)
        drawn = torch.full_like(sample, self.mask_id)
        drawn[need] = tokens
        if self.strategy == "ancestral":
            commit = plan.unmask
        else:
            conf = torch.full(sample.shape, -1.0, dtype=torch.float64, device=sample.device)
            conf[need] = logp.gather(-1, tokens[:, None])[:, 0].double().exp()
            if self.strategy == "confidence":
                rank = torch.argsort(torch.argsort(conf, dim=1, descending=True, stable=True), dim=1)
                commit = need & (rank < plan.k[:, None])
            elif s <= 0.0:
                commit = need
            else:
                best = torch.zeros_like(need).scatter_(1, conf.argmax(1, keepdim=True), True)
                commit = need & ((conf > self.threshold) | best)
        prev = torch.where(commit, drawn, sample)
        return MaskedSchedulerOutput(prev, drawn, commit)


# ---------------------------------------------------------------------------------------------- latent (T2L)
@dataclass
class GaussianSchedulerOutput:
    prev_sample: torch.Tensor  # [B, D] z_s
    pred_original_sample: torch.Tensor  # [B, D] the x0 implied by the model output at t


class GaussianScheduler(_TimeGrid):
    """DDPM and DDIM over a continuous-time VP :class:`GaussianDiffusion` (its eps / x0 / v conversions).

    From t to s < t, with ``x0, eps`` implied by the model output at ``(z_t, t)``:

    * ``ddpm`` (Ho et al. 2020, ancestral; the continuous-time form of Kingma et al. 2021, VDM eq. 28): sample the
      posterior ``q(z_s | z_t, x0)``: mean ``(a_ts s_s^2 / s_t^2) z_t + (a_s s_ts^2 / s_t^2) x0``, variance
      ``s_ts^2 s_s^2 / s_t^2``, with ``a_ts = a_t / a_s`` and ``s_ts^2 = s_t^2 - a_ts^2 s_s^2``.
    * ``ddim`` (Song et al. 2021, eq. 12): ``z_s = a_s x0 + sqrt(s_s^2 - c^2) eps + c n`` with
      ``c = eta * sqrt(s_s^2 / s_t^2 * (1 - a_t^2 / a_s^2))``; ``eta = 0`` is deterministic, ``eta = 1`` equals
      ``ddpm`` in distribution.

    At s = 0 both return x0. Work in float64 (pass a float64 ``sample``): eps -> x0 divides by ``a(1) ~ 1.6e-3``.

    ``clip_x0`` (off by default, so the sampler is exactly the model's reverse process): clamp the implied x0 to
    ``[-clip_x0, clip_x0]`` (standardised units) and take eps from the clamped x0, as diffusers' ``clip_sample``. With
    an eps-predicting network the first steps multiply its error by ``s / a ~ 600``; a clamp keeps an imperfect
    model's trajectory in range.
    """

    order = 1

    def __init__(
        self, diffusion: GaussianDiffusion, method: str = "ddim", eta: float = 0.0, clip_x0: float | None = None
    ) -> None:
        if method not in LATENT_METHODS:
            raise DiffRwkvError(f"unknown latent sampling method {method!r}; expected one of {LATENT_METHODS}")
        if eta < 0 or (clip_x0 is not None and clip_x0 <= 0):
            raise DiffRwkvError(f"need eta >= 0 and clip_x0 None or > 0; got {eta}, {clip_x0}")
        self.diffusion, self.method, self.eta, self.clip_x0 = diffusion, method, float(eta), clip_x0
        self.set_timesteps(1)

    def step(
        self, model_output: torch.Tensor, t: float | torch.Tensor, sample: torch.Tensor, generator: Generator = None
    ) -> GaussianSchedulerOutput:
        """model_output ``[B, D]`` (the network's eps / x0 / v), sample ``z_t`` ``[B, D]`` -> ``z_s`` ``[B, D]``."""
        B, D = sample.shape
        s = self.next_time(t)
        z = sample if sample.dtype == torch.float64 else sample.float()
        tt = torch.full((B,), float(t), dtype=z.dtype, device=z.device)
        x0 = self.diffusion.predict_x0(model_output.to(z.dtype), z, tt)
        sched = self.diffusion.schedule
        a_t, s_t = (x.item() for x in sched.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
        a_s, s_s = (x.item() for x in sched.alpha_sigma(torch.tensor(s, dtype=torch.float64)))
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = (z - a_t * x0) / s_t
        else:
            eps = self.diffusion.predict_eps(model_output.to(z.dtype), z, tt)
        if s <= 0.0:
            return GaussianSchedulerOutput(x0, x0)
        if self.method == "ddpm":
            a_ts = a_t / a_s
            var_ts = s_t**2 - a_ts**2 * s_s**2
            mean = (a_ts * s_s**2 / s_t**2) * z + (a_s * var_ts / s_t**2) * x0
            std = (max(var_ts, 0.0) * s_s**2 / s_t**2) ** 0.5
            return GaussianSchedulerOutput(mean + std * _normal(generator, B, D, z.device).to(z.dtype), x0)
        c = self.eta * max(s_s**2 / s_t**2 * (1.0 - a_t**2 / a_s**2), 0.0) ** 0.5
        z_s = a_s * x0 + max(s_s**2 - c**2, 0.0) ** 0.5 * eps
        if c > 0:
            z_s = z_s + c * _normal(generator, B, D, z.device).to(z.dtype)
        return GaussianSchedulerOutput(z_s, x0)
