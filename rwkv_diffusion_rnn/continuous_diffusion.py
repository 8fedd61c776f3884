"""Gaussian variance-preserving diffusion of the 32-d sentence latent, in continuous time.

Forward process ``z_t = alpha(t) * z0 + sigma(t) * eps`` with ``alpha^2 + sigma^2 = 1`` (VP; Ho et al. 2020,
Kingma et al. 2021 "Variational Diffusion Models" for the continuous-time view), the cosine schedule of Nichol &
Dhariwal 2021 ("Improved DDPM"), and three interchangeable network outputs (Salimans & Ho 2022, "Progressive
Distillation", §4 for ``v``):

    eps:  the noise            x0:  the clean latent            v = alpha * eps - sigma * z0

The conversions between them (:meth:`GaussianDiffusion.predict_x0` / ``predict_eps``) are what the
DDPM / DDIM samplers use, so sampling always matches the training parameterisation. Latents are standardised per
dimension with statistics of the training set (:class:`LatentNormalizer`) before any of this.

Time convention (shared with the text clock, see ``diffusion_process.py``): ``t`` is ``[B]`` in ``[0, 1]``;
``t = 0`` is exactly clean (``alpha = 1``, ``sigma = 0``: the "clean condition" of latent -> text rows) and training
draws ``t`` from ``(t_min, 1]``. No weights live here: the model's output comes in as a tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rwkv_diffusion_rnn.errors import DiffRwkvError

__all__ = [
    "CosineVPSchedule",
    "GaussianDiffusion",
    "LATENT_SCHEDULES",
    "LatentNormalizer",
    "PREDICTIONS",
    "build_latent_schedule",
]


def _float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (bf16/fp16 model outputs are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class CosineVPSchedule:
    """Cosine VP schedule (Nichol & Dhariwal 2021, eq. 17) in continuous time.

    With ``tau = t * t_max`` and the angle left to pi/2, ``psi(tau) = (pi/2) * (1 - tau) / (1 + s)``::

        alpha(t) = sin(psi(tau)) / sin(psi(0))          (= cos((tau + s)/(1 + s) * pi/2) / cos(s/(1 + s) * pi/2))
        sigma(t) = sqrt(1 - alpha(t)^2) = sqrt(sin(psi(0) - psi) * sin(psi(0) + psi)) / sin(psi(0))

    The second form of sigma has no cancellation near t = 0, and ``t = 0`` gives ``alpha = 1``, ``sigma = 0``
    exactly in floating point. ``alpha^2 + sigma^2 = 1`` holds to rounding, alpha falls and sigma rises strictly.

    Args:
        s: Nichol & Dhariwal's offset, keeps the first noise levels from being too small (default 0.008).
        t_min: smallest training time: training draws from ``(t_min, 1]`` (``sample_uniform_t``). Samplers may
            stop there too.
        t_max: ``t = 1`` maps to the cosine curve's ``tau = t_max < 1``, so ``alpha(1) > 0`` and every conversion
            is finite. The default 0.999 gives ``alpha(1) ~ 1.6e-3``, a log-SNR ``log(alpha^2 / sigma^2)`` of ~ -12.9
            at t = 1: z_1 is pure noise for practical purposes (KL to N(0, I) ~ 0.5 * D * alpha^2 ~ 4e-5 nats for
            D = 32). Time is rescaled, not clamped, so no part of (0, 1] is wasted on a repeated noise level.
    """

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.999) -> None:
        if not s > 0.0:
            raise DiffRwkvError(f"CosineVPSchedule s must be > 0, got {s}")
        if not 0.0 < t_max < 1.0:
            raise DiffRwkvError(f"CosineVPSchedule t_max must be in (0, 1) so that alpha(1) > 0, got {t_max}")
        if not 0.0 <= t_min < 1.0:
            raise DiffRwkvError(f"CosineVPSchedule t_min must be in [0, 1), got {t_min}")
        self.s = float(s)
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        self._psi0 = (math.pi / 2) / (1.0 + self.s)

    def __repr__(self) -> str:
        return f"CosineVPSchedule(s={self.s}, t_min={self.t_min}, t_max={self.t_max})"

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha(t), sigma(t))``, each shaped like ``t`` (float32 or wider); ``t`` is clamped to ``[0, 1]``."""
        tau = _float(t).clamp(0.0, 1.0) * self.t_max
        delta = (math.pi / 2) * tau / (1.0 + self.s)  # psi(0) - psi(tau), computed without cancellation
        psi0 = torch.full_like(tau, self._psi0)
        psi = psi0 - delta
        sin_psi0 = torch.sin(psi0)
        alpha = torch.sin(psi) / sin_psi0
        sigma = torch.sqrt(torch.sin(delta) * torch.sin(psi0 + psi)) / sin_psi0
        return alpha, sigma


