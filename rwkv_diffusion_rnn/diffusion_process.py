"""Masked (absorbing-state) text diffusion: MDLM, Sahoo et al. 2024, "Simple and Effective Masked Diffusion
Language Models" (arXiv:2406.07524).

Forward process: each non-pad token is kept with probability ``alpha(t)`` and otherwise replaced by ``<mask>``,
independently per position; ``t = 0`` is the clean text, ``t = 1`` (almost) all-mask. The denoiser sees the noisy
ids and returns logits at the masked positions; this module turns them into the SUBS cross-entropy and the
continuous-time negative ELBO

    NELBO = E_t E_q [ w(t) * sum_{masked, non-pad i} -log p_theta(x_i | z_t) ],    w(t) = -alpha'(t) / (1 - alpha(t))

(MDLM §3, its continuous-time limit). It holds no weights. This is the one implementation of masked text diffusion:
the training objective (``objectives.py``) draws the random numbers and picks the rows, and calls
:meth:`MaskedDiffusion.mask` / :meth:`~MaskedDiffusion.apply_mask` for the corruption and
:meth:`~MaskedDiffusion.masked_ce` / :meth:`~MaskedDiffusion.loss_sum` / :func:`text_loss_count` for the loss.

Conventions the trainer relies on:

* **Logits width.** ``V = mask_id`` (vocabulary only, e.g. the text head) or ``V = mask_id + 1`` (plus a ``<mask>``
  column, which SUBS drops). Vocabulary ids are ``0 .. mask_id - 1``; ``<mask>`` is one past the vocabulary (65536
  for RWKV World, see ``tokenizer.py``).
* **Padding** (``attention_mask == 0``) is never masked, never counted and never reaches the loss.
* **Time.** ``t`` is ``[B]``, one clock per row, in ``[0, 1]`` (``[B, T]`` per position in the loss, for clean
  prefixes). ``t = 0`` rows (clean condition, e.g. text -> latent) get no masks and contribute nothing. Training
  draws ``t`` from ``(t_min, 1]`` with :func:`sample_uniform_t`.
"""

from __future__ import annotations

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
    "text_loss_count",
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
        raise DiffRwkvError(f"sample_uniform_t needs batch_size >= 1, got {batch_size}")
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

#: Loss weightings of :class:`MaskedDiffusion` and what each one's loss is normalised by (:func:`text_loss_count`).
WEIGHTINGS: dict[str, str] = {
    "elbo": "sum over masked tokens of w(t) * CE, divided by the tokens under the ELBO (NELBO, nats/token)",
    "uniform": "mean CE over masked tokens (weight 1; plain masked-token cross-entropy, nats/masked token)",
}


def build_text_schedule(name: str, **kwargs: float) -> MaskingSchedule:
    """Build a masking schedule by name, e.g. ``build_text_schedule("loglinear", eps=1e-3)``."""
    try:
        cls = TEXT_SCHEDULES[name]
    except KeyError:
        raise DiffRwkvError(f"unknown text noise schedule {name!r}; expected one of {sorted(TEXT_SCHEDULES)}") from None
    return cls(**kwargs)


