"""The elementwise regions of an RWKV-7 block (:mod:`rwkv_diffusion_rnn.models.rwkv7`), as pure functions.

The time-mix and channel-mix are a few matmuls surrounded by many elementwise operations on [B, T, C] tensors;
on a GPU the latter are memory-bound and, run one kernel each, cost more than the matmuls at the g1 sizes. They
are written here as pure functions of tensors so that
:func:`~rwkv_diffusion_rnn.models.rwkv7_compile.compile_regions` can hand them to ``torch.compile`` (which fuses each
region, forward and backward, into a few kernels) without touching the module code; the plain functions stay the
reference (tests/models/test_rwkv7_regions.py compares the two).

:data:`PLAIN` is the set the blocks use by default; ``rwkv7_compile.compile_regions`` swaps in compiled copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rwkv_diffusion_rnn.models import wkv_inputs
from rwkv_diffusion_rnn.models.sq_relu import sq_relu  # the channel-mix activation (an operator on CUDA)

#: RWKV-7 decays are exp(-exp(-0.5) * sigmoid(.)); exp(-0.5) = 0.6065306597...
DECAY_SCALE = math.exp(-0.5)


def _token_shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """``[B, T, C]`` -> the previous token's vector at every position (``prev`` ``[B, C]`` before position 0)."""
    return torch.cat([prev.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)


def tm_mix(x, shift, x_r, x_w, x_k, x_v, x_a, x_g, mm_dtype: torch.dtype | None = None):
    """Token shift and the six interpolations: x ``[B, T, C]``, shift ``[B, C]`` -> (xr, xw, xk, xv, xa, xg).

    All six only feed matmuls, so under autocast five are returned in its dtype ``mm_dtype``: the rounding autocast
    applies at the matmul, done once in the region (fused when compiled). ``xv`` stays as it is: it feeds two matmuls,
    and a bf16 tensor would sum their two gradients in bf16 where autocast sums them in fp32."""
    xx = _token_shift(x, shift) - x
    xr, xw, xk, xv, xa, xg = (x + xx * m for m in (x_r, x_w, x_k, x_v, x_a, x_g))
    return _cast(xr, mm_dtype), _cast(xw, mm_dtype), _cast(xk, mm_dtype), xv, _cast(xa, mm_dtype), _cast(xg, mm_dtype)


def tm_kernel_inputs(k, w_low, a_low, w0, a0, k_k, k_a, n_head: int):
    """The WKV operands besides r and v, all ``[B, T, C]``: log decay ``w`` (fp32), the gated key ``k``, the
    transition vectors ``-kk`` and ``kk * a`` (``kk`` the per-head normalised key, ``a`` the in-context rate).

    ``w_low`` = tanh(xw w1) w2 and ``a_low`` = (xa a1) a2 are the low-rank outputs."""
    # one hand-fused operator where it applies (CUDA, by default from width 768 on; models/wkv_inputs.py)
    if wkv_inputs.applies(k, w_low, a_low, n_head):
        return wkv_inputs.wkv_inputs(k, w_low, a_low, w0, a0, k_k, k_a, DECAY_SCALE)
    return tm_kernel_inputs_plain(k, w_low, a_low, w0, a0, k_k, k_a, n_head)


def tm_kernel_inputs_plain(k, w_low, a_low, w0, a0, k_k, k_a, n_head: int):
    """:func:`tm_kernel_inputs` as torch operations, never the operator: the reference the operator is checked
    against."""
    B, T, C = k.shape
    # log decay in fp32: the decay compounds over the sequence, bf16 would lose it
    w = -DECAY_SCALE * torch.sigmoid((w0 + w_low).float())
    a = torch.sigmoid(a0 + a_low)
    kk = F.normalize((k * k_k).view(B, T, n_head, C // n_head), dim=-1, p=2.0).view(B, T, C)
    k = k * (1 + (a - 1) * k_a)
    return w, k, -kk, kk * a


def tm_value_mix(v, v_first, v0, v_low):
    """Value residual (layers > 0): v moves towards layer 0's values by sigmoid(v0 + (xv v1) v2)."""
    return v + (v_first - v) * torch.sigmoid(v0 + v_low)


def tm_output(o, ln_weight, ln_bias, eps: float, r, k, v, r_k, g, n_head: int, mm_dtype: torch.dtype | None = None):
    """GroupNorm of the WKV output ``o`` ``[B, T, C]``, plus the per-head bonus (r . (k * r_k)) v, times the gate
    (in ``mm_dtype`` when given: the result only feeds the output projection)."""
    B, T, C = o.shape
    N = C // n_head
    o = F.group_norm(o.reshape(B * T, C), n_head, ln_weight, ln_bias, eps).view(B, T, C)
    bonus = (r * k * r_k.view(1, 1, C)).view(B, T, n_head, N).sum(-1, keepdim=True) * v.view(B, T, n_head, N)
    return _cast((o + bonus.view(B, T, C)) * g, mm_dtype)


def cm_mix(x, shift, x_k, mm_dtype: torch.dtype | None = None):
    """Channel-mix token shift: x ``[B, T, C]`` -> the FFN input (in ``mm_dtype`` when given, see :func:`tm_mix`)."""
    return _cast(x + (_token_shift(x, shift) - x) * x_k, mm_dtype)


def _cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None else x.to(dtype)


def matmul_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would cast ``x`` to at a matmul, or None (autocast off, or ``x`` not floating point)."""
    dev = x.device.type
    if not x.is_floating_point() or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


@dataclass(frozen=True)
class Regions:
    """The elementwise functions the blocks call: plain (:data:`PLAIN`) or compiled (:func:`compile_regions`)."""

    tm_mix: Callable = tm_mix
    tm_kernel_inputs: Callable = tm_kernel_inputs
    tm_value_mix: Callable = tm_value_mix
    tm_output: Callable = tm_output
    cm_mix: Callable = cm_mix
    sq_relu: Callable = sq_relu


PLAIN = Regions()