#: Latent noise schedules by config name; add one line to add a schedule.
LATENT_SCHEDULES: dict[str, type[CosineVPSchedule]] = {"cosine": CosineVPSchedule}


def build_latent_schedule(name: str, **kwargs: float) -> CosineVPSchedule:
    """Build a latent schedule by name, e.g. ``build_latent_schedule("cosine", s=0.008)``."""
    try:
        cls = LATENT_SCHEDULES[name]
    except KeyError:
        raise DiffRwkvError(
            f"unknown latent noise schedule {name!r}; expected one of {sorted(LATENT_SCHEDULES)}"
        ) from None
    return cls(**kwargs)


_Pair = tuple[torch.Tensor, torch.Tensor]

#: prediction -> (model_out, z_t, alpha, sigma) -> (x0, eps). Each inverts ``z_t = alpha x0 + sigma eps`` given
#: one of (eps, x0, v); for v: x0 = alpha z_t - sigma v, eps = sigma z_t + alpha v (uses alpha^2 + sigma^2 = 1).
_TO_X0_EPS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], _Pair]] = {
    "eps": lambda out, z, a, s: ((z - s * out) / a, out),
    "x0": lambda out, z, a, s: (out, (z - a * out) / s),
    "v": lambda out, z, a, s: (a * z - s * out, s * z + a * out),
}

#: prediction -> (z0, eps, alpha, sigma) -> what the network is trained to output.
_TARGETS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "eps": lambda z0, eps, a, s: eps,
    "x0": lambda z0, eps, a, s: z0,
    "v": lambda z0, eps, a, s: a * eps - s * z0,
}

#: The network output parameterisations (config ``diffusion.latent_prediction``).
PREDICTIONS: tuple[str, ...] = tuple(_TARGETS)


