"""The WKV output's GroupNorm, per-head bonus and gate (:func:`~rwkv_diffusion_rnn.models.rwkv7_regions.tm_output`)
as one operator with a hand-fused Triton forward and backward (CUDA, head size 64, under bf16 autocast; opt-in until
a GPU has timed it in the step: ``DIFFRWKV_TM_OUTPUT_OP=1``).

Per token and head (64 channels), with ``xhat`` the GroupNorm's normalised ``o``, ``s = sum(r k r_k)`` the bonus
weight and ``z = xhat ln_w + ln_b + s v``: ``y = z g``. The backward, from ``dy``::

    dg = dy z          dz = dy g          dv = dz s          ds = sum(dz v)
    dr = ds k r_k      dk = ds r r_k      do = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)),  dxhat = dz ln_w

and per channel, summed over tokens: ``d ln_w = dz xhat``, ``d ln_b = dz``, ``d r_k = ds r k``. A program holds
ROWS tokens of one head: the forward reads the five inputs once and writes ``y``; the backward reads them and ``dy``
once, recomputes the statistics in registers, writes the five input gradients and per-program partial sums of the
three parameters' gradients (summed after, in a fixed order: deterministic). Compiled by Inductor the same backward
is a combo kernel of 2.1 ms a 0.4B step on an H100 plus the GroupNorm's own kernels (2026-12-07 profile); BlinkDL's
hand-written pair takes 1.07 ms forward and 1.66 ms backward.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without Triton
    triton = None

#: ``DIFFRWKV_TM_OUTPUT_OP`` (read at import): "1" serves every call that qualifies (:func:`applies`); otherwise off
SWITCH = os.environ.get("DIFFRWKV_TM_OUTPUT_OP")
HEAD = 64
ROWS = 32  # tokens a program (a program: ROWS tokens x one head)


def applies(o, r, k, v, g, n_head: int, mm_dtype: torch.dtype | None) -> bool:
    """Whether the region may call the operator: switched on, CUDA, head size 64, the five operands of one shape and
    contiguous (bf16 or fp32), and the output feeding a bf16 matmul (autocast)."""
    # plain boolean tests (no generator): traced by torch.compile without a graph break
    return (
        triton is not None
        and SWITCH == "1"
        and mm_dtype == torch.bfloat16
        and o.is_cuda
        and o.dim() == 3
        and o.shape[-1] == n_head * HEAD
        and o.is_contiguous()
        and r.is_contiguous()
        and k.is_contiguous()
        and v.is_contiguous()
        and g.is_contiguous()
        and r.shape == o.shape
        and k.shape == o.shape
        and v.shape == o.shape
        and g.shape == o.shape
        and o.dtype in (torch.bfloat16, torch.float32)
        and r.dtype in (torch.bfloat16, torch.float32)
        and k.dtype in (torch.bfloat16, torch.float32)
        and v.dtype in (torch.bfloat16, torch.float32)
        and g.dtype in (torch.bfloat16, torch.float32)
    )


if triton is not None:
    from torch.library import triton_op, wrap_triton

    from rwkv_diffusion_rnn.models.tiles import load, tile

    # the forward's per-row values at this program's tile (ROWS tokens of one head), in fp32
    @triton.jit
    def _forward_tile(o_ptr, r_ptr, k_ptr, v_ptr, g_ptr, p_ptr, cols, mask, off, C, EPS: tl.constexpr,
                      HEAD: tl.constexpr):  # fmt: skip
        o = load(o_ptr, off, mask)
        mean = tl.sum(o, axis=1)[:, None] / HEAD
        diff = o - mean
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1)[:, None] / HEAD + EPS)
        xhat = diff * rstd
        # p: ln_w, ln_b, r_k as the rows of one [3, C] fp32 tensor
        lnw = tl.load(p_ptr + cols)[None, :]
        lnb = tl.load(p_ptr + C + cols)[None, :]
        rk = tl.load(p_ptr + 2 * C + cols)[None, :]
        r = load(r_ptr, off, mask)
        k = load(k_ptr, off, mask)
        v = load(v_ptr, off, mask)
        g = load(g_ptr, off, mask)
        s = tl.sum(r * k * rk, axis=1)[:, None]
        z = xhat * lnw + lnb + s * v
        return xhat, rstd, lnw, rk, r, k, v, g, s, z

    @triton.jit
    def _fwd_kernel(o_ptr, r_ptr, k_ptr, v_ptr, g_ptr, p_ptr, y_ptr, n_rows, C, EPS: tl.constexpr,
                    ROWS: tl.constexpr, HEAD: tl.constexpr):  # fmt: skip
        _, cols, live, off = tile(n_rows, C, ROWS, HEAD)  # addresses from scalars only: models/tiles.py
        mask = live[:, None]
        xhat, rstd, lnw, rk, r, k, v, g, s, z = _forward_tile(o_ptr, r_ptr, k_ptr, v_ptr, g_ptr, p_ptr, cols, mask, off,
                                                              C, EPS, HEAD)  # fmt: skip
        tl.store(y_ptr + off, (z * g).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(o_ptr, r_ptr, k_ptr, v_ptr, g_ptr, p_ptr, dy_ptr, do_ptr, dr_ptr, dk_ptr, dv_ptr, dg_ptr,
                    part_ptr, n_rows, C, EPS: tl.constexpr, ROWS: tl.constexpr, HEAD: tl.constexpr):  # fmt: skip
        pr = tl.program_id(0)
        _, cols, live, off = tile(n_rows, C, ROWS, HEAD)  # addresses from scalars only: models/tiles.py
        mask = live[:, None]
        xhat, rstd, lnw, rk, r, k, v, g, s, z = _forward_tile(o_ptr, r_ptr, k_ptr, v_ptr, g_ptr, p_ptr, cols, mask, off,
                                                              C, EPS, HEAD)  # fmt: skip
        dy = load(dy_ptr, off, mask)
        dz = dy * g
        ds = tl.sum(dz * v, axis=1)[:, None]
        dxhat = dz * lnw
        mean_d = tl.sum(dxhat, axis=1)[:, None] / HEAD
        mean_dx = tl.sum(dxhat * xhat, axis=1)[:, None] / HEAD
        d_o = rstd * (dxhat - mean_d - xhat * mean_dx)
        tl.store(do_ptr + off, d_o.to(do_ptr.dtype.element_ty), mask=mask)
        tl.store(dr_ptr + off, (ds * k * rk).to(dr_ptr.dtype.element_ty), mask=mask)
        tl.store(dk_ptr + off, (ds * r * rk).to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + off, (dz * s).to(dv_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + off, (dy * z).to(dg_ptr.dtype.element_ty), mask=mask)
        # the three parameter gradients, this program's rows summed: part[pr, j, c] (masked rows hold zeros)
        base = part_ptr + pr.to(tl.int64) * 3 * C + cols
        tl.store(base, tl.sum(dz * xhat, axis=0))
        tl.store(base + C, tl.sum(dz, axis=0))
        tl.store(base + 2 * C, tl.sum(ds * r * k, axis=0))

    def _grid(n_rows: int, C: int) -> tuple[int, int]:
        return (triton.cdiv(n_rows, ROWS), C // HEAD)

    @triton_op("diffrwkv::tm_output", mutates_args=())
    def tm_output_op(
        o: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, params: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:  # fmt: skip
        """((GroupNorm(o) + bonus) g) in bf16; ``params``: ln_w, ln_b, r_k as the rows of one contiguous ``[3, C]``
        fp32 tensor."""
        C = o.shape[-1]
        n_rows = o.numel() // C
        y = torch.empty(o.shape, device=o.device, dtype=torch.bfloat16)
        wrap_triton(_fwd_kernel)[_grid(n_rows, C)](o, r, k, v, g, params, y, n_rows, C, EPS=eps, ROWS=ROWS,
                                                   HEAD=HEAD)  # fmt: skip
        return y

    @triton_op("diffrwkv::tm_output_bwd", mutates_args=())
    def tm_output_bwd_op(
        o: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, params: torch.Tensor,
        dy: torch.Tensor, eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """(do, dr, dk, dv, dg, partial sums ``[programs, 3, C]`` fp32 of the three parameters' gradients)."""
        C = o.shape[-1]
        n_rows = o.numel() // C
        grid = _grid(n_rows, C)
        d_o, dr, dk, dv, dg = (torch.empty_like(x) for x in (o, r, k, v, g))
        part = torch.empty(grid[0], 3, C, device=o.device, dtype=torch.float32)
        wrap_triton(_bwd_kernel)[grid](o, r, k, v, g, params, dy, d_o, dr, dk, dv, dg, part, n_rows, C, EPS=eps,
                                       ROWS=ROWS, HEAD=HEAD)  # fmt: skip
        return d_o, dr, dk, dv, dg, part

    def _setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:6])
        ctx.eps = inputs[6]

    def _backward(ctx, dy):
        o, r, k, v, g, params = ctx.saved_tensors
        d_o, dr, dk, dv, dg, part = tm_output_bwd_op(o, r, k, v, g, params, dy.contiguous(), ctx.eps)
        return d_o, dr, dk, dv, dg, part.sum(0), None

    tm_output_op.register_autograd(_backward, setup_context=_setup_context)

    def tm_output(o, ln_weight, ln_bias, eps: float, r, k, v, r_k, g):
        """The region's ``tm_output`` under bf16 autocast through the operator (bf16 out). The three parameters reach
        the kernels as one new ``[3, C]`` fp32 tensor (not as views of a flat optimizer buffer: models/wkv_inputs.py
        says why)."""
        params = torch.stack([p.reshape(-1) for p in (ln_weight, ln_bias, r_k)]).float()
        return tm_output_op(o, r, k, v, g, params, float(eps))
