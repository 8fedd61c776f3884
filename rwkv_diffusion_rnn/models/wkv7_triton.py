"""Our own Triton kernels for the WKV-7 recurrence (backend ``triton`` of :mod:`rwkv_diffusion_rnn.models.wkv7`).

Same contract as :func:`~rwkv_diffusion_rnn.models.wkv7.wkv7_reference`: ``S[k, v]`` state, log decay ``w``,
operands ``[B, T, H, N]`` in any float dtype (mixed allowed; everything is computed in fp32), optional fp32 initial
state ``[B, H, N, N]``, output in ``r``'s dtype and the fp32 final state; differentiable in every operand and in the
initial state (and through the final state).

Design: both kernels walk time sequentially, with the state in registers (fp32), one program per (batch, head,
block of ``BV`` value columns): grid ``(N / BV, B * H)``.

*Forward*: the value columns of the state evolve independently (``S[:, j] <- d * S[:, j] + b (a . S[:, j]) + k v_j``),
so they split across programs with no communication. Each step reduces twice over the key axis (``sa = a^T S``,
``o = S^T r``). With gradients wanted it also saves, for the backward, ``sa_t`` (fp32 ``[B, T, H, N]``) and fp32
checkpoints of the state, transposed (``[B, H, ceil(T / C) + 1, N, N]``: the state before steps 0, C, 2C, ...,
then the final state).

*Backward*: walks time in reverse with the state ``S_t`` and its gradient ``G_t`` in registers (held transposed,
``[BV, N]``, so Triton spreads the keys over the lanes and keeps each thread's value rows in registers: five of
the seven reductions below run over values, in-thread). ``S_{t-1}`` is recovered by undoing the step,
``S_{t-1} = (S_t - k v^T - b sa^T) / d`` (``sa`` saved exactly by the forward), and replaced by the exact
checkpoint at every chunk start, so rounding is amplified by at most ``exp(-w)^(C - 1)`` before it is discarded:
RWKV-7 keeps ``w >= -exp(-0.5)``, i.e. at most ``1.83^15 ~ 9e3`` for C = 16 in a channel whose decay sits at its
floor (~1e-4 relative measured with every decay there), ~30x for typical decays (~4e-6). Per step::

    G += r do^T                      dr = S_t do         dk = G v      dv = G^T k
    dw = d * rowsum(G * S_{t-1})     db = G sa           dsa = G^T b   da = S_{t-1} dsa
    G  <- diag(d) G + a dsa^T        (the gradient w.r.t. S_{t-1})

``dv`` and ``dsa`` reduce over keys (complete inside a program); ``dr, dk, dw, db, da`` reduce over values, so when
the values are split (``BV < N``) the programs add their parts atomically into fp32 buffers (then cast to the
operands' dtypes); with ``BV == N`` they store directly. ``G`` after step 0 is the initial state's gradient.

Both kernels load the next step's vectors one step ahead (register double buffering). Launch parameters are in
:data:`CONFIG`; ``bench/gpu_check_wkv.py --sweep`` times the alternatives on a GPU. The defaults (one warp a
program; BV = 8 forward, <= 150 registers; BV = 16 backward, 255 registers) compile for sm_90 without spills and put
every program of B = 16, H = 12 or 16, N = 64 on the GPU at once (a whole-head backward, BV = 64, spills at 4 warps
and needs more than 128 registers a thread at 8: one program per SM, two waves).

Measured on an H200 (docs/RESULTS.md, 2026-11-27): correct to one bf16 rounding against the fp64
recurrence, and 1.6x fla's chunk kernel timed alone (1.52 vs 2.39 ms fwd + bwd at B16 T512 H12) — but slower inside
the CUDA-graphed training step (23.7 vs ~15 ms of WKV kernels a step at the 0.1B shape), where fla's launch cost
vanishes and its parallel-in-time chunks win over these 512 dependent steps. Hence opt-in; ``auto`` picks fla.
The backward (1.58 ms a layer in the step) is where a faster design would start.

Under ``TRITON_INTERPRET=1`` at import (Triton's CPU interpreter) the kernels accept CPU tensors; that is how the
tests run them without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rwkv_diffusion_rnn.errors import DiffRwkvError

#: Whether the kernels were built for Triton's interpreter (decided when ``triton.jit`` runs, at import).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class TritonWKVConfig:
    """Launch parameters. ``fwd_bv`` / ``bwd_bv``: value columns per program (clipped to N); ``chunk``: steps
    between the backward's state checkpoints (memory ``4 N^2 B H T / chunk`` bytes; a smaller chunk bounds the
    re-synchronisation error tighter)."""

    fwd_bv: int = 8
    fwd_warps: int = 1
    bwd_bv: int = 16
    bwd_warps: int = 1
    chunk: int = 16


CONFIG = TritonWKVConfig()


@triton.jit
def _step_vectors(r, w, k, a, b, v, at, offs_k, offs_v):
    """One step's key-side vectors r, w, k, a, b and the program's block of v, at element offset ``at``, in fp32."""
    return (
        tl.load(r + at + offs_k).to(tl.float32),
        tl.load(w + at + offs_k).to(tl.float32),
        tl.load(k + at + offs_k).to(tl.float32),
        tl.load(a + at + offs_k).to(tl.float32),
        tl.load(b + at + offs_k).to(tl.float32),
        tl.load(v + at + offs_v).to(tl.float32),
    )


@triton.jit(do_not_specialize=["T", "NC"])
def _wkv7_fwd_kernel(
    r,
    w,
    k,
    v,
    a,
    b,
    h0,
    o,
    ht,
    sa_buf,
    ckpt,
    T,
    NC,
    H: tl.constexpr,
    N: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    HAS_H0: tl.constexpr,
    SAVE: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    mat = offs_k[:, None] * N + offs_v[None, :]  # [N, BV] offsets inside one N x N state, S[k, v]
    matT = offs_k[:, None] + offs_v[None, :] * N  # the same elements of the transposed state S^T (checkpoints)
    if HAS_H0:
        S = tl.load(h0 + i_bh * N * N + mat).to(tl.float32)
    else:
        S = tl.zeros([N, BV], dtype=tl.float32)

    base = (i_b * T * H + i_h) * N  # element (b, t = 0, h, 0) of a [B, T, H, N] tensor
    step = H * N
    # step 0's vectors; each iteration then loads the next step's while it computes (register double buffering)
    rn, wn, kn, an, bn, vn = _step_vectors(r, w, k, a, b, v, base, offs_k, offs_v)
    for t in range(T):
        r_t, w_t, k_t, a_t, b_t, v_t = rn, wn, kn, an, bn, vn
        nxt = base + tl.minimum(t + 1, T - 1) * step
        rn, wn, kn, an, bn, vn = _step_vectors(r, w, k, a, b, v, nxt, offs_k, offs_v)

        if SAVE:
            if t % C == 0:  # the state before every C-th step: the backward's re-synchronisation points
                tl.store(ckpt + (i_bh * (NC + 1) + t // C) * N * N + matT, S)
        sa = tl.sum(a_t[:, None] * S, axis=0)
        S = tl.exp(w_t)[:, None] * S + b_t[:, None] * sa[None, :] + k_t[:, None] * v_t[None, :]
        o_t = tl.sum(r_t[:, None] * S, axis=0)
        cur = base + t * step
        tl.store(o + cur + offs_v, o_t.to(o.dtype.element_ty))
        if SAVE:
            tl.store(sa_buf + cur + offs_v, sa)
    tl.store(ht + i_bh * N * N + mat, S)
    if SAVE:
        tl.store(ckpt + (i_bh * (NC + 1) + NC) * N * N + matT, S)


@triton.jit(do_not_specialize=["T", "NC"])
def _wkv7_bwd_kernel(
    r,
    w,
    k,
    v,
    a,
    b,
    do,
    sa_buf,
    ckpt,
    dhtT,
    dr,
    dw,
    dk,
    dv,
    da,
    db,
    dh0T,
    T,
    NC,
    H: tl.constexpr,
    N: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    HAS_DHT: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    # tiles hold the TRANSPOSED state, ST[v, k] = S[k, v]: [BV, N]
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    matT = offs_v[:, None] * N + offs_k[None, :]  # [BV, N] offsets inside one transposed N x N state
    S = tl.load(ckpt + (i_bh * (NC + 1) + NC) * N * N + matT)  # S_{T-1}
    if HAS_DHT:
        G = tl.load(dhtT + i_bh * N * N + matT)
    else:
        G = tl.zeros([BV, N], dtype=tl.float32)

    base = (i_b * T * H + i_h) * N
    step = H * N
    last = base + (T - 1) * step
    rn, wn, kn, an, bn, vn = _step_vectors(r, w, k, a, b, v, last, offs_k, offs_v)
    don = tl.load(do + last + offs_v).to(tl.float32)
    san = tl.load(sa_buf + last + offs_v)
    for i in range(T):
        t = T - 1 - i
        r_t, w_t, k_t, a_t, b_t, v_t, do_t, sa_t = rn, wn, kn, an, bn, vn, don, san
        nxt = base + tl.maximum(t - 1, 0) * step
        rn, wn, kn, an, bn, vn = _step_vectors(r, w, k, a, b, v, nxt, offs_k, offs_v)
        don = tl.load(do + nxt + offs_v).to(tl.float32)
        san = tl.load(sa_buf + nxt + offs_v)

        G += do_t[:, None] * r_t[None, :]  # now dL/dS_t
        d_t = tl.exp(w_t)
        if t % C == 0:
            S_prev = tl.load(ckpt + (i_bh * (NC + 1) + t // C) * N * N + matT)
        else:  # undo the step (sa_t is exact, saved by the forward)
            S_prev = (S - v_t[:, None] * k_t[None, :] - sa_t[:, None] * b_t[None, :]) * tl.exp(-w_t)[None, :]
        dsa = tl.sum(G * b_t[None, :], axis=1)
        dv_t = tl.sum(G * k_t[None, :], axis=1)
        dr_t = tl.sum(S * do_t[:, None], axis=0)
        dk_t = tl.sum(G * v_t[:, None], axis=0)
        dw_t = tl.sum(G * S_prev, axis=0) * d_t
        db_t = tl.sum(G * sa_t[:, None], axis=0)
        da_t = tl.sum(S_prev * dsa[:, None], axis=0)
        G = G * d_t[None, :] + dsa[:, None] * a_t[None, :]  # dL/dS_{t-1}
        S = S_prev

        cur = base + t * step
        tl.store(dv + cur + offs_v, dv_t.to(dv.dtype.element_ty))
        if ATOMIC:  # value columns split across programs: each adds its part (fp32 buffers)
            tl.atomic_add(dr + cur + offs_k, dr_t, sem="relaxed")
            tl.atomic_add(dk + cur + offs_k, dk_t, sem="relaxed")
            tl.atomic_add(dw + cur + offs_k, dw_t, sem="relaxed")
            tl.atomic_add(da + cur + offs_k, da_t, sem="relaxed")
            tl.atomic_add(db + cur + offs_k, db_t, sem="relaxed")
        else:
            tl.store(dr + cur + offs_k, dr_t.to(dr.dtype.element_ty))
            tl.store(dk + cur + offs_k, dk_t.to(dk.dtype.element_ty))
            tl.store(dw + cur + offs_k, dw_t.to(dw.dtype.element_ty))
            tl.store(da + cur + offs_k, da_t.to(da.dtype.element_ty))
            tl.store(db + cur + offs_k, db_t.to(db.dtype.element_ty))
    tl.store(dh0T + i_bh * N * N + matT, G)


def _block(bv: int, N: int) -> int:
    bv = min(bv, N)
    if bv < 1 or bv & (bv - 1):
        raise DiffRwkvError(f"triton WKV block size must be a power of two, got {bv}")
    return bv


def _on_device(x: torch.Tensor):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _forward(r, w, k, v, a, b, state, save: bool):
    B, T, H, N = r.shape
    C = CONFIG.chunk
    NC = triton.cdiv(T, C) if save else 0
    BV = _block(CONFIG.fwd_bv, N)
    f32 = torch.float32
    o = torch.empty_like(r)
    ht = torch.empty(B, H, N, N, device=r.device, dtype=f32)
    sa = torch.empty(B, T, H, N, device=r.device, dtype=f32) if save else ht  # ht: a dummy pointer, never used
    # checkpoints, transposed (S^T, contiguous along k): the state before steps 0, C, 2C, ..., then the final state
    ckpt = torch.empty(B, H, NC + 1, N, N, device=r.device, dtype=f32) if save else ht
    with _on_device(r):
        _wkv7_fwd_kernel[(N // BV, B * H)](
            r, w, k, v, a, b, state if state is not None else ht, o, ht, sa, ckpt, T, NC,
            H=H, N=N, BV=BV, C=C, HAS_H0=state is not None, SAVE=save,
            num_warps=CONFIG.fwd_warps, num_stages=1,
        )  # fmt: skip
    return o, ht, sa, ckpt


class _WKV7Triton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, state):
        o, ht, sa, ckpt = _forward(r, w, k, v, a, b, state, save=True)
        ctx.save_for_backward(r, w, k, v, a, b, sa, ckpt)
        ctx.chunk = CONFIG.chunk
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        r, w, k, v, a, b, sa, ckpt = ctx.saved_tensors
        B, T, H, N = r.shape
        do = torch.zeros_like(r) if do is None else do.contiguous()
        BV = _block(CONFIG.bwd_bv, N)
        atomic = BV < N
        f32 = torch.float32
        if atomic:  # five partial sums per element over the value blocks: fp32 accumulators, cast at the end
            acc = torch.zeros(5, B, T, H, N, device=r.device, dtype=f32)
            dr, dw, dk, da, db = acc.unbind(0)
        else:
            dr, dw, dk, da, db = (torch.empty_like(x) for x in (r, w, k, a, b))
        dv = torch.empty_like(v)
        dh0T = torch.empty(B, H, N, N, device=r.device, dtype=f32)
        dhtT = dht.float().transpose(-1, -2).contiguous() if dht is not None else dh0T  # kernel-side: S^T layout
        with _on_device(r):
            _wkv7_bwd_kernel[(N // BV, B * H)](
                r, w, k, v, a, b, do, sa, ckpt, dhtT,
                dr, dw, dk, dv, da, db, dh0T, T, ckpt.shape[2] - 1,
                H=H, N=N, BV=BV, C=ctx.chunk, HAS_DHT=dht is not None, ATOMIC=atomic,
                num_warps=CONFIG.bwd_warps, num_stages=1,
            )  # fmt: skip
        if atomic:
            dr, dw, dk, da, db = (g.to(x.dtype) for g, x in zip((dr, dw, dk, da, db), (r, w, k, a, b), strict=True))
        dh0 = dh0T.transpose(-1, -2).contiguous() if ctx.needs_input_grad[6] else None
        return dr, dw, dk, dv, da, db, dh0


def wkv7_triton(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential Triton WKV-7; same contract as :func:`~rwkv_diffusion_rnn.models.wkv7.wkv7_reference`."""
    if not (r.is_cuda or INTERPRET):
        raise DiffRwkvError("WKV backend 'triton' runs on CUDA tensors only; use backend 'reference' on the CPU")
    B, T, H, N = r.shape
    if N < 2 or N & (N - 1) or N > 128:
        raise DiffRwkvError(f"WKV backend 'triton' needs a power-of-two head size in [2, 128], got {N}")
    if T * H * N >= 2**31:  # in-kernel time offsets are int32
        raise DiffRwkvError(f"WKV backend 'triton': T * H * N = {T * H * N} too large (< 2^31)")
    for name, x in zip("wkvab", (w, k, v, a, b), strict=True):
        if x.shape != r.shape:
            raise DiffRwkvError(f"WKV operand {name} has shape {tuple(x.shape)}, expected {tuple(r.shape)}")
    if state is not None and state.shape != (B, H, N, N):
        raise DiffRwkvError(f"WKV state has shape {tuple(state.shape)}, expected {(B, H, N, N)}")
    if T == 0:  # no steps: an empty output, and the state passes through in fp32 (as the reference's)
        return r.new_zeros(B, 0, H, N), state.float() if state is not None else r.new_zeros(
            B, H, N, N, dtype=torch.float32
        )
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    if state is not None:
        state = state.float().contiguous()
    operands = (r, w, k, v, a, b, state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in operands):
        return _WKV7Triton.apply(*operands)
    o, ht, _, _ = _forward(*operands, save=False)
    return o, ht