class GaussianDiffusion:
    """Training-side VP diffusion around any denoiser: ``q(z_t | z0)``, targets, conversions, loss.

    Shapes: latents are ``[B, D]`` (any trailing shape works, ``[B, ...]``); times ``[B]``. Everything is computed in
    float32 at least, so bf16 model outputs are upcast before they are compared or converted.

    Args:
        schedule: the noise schedule (e.g. :class:`CosineVPSchedule`).
        prediction: what the network outputs: ``"eps"``, ``"x0"`` or ``"v"`` (Salimans & Ho 2022).
        antithetic: draw training times with the low-discrepancy sampler (see ``sample_uniform_t``).

    Conditioning at the ends: x0 from an eps-output divides by alpha (small near t = 1), eps from an x0-output
    divides by sigma (0 at t = 0, where it is undefined); the v-form is well conditioned everywhere.
    """

    def __init__(self, schedule: CosineVPSchedule, prediction: str = "eps", antithetic: bool = True) -> None:
        if prediction not in _TARGETS:
            raise DiffRwkvError(f"unknown latent prediction {prediction!r}; expected one of {list(PREDICTIONS)}")
        self.schedule = schedule
        self.prediction = prediction
        self.antithetic = bool(antithetic)

    def __repr__(self) -> str:
        return f"GaussianDiffusion({self.schedule!r}, prediction={self.prediction!r}, antithetic={self.antithetic})"

    def _coeffs(self, t: torch.Tensor, like: torch.Tensor) -> _Pair:
        """``alpha, sigma`` of ``t [B]`` shaped ``[B, 1, ...]`` to broadcast against ``like [B, ...]``."""
        if t.shape != like.shape[:1]:
            raise DiffRwkvError(
                f"t must be [B] = [{like.shape[0]}] for a tensor of shape {list(like.shape)}, got {list(t.shape)}"
            )
        alpha, sigma = self.schedule.alpha_sigma(t)
        shape = (-1,) + (1,) * (like.dim() - 1)
        dtype = torch.promote_types(like.dtype, torch.float32)
        return alpha.to(dtype).view(shape), sigma.to(dtype).view(shape)

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``z_t = alpha(t) z0 + sigma(t) noise``, ``[B, D]``; ``t = 0`` returns ``z0`` exactly."""
        a, s = self._coeffs(t, z0)
        return a * _float(z0) + s * _float(noise)

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output for ``z_t = q_sample(z0, t, noise)``, ``[B, D]``."""
        a, s = self._coeffs(t, z0)
        return _TARGETS[self.prediction](_float(z0), _float(noise), a, s)

    def predict_x0(self, model_out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent implied by the network output at ``(z_t, t)``, ``[B, D]``."""
        if self.prediction == "x0":
            return _float(model_out)
        a, s = self._coeffs(t, z_t)
        return _TO_X0_EPS[self.prediction](_float(model_out), _float(z_t), a, s)[0]

    def predict_eps(self, model_out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise implied by the network output at ``(z_t, t)``, ``[B, D]``."""
        if self.prediction == "eps":
            return _float(model_out)
        a, s = self._coeffs(t, z_t)
        return _TO_X0_EPS[self.prediction](_float(model_out), _float(z_t), a, s)[1]

    def loss(
        self,
        model_out: torch.Tensor,
        z0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        weight: torch.Tensor | None = None,
        reduction: str = "mean",
        stats: bool = True,
    ) -> tuple[torch.Tensor, dict[str, float] | None]:
        """MSE between the network output and :meth:`target`, averaged over latent dims, then over rows.

        Args:
            model_out: ``[B, D]`` network output in this parameterisation (any float dtype).
            z0, noise: ``[B, D]`` the clean (standardised) latent and the noise given to :meth:`q_sample`.
            t: ``[B]`` times.
            weight: optional ``[B]`` row weights (float or bool). Rows with weight 0 are excluded entirely, even if
                their output is NaN; pass ``t > 0`` to drop clean-condition rows, whose eps target is unlearnable.
            reduction: ``"mean"`` (weighted mean over rows: ``sum(w * mse) / sum(w)``, 0 if every row is
                excluded) or ``"sum"`` (``sum(w * mse)``, for a trainer that normalises by an all-reduced count).
            stats: also return the stats below; reading them waits for the device, so a training step passes
                False (host_sync.py) and gets None.

        Returns:
            ``(loss 0-d, stats)`` with float stats ``loss``, ``mse`` (mean over included rows) and ``n_rows``.
        """
        if reduction not in ("mean", "sum"):
            raise DiffRwkvError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if model_out.shape != z0.shape or noise.shape != z0.shape:
            raise DiffRwkvError(
                f"model_out, z0 and noise must share one shape, got {list(model_out.shape)}, {list(z0.shape)}, "
                f"{list(noise.shape)}"
            )
        b = z0.shape[0]
        if weight is None:
            w = torch.ones(b, dtype=torch.promote_types(z0.dtype, torch.float32), device=z0.device)
        else:
            if weight.shape != (b,):
                raise DiffRwkvError(f"weight must be [B] = [{b}], got {list(weight.shape)}")
            w = weight.to(torch.promote_types(z0.dtype, torch.float32))
        keep = w != 0
        diff = _float(model_out) - self.target(z0, noise, t)  # [B, D]
        # Zero excluded rows before squaring, so a NaN there reaches neither the loss nor the gradient.
        diff = torch.where(keep.view((-1,) + (1,) * (diff.dim() - 1)), diff, torch.zeros_like(diff))
        err = diff.square().flatten(1).mean(dim=1)  # [B]
        total = (w * err).sum()
        tiny = torch.finfo(err.dtype).tiny
        loss = total if reduction == "sum" else total / w.sum().clamp_min(tiny)
        if not stats:
            return loss, None
        with torch.no_grad():
            n_rows = keep.to(err.dtype).sum()
            values = torch.stack([loss.detach(), err.sum() / n_rows.clamp_min(1.0), n_rows]).tolist()
        return loss, dict(zip(("loss", "mse", "n_rows"), values, strict=True))


class LatentNormalizer:
    """Per-dimension standardisation ``(z - mean) / std`` with statistics of the training set's latents.

    Stored with the data and in every checkpoint (``state_dict`` is plain JSON), so training, sampling and
    evaluation standardise identically. ``mean`` and ``std`` are ``[D]``; ``std`` must be finite and > 0.
    """

    def __init__(
        self, mean: Sequence[float] | np.ndarray | torch.Tensor, std: Sequence[float] | np.ndarray | torch.Tensor
    ):
        mean_a = np.asarray(_to_numpy(mean), dtype=np.float64)
        std_a = np.asarray(_to_numpy(std), dtype=np.float64)
        if mean_a.ndim != 1 or std_a.shape != mean_a.shape or mean_a.size == 0:
            raise DiffRwkvError(f"latent mean and std must both be [D], got shapes {mean_a.shape} and {std_a.shape}")
        bad_mean = np.flatnonzero(~np.isfinite(mean_a))
        if bad_mean.size:
            raise DiffRwkvError(
                f"latent mean of dimension {bad_mean[0]} is {mean_a[bad_mean[0]]}; expected a finite value"
            )
        bad_std = np.flatnonzero(~(np.isfinite(std_a) & (std_a > 0)))
        if bad_std.size:
            k = bad_std[0]
            raise DiffRwkvError(
                f"latent std of dimension {k} is {std_a[k]}; expected a finite value > 0 (a constant dimension?)"
            )
        self.mean = mean_a
        self.std = std_a
        self._cache: dict[tuple[torch.device, torch.dtype], _Pair] = {}

    @property
    def dim(self) -> int:
        return int(self.mean.size)

    def __repr__(self) -> str:
        return f"LatentNormalizer(dim={self.dim})"

    @classmethod
    def from_latents(cls, latents: np.ndarray | torch.Tensor | Sequence[Sequence[float]]) -> LatentNormalizer:
        """Statistics of training latents ``[N, D]`` (N >= 2): mean and population std per dim, in float64."""
        x = np.asarray(_to_numpy(latents), dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise DiffRwkvError(f"latents for normalisation statistics must be [N >= 2, D], got shape {x.shape}")
        if not np.isfinite(x).all():
            row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise DiffRwkvError(f"latent row {row} has a non-finite value; expected finite latents")
        return cls(x.mean(axis=0), x.std(axis=0))

    def state_dict(self) -> dict[str, list[float]]:
        """``{"mean": [D floats], "std": [D floats]}``, JSON-able."""
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> LatentNormalizer:
        """Inverse of :meth:`state_dict`."""
        missing = [k for k in ("mean", "std") if k not in state]
        if missing:
            raise DiffRwkvError(f"latent normaliser state lacks {missing}; expected keys 'mean' and 'std'")
        return cls(state["mean"], state["std"])

    def _stats(self, z: torch.Tensor) -> _Pair:
        if z.shape[-1:] != (self.dim,):
            raise DiffRwkvError(f"latent has {z.shape[-1] if z.dim() else 0} dims, the normaliser {self.dim}")
        dtype = torch.promote_types(z.dtype, torch.float32)
        key = (z.device, dtype)
        if key not in self._cache:  # one host -> device copy per device and dtype
            self._cache[key] = (
                torch.as_tensor(self.mean, dtype=dtype, device=z.device),
                torch.as_tensor(self.std, dtype=dtype, device=z.device),
            )
        return self._cache[key]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """``(z - mean) / std`` over the last dim, ``[..., D]`` (float32 or wider)."""
        mean, std = self._stats(z)
        return (_float(z) - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """``z * std + mean``, the inverse of :meth:`normalize`."""
        mean, std = self._stats(z)
        return _float(z) * std + mean


def _to_numpy(x: Any) -> Any:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else x
