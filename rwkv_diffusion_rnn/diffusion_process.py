"""Masked (absorbing-state) text diffusion: MDLM, Sahoo et al. 2024, "Simple and Effective Masked Diffusion
Language Models" (arXiv:2406.07524).

Forward process: each non-pad token is kept with probability ``alpha(t)`` and otherwise replaced by ``<mask>``,
independently per position; ``t = 0`` is the clean text, ``t = 1`` (almost) all-mask. The denoiser sees the noisy
ids and returns logits; this module turns them into the SUBS parameterisation and the continuous-time negative ELBO

    NELBO = E_t E_q [ w(t) * sum_{masked, non-pad i} -log p_theta(x_i | z_t) ],    w(t) = -alpha'(t) / (1 - alpha(t))

(MDLM §3, its continuous-time limit). It holds no weights: it wraps any denoiser through the logits it produced.

Conventions the trainer relies on:

* **Logits width.** ``logits`` is ``[B, T, V]`` with ``V = mask_id + 1`` (every vocabulary id plus a ``<mask>``
  column, which SUBS forces to ``-inf``) or ``V = mask_id`` (no mask column, e.g. the RWKV LM head). Vocabulary ids
  are ``0 .. mask_id - 1``; ``<mask>`` is one past the vocabulary (65536 for RWKV World, see ``tokenizer.py``).
* **Padding** (``attention_mask == 0``) is never masked, never counted and never reaches the loss.
* **Time.** ``t`` is ``[B]``, one clock per row, in ``[0, 1]``. ``t = 0`` rows (clean condition, e.g. text -> latent)
  get no masks and contribute nothing. Training draws ``t`` from ``(t_min, 1]`` with :func:`sample_uniform_t`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rwkv_diffusion_rnn.errors import DiffRwkvError

__all__ = [
    "LogLinearSchedule",
    "MaskedDiffusion",
    "MaskingSchedule",
    "TEXT_SCHEDULES",
    "WEIGHTINGS",
    "build_text_schedule",
    "sample_uniform_t",
]


def sample_uniform_t(
    batch_size: int,
    device: torch.device | str,
    generator: torch.Generator | None = None,
    *,
    t_min: float = 0.0,
    antithetic: bool = True,
) -> torch.Tensor:
    """Draw one diffusion time per row, ``[B]`` float32 in ``(t_min, 1]``.

    With ``antithetic`` the low-discrepancy sampler of Kingma et al. 2021 (VDM), as used by MDLM:
    ``u_i = (r + i / B) mod 1`` with one ``r ~ U[0, 1)``, so every stratum ``[k/B, (k+1)/B)`` holds exactly one
    sample and the variance of the batch-mean loss drops. The strata are then shuffled over rows, so a trainer that
    splits a batch by rows (e.g. half l2t, half t2l) does not hand one half only the small times. ``u`` maps to
    ``t = 1 - (1 - t_min) * u``, which lies in ``(t_min, 1]``: t = 1 can be drawn, t = 0 never.

    ``generator`` (if given) must live on ``device``.
    """
    if batch_size < 1:
        raise DiffRwkvError(f"sample_t needs batch_size >= 1, got {batch_size}")
    if not 0.0 <= t_min < 1.0:
        raise DiffRwkvError(f"t_min must be in [0, 1), got {t_min}")
    if antithetic:
        r = torch.rand((), generator=generator, device=device)
        offsets = torch.arange(batch_size, device=device, dtype=torch.float32) / batch_size
        u = torch.remainder(r + offsets, 1.0)
        u = u[torch.randperm(batch_size, generator=generator, device=device)]
    else:
        u = torch.rand(batch_size, generator=generator, device=device)
    return 1.0 - (1.0 - t_min) * u


class MaskingSchedule:
    """Base class of a masking schedule: ``alpha(t)`` = probability that a token is still clean at time t.

    Subclasses give ``alpha`` and ``dalpha_dt``; ``mask_prob`` and ``elbo_weight`` follow. Inputs and outputs are
    ``[B]`` float tensors; ``t`` is clamped to ``[0, 1]``.
    """

    #: Smallest time the training sampler draws (times come from (t_min, 1]). MDLM's ``sampling_eps``.
    t_min: float = 1e-3

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dalpha_dt(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Probability ``1 - alpha(t)`` that a non-pad token is ``<mask>`` at time t, ``[B]``."""
        return 1.0 - self.alpha(t)

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Continuous-time NELBO weight ``-alpha'(t) / (1 - alpha(t))`` (MDLM §3), ``[B]``.

        At ``t = 0`` the weight is infinite in theory; here the denominator is floored at the smallest normal
        float32, so the weight is huge but finite and ``weight * 0 masked tokens = 0`` stays 0 (not NaN).
        """
        tiny = torch.finfo(torch.float32).tiny
        return -self.dalpha_dt(t) / self.mask_prob(t).clamp_min(tiny)


class LogLinearSchedule(MaskingSchedule):
    """MDLM's log-linear schedule: ``alpha(t) = 1 - (1 - eps) * t``, so ``mask_prob(t) = (1 - eps) * t``.

    Called log-linear because the total noise ``sigma(t) = -log alpha(t)`` is ``-log(1 - (1 - eps) t)``
    (MDLM ``noise_schedule.LogLinearNoise``). The ELBO weight is exactly ``1 / t`` whatever ``eps``.

    Args:
        eps: ``alpha(1)``, the fraction of tokens still clean at t = 1 (MDLM default 1e-3). MDLM needs it > 0 only
            because it conditions on ``sigma(t)``, infinite at ``alpha = 0``; nothing here does, so ``eps = 0``
            (t = 1 fully masked, matching the all-mask prior the sampler starts from) is allowed.
        t_min: smallest training time, see :func:`sample_uniform_t`. Truncating the t-integral at ``t_min`` drops at
            most ``t_min * (1 - eps)`` of the ELBO's weight: a tiny bias traded for bounded variance (the estimator's
            variance grows like ``log(1 / t_min)``).
    """

    def __init__(self, eps: float = 1e-3, t_min: float = 1e-3) -> None:
        if not 0.0 <= eps < 1.0:
            raise DiffRwkvError(f"LogLinearSchedule eps must be in [0, 1), got {eps}")
        if not 0.0 <= t_min < 1.0:
            raise DiffRwkvError(f"LogLinearSchedule t_min must be in [0, 1), got {t_min}")
        self.eps = float(eps)
        self.t_min = float(t_min)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - (1.0 - self.eps) * t.clamp(0.0, 1.0)

    def dalpha_dt(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -(1.0 - self.eps), dtype=torch.promote_types(t.dtype, torch.float32))

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        # Written directly rather than as 1 - alpha(t): no cancellation for small t.
        return (1.0 - self.eps) * t.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"LogLinearSchedule(eps={self.eps}, t_min={self.t_min})"


#: Text masking schedules by config name (``diffusion.text_schedule``); add one line to add a schedule.
TEXT_SCHEDULES: dict[str, type[MaskingSchedule]] = {"loglinear": LogLinearSchedule}

#: Loss weightings of :class:`MaskedDiffusion` and what each one's ``loss`` is normalised by.
WEIGHTINGS: dict[str, str] = {
    "elbo": "sum over masked tokens of w(t) * CE, divided by the number of non-pad tokens (NELBO, nats/token)",
    "uniform": "mean CE over masked tokens (weight 1; plain masked-token cross-entropy, nats/masked token)",
}


def build_text_schedule(name: str, **kwargs: float) -> MaskingSchedule:
    """Build a masking schedule by name, e.g. ``build_text_schedule("loglinear", eps=1e-3)``."""
    try:
        cls = TEXT_SCHEDULES[name]
    except KeyError:
        raise DiffRwkvError(f"unknown text noise schedule {name!r}; expected one of {sorted(TEXT_SCHEDULES)}") from None
    return cls(**kwargs)


class MaskedDiffusion:
    """MDLM training-side process around any denoiser: time sampling, corruption, SUBS and the NELBO loss.

    Args:
        schedule: the masking schedule (e.g. :class:`LogLinearSchedule`).
        mask_id: id of ``<mask>``; equals the vocabulary size (ids ``0 .. mask_id - 1`` are real tokens).
        weighting: ``"elbo"`` (MDLM's continuous-time NELBO, per non-pad token) or ``"uniform"`` (plain CE averaged
            over masked tokens); see :data:`WEIGHTINGS`. The stats always report both.
        antithetic: draw times with the low-discrepancy sampler (:func:`sample_uniform_t`).
    """

    def __init__(
        self, schedule: MaskingSchedule, mask_id: int, weighting: str = "elbo", antithetic: bool = True
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise DiffRwkvError(f"unknown text loss weighting {weighting!r}; expected one of {sorted(WEIGHTINGS)}")
        if mask_id < 1:
            raise DiffRwkvError(f"mask_id must be >= 1 (it is the vocabulary size), got {mask_id}")
        self.schedule = schedule
        self.mask_id = int(mask_id)
        self.weighting = weighting
        self.antithetic = bool(antithetic)

    def __repr__(self) -> str:
        return (
            f"MaskedDiffusion({self.schedule!r}, mask_id={self.mask_id}, weighting={self.weighting!r}, "
            f"antithetic={self.antithetic})"
        )

    # ----------------------------------------------------------------------------------------------- forward
    def sample_t(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training times ``[B]`` in ``(schedule.t_min, 1]`` (antithetic if configured)."""
        return sample_uniform_t(batch_size, device, generator, t_min=self.schedule.t_min, antithetic=self.antithetic)

    def corrupt(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``z_t ~ q(z_t | x)``: mask each non-pad token independently with probability ``mask_prob(t)``.

        Args:
            input_ids: ``[B, T]`` clean token ids (< mask_id).
            attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding (bool or integer).
            t: ``[B]`` times in ``[0, 1]``; ``t = 0`` leaves the row clean.
            generator: optional RNG on ``input_ids.device``.

        Returns:
            ``(noisy_ids [B, T], masked [B, T] bool)``: masked positions hold ``mask_id``; padding is never masked.
        """
        _check_bt(input_ids, attention_mask, t)
        p = self.schedule.mask_prob(t.float())  # [B]
        u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
        masked = (u < p[:, None]) & attention_mask.bool()
        noisy_ids = torch.where(masked, torch.full_like(input_ids, self.mask_id), input_ids)
        return noisy_ids, masked

    # ---------------------------------------------------------------------------------------------- denoiser
    def _check_logits(self, logits: torch.Tensor, noisy_ids: torch.Tensor) -> None:
        if logits.dim() != 3 or logits.shape[:2] != noisy_ids.shape:
            raise DiffRwkvError(
                f"logits must be [B, T, V] over noisy_ids {list(noisy_ids.shape)}, got {list(logits.shape)}"
            )
        if logits.shape[-1] not in (self.mask_id, self.mask_id + 1):
            raise DiffRwkvError(
                f"logits have {logits.shape[-1]} classes; expected mask_id + 1 = {self.mask_id + 1} "
                f"(vocabulary + <mask> column) or mask_id = {self.mask_id} (vocabulary only)"
            )

    def subs_log_probs(self, logits: torch.Tensor, noisy_ids: torch.Tensor) -> torch.Tensor:
        """SUBS parameterisation (MDLM §3.2): ``log p_theta(x | z_t)``, ``[B, T, V]`` float32.

        * zero masking probability: the ``<mask>`` column (if ``V = mask_id + 1``) is ``-inf`` everywhere;
        * carry-over unmasking: where ``noisy_ids != mask_id`` the row is ``0`` on that id and ``-inf`` elsewhere;
        * at masked positions: ``log_softmax`` of the logits over the ``mask_id`` real tokens.

        This is the dense reference (samplers use it); :meth:`loss` computes the same numbers on masked positions
        only. Log-softmax runs in float32 even for bf16 logits: bf16 keeps 8 mantissa bits, so a log-sum-exp over
        65k classes in bf16 is off by ~0.01-0.1 nats, the size of the differences training has to resolve.
        """
        self._check_logits(logits, noisy_ids)
        v = logits.shape[-1]
        x = logits.float()
        if v == self.mask_id + 1:
            is_mask_col = torch.arange(v, device=logits.device) == self.mask_id
            x = x.masked_fill(is_mask_col, float("-inf"))  # out of place: the caller's logits are untouched
        log_probs = torch.log_softmax(x, dim=-1)
        carried = noisy_ids != self.mask_id  # [B, T]
        one_hot = torch.full_like(log_probs, float("-inf")).scatter_(-1, noisy_ids.clamp(max=v - 1).unsqueeze(-1), 0.0)
        return torch.where(carried.unsqueeze(-1), one_hot, log_probs)

    def masked_cross_entropy(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        noisy_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position ``-log p_theta(x_i | z_t)`` under SUBS, ``[B, T]`` float32, and the ``masked [B, T]`` bool.

        Zero wherever the position is not masked (SUBS carries those over with probability 1) or is padding. Only
        masked positions are gathered before the float32 log-softmax, so the ``[B, T, V]`` float32 copy is the size
        of the masked part only (the boolean gather costs one host sync). The ``<mask>`` column is dropped, which is
        SUBS's ``-inf`` mask logit.
        """
        ce, masked, _ = self._masked_ce(logits, input_ids, noisy_ids, attention_mask)
        return ce, masked

    def _masked_ce(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        noisy_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`masked_cross_entropy` plus the number of masked positions whose argmax is the target (0-d)."""
        self._check_logits(logits, noisy_ids)
        masked = (noisy_ids == self.mask_id) & attention_mask.bool()
        picked = logits[masked][:, : self.mask_id].float()  # [N, mask_id]; float32: see subs_log_probs
        targets = input_ids[masked]  # [N]
        ce_masked = F.cross_entropy(picked, targets, reduction="none")  # [N]
        ce = torch.zeros(masked.shape, dtype=torch.float32, device=logits.device).masked_scatter(masked, ce_masked)
        with torch.no_grad():
            n_correct = (picked.argmax(dim=-1) == targets).float().sum()
        return ce, masked, n_correct

    # -------------------------------------------------------------------------------------------------- loss
    def nelbo_per_row(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        noisy_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        t: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One-sample NELBO estimate of each row in nats, ``[B]``, and its non-pad token count ``[B]`` (float32).

        For a dataset's bits/token, sum both over rows and batches and divide (``/ ln 2``); averaging several
        ``t`` draws per row tightens the estimate.
        """
        ce, _ = self.masked_cross_entropy(logits, input_ids, noisy_ids, attention_mask)
        w = self.schedule.elbo_weight(t.float())  # [B]
        return (ce * w[:, None]).sum(dim=1), attention_mask.float().sum(dim=1)

    def elbo_bits_per_token(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        noisy_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        t: torch.Tensor,
    ) -> float:
        """This batch's NELBO estimate in bits per non-pad token (an upper bound on the NLL in expectation)."""
        with torch.no_grad():
            nats, n = self.nelbo_per_row(logits, input_ids, noisy_ids, attention_mask, t)
            return float(nats.sum() / n.sum().clamp_min(1.0)) / math.log(2.0)

    def loss(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        noisy_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        t: torch.Tensor,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of one batch and detached stats.

        Args:
            logits: ``[B, T, V]`` denoiser output at the positions of ``noisy_ids`` (any float dtype).
            input_ids: ``[B, T]`` clean ids (the targets).
            noisy_ids: ``[B, T]`` from :meth:`corrupt`; a position is in the loss iff it holds ``mask_id`` and is
                not padding.
            attention_mask: ``[B, T]``, 0 at padding.
            t: ``[B]`` the times used by :meth:`corrupt`.
            reduction: ``"mean"`` (see :data:`WEIGHTINGS`) or ``"sum"`` (the unnormalised numerator, for a trainer
                that divides by a count all-reduced over ranks / accumulation steps: ``n_tokens`` for ``elbo``,
                ``n_masked`` for ``uniform``).

        Returns:
            ``(loss 0-d float32, stats)``; stats are floats: ``loss``, ``nelbo`` (nats per non-pad token, always
            ELBO-weighted), ``masked_ce`` (nats per masked token), ``masked_acc``, ``n_masked``, ``n_tokens``,
            ``mask_frac``.
        """
        if reduction not in ("mean", "sum"):
            raise DiffRwkvError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        _check_bt(input_ids, attention_mask, t)
        ce, masked, n_correct = self._masked_ce(logits, input_ids, noisy_ids, attention_mask)
        w = self.schedule.elbo_weight(t.float())  # [B]; finite at t = 0, where no token is masked
        nelbo_sum = (ce * w[:, None]).sum()
        ce_sum = ce.sum()
        n_tokens = attention_mask.float().sum()
        n_masked = masked.float().sum()
        total, count = (nelbo_sum, n_tokens) if self.weighting == "elbo" else (ce_sum, n_masked)
        loss = total if reduction == "sum" else total / count.clamp_min(1.0)

        with torch.no_grad():
            values = torch.stack(
                [
                    loss.detach(),
                    nelbo_sum.detach() / n_tokens.clamp_min(1.0),
                    ce_sum.detach() / n_masked.clamp_min(1.0),
                    n_correct / n_masked.clamp_min(1.0),
                    n_masked,
                    n_tokens,
                    n_masked / n_tokens.clamp_min(1.0),
                ]
            ).tolist()  # one device -> host transfer
        keys = ("loss", "nelbo", "masked_ce", "masked_acc", "n_masked", "n_tokens", "mask_frac")
        return loss, dict(zip(keys, values, strict=True))


def _check_bt(input_ids: torch.Tensor, attention_mask: torch.Tensor, t: torch.Tensor) -> None:
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise DiffRwkvError(
            f"input_ids and attention_mask must both be [B, T], got {list(input_ids.shape)} and "
            f"{list(attention_mask.shape)}"
        )
    if t.shape != input_ids.shape[:1]:
        raise DiffRwkvError(f"t must be [B] = [{input_ids.shape[0]}], got {list(t.shape)}")