def text_loss_count(weighting: str, positions: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """The normaliser of the text loss (0-d, integer): the positions under the ELBO (``elbo``; real tokens of the
    rows with a text loss, less any clean prefix) or the masked positions (``uniform``). Both ``[B, T]`` bool."""
    return positions.sum() if weighting == "elbo" else masked.sum()


class MaskedDiffusion:
    """MDLM's masked text diffusion around any denoiser: the forward process, the SUBS cross-entropy at the masked
    positions and the loss weighting. The training objective (``objectives.py``) composes these; nothing else
    implements them.

    Args:
        schedule: the masking schedule (e.g. :class:`LogLinearSchedule`).
        mask_id: id of ``<mask>``; equals the vocabulary size (ids ``0 .. mask_id - 1`` are real tokens).
        weighting: ``"elbo"`` (MDLM's continuous-time NELBO, per token under the ELBO) or ``"uniform"`` (plain CE
            averaged over masked tokens); see :data:`WEIGHTINGS`.
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
    def mask(self, u: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Which positions ``q(z_t | x)`` masks, ``[B, T]`` bool: each non-pad position whose uniform draw is below
        ``mask_prob(t)`` of its row, independently per position.

        Args:
            u: ``[B, T]`` uniforms on ``[0, 1)``, drawn by the caller (the objective draws them for the global
                batch, see ``objectives.py``).
            t: ``[B]`` times in ``[0, 1]``; ``t = 0`` leaves the row clean.
            attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding (bool or integer): padding is never masked.
        """
        if u.dim() != 2 or attention_mask.shape != u.shape:
            raise DiffRwkvError(
                f"uniforms and attention_mask must both be [B, T], got {list(u.shape)} and {list(attention_mask.shape)}"
            )
        if t.shape != u.shape[:1]:
            raise DiffRwkvError(f"t must be [B] = [{u.shape[0]}], got {list(t.shape)}")
        return (u < self.schedule.mask_prob(t.float())[:, None]) & attention_mask.bool()

    def apply_mask(self, input_ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """``z_t``: ``input_ids`` with ``<mask>`` (``mask_id``) at the ``masked`` positions, ``[B, T]``."""
        return torch.where(masked, torch.full_like(input_ids, self.mask_id), input_ids)

    # -------------------------------------------------------------------------------------------------- loss
    def masked_ce(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SUBS cross-entropy ``-log p_theta(x_i | z_t)`` at ``N`` masked positions (MDLM §3.2), ``[N]`` float32, and
        the argmax prediction ``[N]``.

        ``logits`` ``[N, V]`` are the denoiser's at those positions, with ``V = mask_id`` (vocabulary only, e.g. the
        text head) or ``V = mask_id + 1`` (a ``<mask>`` column, dropped here: SUBS never predicts ``<mask>``).
        Unmasked positions carry their token over with probability 1 under SUBS and add nothing, so only masked
        positions are ever given. The log-softmax runs in float32 even for bf16 logits: bf16 keeps 8 mantissa bits,
        so a log-sum-exp over 65k classes in bf16 is off by ~0.01-0.1 nats, the size of what training resolves.
        """
        if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
            raise DiffRwkvError(
                f"logits must be [N, V] at the N = {targets.shape[0]} masked positions, got {list(logits.shape)}"
            )
        if logits.shape[-1] not in (self.mask_id, self.mask_id + 1):
            raise DiffRwkvError(
                f"logits have {logits.shape[-1]} classes; expected mask_id + 1 = {self.mask_id + 1} "
                f"(vocabulary + <mask> column) or mask_id = {self.mask_id} (vocabulary only)"
            )
        x = logits[:, : self.mask_id].float()
        return F.cross_entropy(x, targets, reduction="none"), x.argmax(-1)

    def position_weights(self, t: torch.Tensor, picked: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The loss weight of each masked position, ``[N]``: ``w(t) = -alpha'(t) / (1 - alpha(t))`` at the position's
        time (``elbo``) or 1 (``uniform``).

        Args:
            t: ``[B]`` times of the rows, or ``[B, T]`` per position (clean prefixes).
            picked: ``[N]`` the masked positions as a flat index into ``shape`` = ``[B, T]`` (row-major).
        """
        if self.weighting != "elbo":
            return torch.ones(picked.shape, dtype=torch.float32, device=picked.device)
        t_pos = t.float() if t.dim() == 2 else t.float()[:, None].expand(shape)
        return self.schedule.elbo_weight(t_pos.flatten()[picked])

    def loss_sum(self, ce: torch.Tensor, t: torch.Tensor, picked: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The text loss's numerator (0-d): ``sum_i w_i * ce_i`` over the masked positions (:meth:`position_weights`).
        Divided by :func:`text_loss_count` (summed over ranks and micro-steps) it is the loss of :data:`WEIGHTINGS`."""
        return (ce * self.position_weights(t, picked, shape)).sum()
