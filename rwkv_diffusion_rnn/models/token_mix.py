"""The time-mix's token shift and six interpolations (:func:`~rwkv_diffusion_rnn.models.rwkv7_regions.tm_mix`) as
one operator with a hand-fused Triton forward and backward (CUDA, under bf16 autocast; opt-in until a GPU has timed
it in the step: ``DIFFRWKV_TM_MIX_OP=1``), and the channel-mix's one interpolation
(:func:`~rwkv_diffusion_rnn.models.rwkv7_regions.cm_mix`) the same way (``DIFFRWKV_CM_MIX_OP=1``).

Compiled by Inductor, the region's backward reads the six inputs' gradients twice: once in a reduction kernel for
the six mix vectors' per-channel sums (88 us a call at the 0.4B width on an H100, ~2.2 TB/s) and again where it forms
the gradient of ``x`` (fused into the layer norm's backward). Here one pass reads each gradient once (the next
token's, which the shift sends back, from the cache), writes the gradient of ``x`` and per-program partial sums of
the six parameters' gradients (summed after, in a fixed order: deterministic).

The value input feeds two matmuls (the value projection and, after the first layer, the low-rank value residual), so
the operator returns it twice, in bf16: each matmul's gradient then reaches the backward kernel apart and is summed
there in fp32, where a single bf16 output would have them summed in bf16 and a single fp32 output would need a cast
at each matmul and a materialised fp32 sum. The interpolations are computed in fp32 from ``x`` (no bf16 rounding of
``shift - x`` in between, as Inductor's fused code does it too) and rounded once to bf16.
"""

from __future__ import annotations

import os

import torch

from rwkv_diffusion_rnn.models.kept import kept

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without Triton
    triton = None

#: ``DIFFRWKV_TM_MIX_OP`` (read at import): "1" serves every call that qualifies (:func:`applies`); otherwise off
SWITCH = os.environ.get("DIFFRWKV_TM_MIX_OP")
ROWS = 32  # tokens a program
COLS = 64  # channels a program
N_MIX = 6  # x_r, x_w, x_k, x_v, x_a, x_g


def applies(x: torch.Tensor, shift: torch.Tensor, mm_dtype: torch.dtype | None) -> bool:
    """Whether the region may call the operator: switched on, CUDA, ``x`` ``[B, T, C]`` contiguous with C a multiple
    of :data:`COLS`, ``shift`` ``[B, C]``, and the matmuls in bf16 (autocast)."""
    # plain boolean tests (no generator): traced by torch.compile without a graph break
    return SWITCH == "1" and _qualifies(x, shift, mm_dtype)


def _qualifies(x: torch.Tensor, shift: torch.Tensor, mm_dtype: torch.dtype | None) -> bool:
    return (
        triton is not None
        and mm_dtype == torch.bfloat16
        and x.is_cuda
        and x.dim() == 3
        and x.is_contiguous()
        and x.shape[-1] % COLS == 0
        and x.dtype in (torch.bfloat16, torch.float32)
        and shift.dim() == 2
        and shift.shape[0] == x.shape[0]
        and shift.shape[1] == x.shape[2]
    )


#: ``DIFFRWKV_CM_MIX_OP`` (read at import): "1" serves the channel-mix's token shift too (:func:`cm_mix`)
CM_SWITCH = os.environ.get("DIFFRWKV_CM_MIX_OP")
#: ``DIFFRWKV_MIX_OP_KEEP`` (read at import): "1" marks the operators' outputs for the partitioner to save
#: (models/kept.py). The matmuls' weight gradients need them: left to the partitioner under a memory budget, it may
#: run the forward again in the backward (reading x, writing the outputs: ~8 [T, C] passes a layer for the
#: time-mix), kept they cost their memory (seven bf16 [T, C] tensors a layer). Which pays is for a GPU to say.
KEEP = os.environ.get("DIFFRWKV_MIX_OP_KEEP") == "1"


def applies_cm(x: torch.Tensor, shift: torch.Tensor, mm_dtype: torch.dtype | None) -> bool:
    """:func:`applies` for the channel-mix's one interpolation, under its own switch."""
    return CM_SWITCH == "1" and _qualifies(x, shift, mm_dtype)


if triton is not None:
    from torch.library import triton_op, wrap_triton

    from rwkv_diffusion_rnn.models.tiles import tile

    # x at this program's tile and the previous token's x minus it (the shift), in fp32
    @triton.jit
    def _shifted(x_ptr, prev_ptr, rows, cols, live, off, T, C):
        t = rows % T
        x = tl.load(x_ptr + off, mask=live[:, None], other=0.0).to(tl.float32)
        before = tl.load(x_ptr + off - C, mask=(live & (t > 0))[:, None], other=0.0).to(tl.float32)
        # position 0 takes the carried state, cast to x's dtype first (as the region's token shift does)
        at_prev = prev_ptr + (rows // T)[:, None].to(tl.int64) * C + cols[None, :]
        first = tl.load(at_prev, mask=(live & (t == 0))[:, None], other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
        sx = tl.where((t > 0)[:, None], before, first)
        return x, sx - x

    @triton.jit
    def _fwd_kernel(x_ptr, prev_ptr, p_ptr, r_ptr, w_ptr, k_ptr, v_ptr, v2_ptr, a_ptr, g_ptr, n_rows, T, C,
                    ROWS: tl.constexpr, COLS: tl.constexpr):  # fmt: skip
        rows, cols, live, off = tile(n_rows, C, ROWS, COLS)  # addresses from scalars only: models/tiles.py
        x, xx = _shifted(x_ptr, prev_ptr, rows, cols, live, off, T, C)
        mask = live[:, None]
        # p: the six mix vectors as the rows of one [6, C] fp32 tensor
        tl.store(r_ptr + off, (x + xx * tl.load(p_ptr + cols)[None, :]).to(r_ptr.dtype.element_ty), mask=mask)
        tl.store(w_ptr + off, (x + xx * tl.load(p_ptr + C + cols)[None, :]).to(w_ptr.dtype.element_ty), mask=mask)
        tl.store(k_ptr + off, (x + xx * tl.load(p_ptr + 2 * C + cols)[None, :]).to(k_ptr.dtype.element_ty), mask=mask)
        xv = (x + xx * tl.load(p_ptr + 3 * C + cols)[None, :]).to(v_ptr.dtype.element_ty)
        tl.store(v_ptr + off, xv, mask=mask)
        tl.store(v2_ptr + off, xv, mask=mask)
        tl.store(a_ptr + off, (x + xx * tl.load(p_ptr + 4 * C + cols)[None, :]).to(a_ptr.dtype.element_ty), mask=mask)
        tl.store(g_ptr + off, (x + xx * tl.load(p_ptr + 5 * C + cols)[None, :]).to(g_ptr.dtype.element_ty), mask=mask)

    # one output's gradient at this program's rows and at the next rows (the tokens whose shift read these rows)
    @triton.jit
    def _grad_pair(ptr, off, live, nxt, C):
        here = tl.load(ptr + off, mask=live[:, None], other=0.0).to(tl.float32)
        after = tl.load(ptr + off + C, mask=nxt[:, None], other=0.0).to(tl.float32)
        return here, after

    # mix vector i's share: x's own term, what this row sends back to its previous token, what the next row sends
    # back to this one; and the vector's gradient summed over this program's rows (masked rows hold zeros)
    @triton.jit
    def _mix_grad(g, g_next, p_ptr, i: tl.constexpr, cols, C, xx, part_base):
        m = tl.load(p_ptr + i * C + cols)[None, :]
        tl.store(part_base + i * C, tl.sum(g * xx, axis=0))
        return g * (1.0 - m), g * m, g_next * m

    @triton.jit
    def _bwd_kernel(x_ptr, prev_ptr, p_ptr, dr_ptr, dw_ptr, dk_ptr, dv_ptr, dv2_ptr, da_ptr, dg_ptr, dx_ptr, dprev_ptr,
                    part_ptr, n_rows, T, C, HAS_V2: tl.constexpr, ROWS: tl.constexpr,
                    COLS: tl.constexpr):  # fmt: skip
        pr = tl.program_id(0)
        rows, cols, live, off = tile(n_rows, C, ROWS, COLS)
        x, xx = _shifted(x_ptr, prev_ptr, rows, cols, live, off, T, C)
        t = rows % T
        nxt = live & (t < T - 1)
        base = part_ptr + pr.to(tl.int64) * 6 * C + cols  # part[pr, i, c], N_MIX = 6 rows a program
        # out_i = x (1 - m_i) + shifted m_i
        g, gn = _grad_pair(dr_ptr, off, live, nxt, C)
        direct, here, back = _mix_grad(g, gn, p_ptr, 0, cols, C, xx, base)
        g, gn = _grad_pair(dw_ptr, off, live, nxt, C)
        d1, h1, b1 = _mix_grad(g, gn, p_ptr, 1, cols, C, xx, base)
        g, gn = _grad_pair(dk_ptr, off, live, nxt, C)
        d2, h2, b2 = _mix_grad(g, gn, p_ptr, 2, cols, C, xx, base)
        g, gn = _grad_pair(dv_ptr, off, live, nxt, C)
        if HAS_V2:  # the two copies' gradients, summed in fp32
            g2, gn2 = _grad_pair(dv2_ptr, off, live, nxt, C)
            g += g2
            gn += gn2
        d3, h3, b3 = _mix_grad(g, gn, p_ptr, 3, cols, C, xx, base)
        g, gn = _grad_pair(da_ptr, off, live, nxt, C)
        d4, h4, b4 = _mix_grad(g, gn, p_ptr, 4, cols, C, xx, base)
        g, gn = _grad_pair(dg_ptr, off, live, nxt, C)
        d5, h5, b5 = _mix_grad(g, gn, p_ptr, 5, cols, C, xx, base)
        direct += d1 + d2 + d3 + d4 + d5
        here += h1 + h2 + h3 + h4 + h5
        back += b1 + b2 + b3 + b4 + b5
        tl.store(dx_ptr + off, (direct + back).to(dx_ptr.dtype.element_ty), mask=live[:, None])
        first = live & (t == 0)  # a row's first token sends its share to the carried state
        tl.store(dprev_ptr + (rows // T)[:, None].to(tl.int64) * C + cols[None, :], here.to(dprev_ptr.dtype.element_ty),
                 mask=first[:, None])  # fmt: skip

    def _grid(n_rows: int, C: int) -> tuple[int, int]:
        return (triton.cdiv(n_rows, ROWS), C // COLS)

    @triton_op("diffrwkv::tm_mix", mutates_args=())
    def tm_mix_op(x: torch.Tensor, prev: torch.Tensor, params: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
    ]:  # fmt: skip
        """(xr, xw, xk, xv, xv again, xa, xg), all bf16; ``params``: x_r, x_w, x_k, x_v, x_a, x_g as the rows of one
        contiguous ``[6, C]`` fp32 tensor; ``prev`` ``[B, C]``: the token before each row's first."""
        B, T, C = x.shape
        outs = [torch.empty(x.shape, device=x.device, dtype=torch.bfloat16) for _ in range(7)]
        wrap_triton(_fwd_kernel)[_grid(B * T, C)](x, prev, params, *outs, B * T, T, C, ROWS=ROWS, COLS=COLS)
        return tuple(outs)

    @triton_op("diffrwkv::tm_mix_bwd", mutates_args=())
    def tm_mix_bwd_op(
        x: torch.Tensor, prev: torch.Tensor, params: torch.Tensor, dr: torch.Tensor, dw: torch.Tensor,
        dk: torch.Tensor, dv: torch.Tensor, dv2: torch.Tensor, da: torch.Tensor, dg: torch.Tensor, has_v2: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """(dx, dprev, partial sums ``[programs, 6, C]`` fp32 of the six mix vectors' gradients)."""
        B, T, C = x.shape
        grid = _grid(B * T, C)
        dx, dprev = torch.empty_like(x), torch.zeros_like(prev)
        part = torch.empty(grid[0], N_MIX, C, device=x.device, dtype=torch.float32)
        wrap_triton(_bwd_kernel)[grid](x, prev, params, dr, dw, dk, dv, dv2, da, dg, dx, dprev, part, B * T, T, C,
                                       HAS_V2=has_v2, ROWS=ROWS, COLS=COLS)  # fmt: skip
        return dx, dprev, part

    def _setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)
        # an output nothing used (the first layer's second value copy) reaches the backward as None, not as a zero
        # tensor autograd would fill and the kernel would read
        ctx.set_materialize_grads(False)

    def _backward(ctx, dr, dw, dk, dv, dv2, da, dg):
        x, prev, params = ctx.saved_tensors
        has_v2 = dv2 is not None  # the first layer's second copy feeds nothing

        def dense(g):
            return torch.zeros(x.shape, device=x.device, dtype=torch.bfloat16) if g is None else g.contiguous()

        dr, dw, dk, dv, da, dg = (dense(g) for g in (dr, dw, dk, dv, da, dg))
        dv2 = dv2.contiguous() if has_v2 else dv
        dx, dprev, part = tm_mix_bwd_op(x, prev, params, dr, dw, dk, dv, dv2, da, dg, has_v2)
        return dx, dprev, part.sum(0)

    tm_mix_op.register_autograd(_backward, setup_context=_setup_context)

    def tm_mix(x, shift, x_r, x_w, x_k, x_v, x_a, x_g):
        """The region's ``tm_mix`` under bf16 autocast through the operator: (xr, xw, xk, xv, xv for the low-rank
        path, xa, xg), all bf16. The six vectors reach the kernels as one new ``[6, C]`` fp32 tensor (not as views
        of a flat optimizer buffer: models/wkv_inputs.py says why)."""
        params = torch.stack([p.reshape(-1) for p in (x_r, x_w, x_k, x_v, x_a, x_g)]).float()
        if not KEEP:
            return tm_mix_op(x, shift.contiguous(), params)
        return kept(tm_mix_op, x, shift.contiguous(), params)

    # ------------------------------------------------------------------ the channel-mix's one interpolation

    @triton.jit
    def _cm_fwd_kernel(x_ptr, prev_ptr, p_ptr, o_ptr, n_rows, T, C, ROWS: tl.constexpr, COLS: tl.constexpr):
        rows, cols, live, off = tile(n_rows, C, ROWS, COLS)
        x, xx = _shifted(x_ptr, prev_ptr, rows, cols, live, off, T, C)
        out = x + xx * tl.load(p_ptr + cols)[None, :]
        tl.store(o_ptr + off, out.to(o_ptr.dtype.element_ty), mask=live[:, None])

    @triton.jit
    def _cm_bwd_kernel(x_ptr, prev_ptr, p_ptr, d_ptr, dx_ptr, dprev_ptr, part_ptr, n_rows, T, C, ROWS: tl.constexpr,
                       COLS: tl.constexpr):  # fmt: skip
        pr = tl.program_id(0)
        rows, cols, live, off = tile(n_rows, C, ROWS, COLS)
        x, xx = _shifted(x_ptr, prev_ptr, rows, cols, live, off, T, C)
        t = rows % T
        g, gn = _grad_pair(d_ptr, off, live, live & (t < T - 1), C)
        direct, here, back = _mix_grad(g, gn, p_ptr, 0, cols, C, xx, part_ptr + pr.to(tl.int64) * C + cols)
        tl.store(dx_ptr + off, (direct + back).to(dx_ptr.dtype.element_ty), mask=live[:, None])
        first = live & (t == 0)
        tl.store(dprev_ptr + (rows // T)[:, None].to(tl.int64) * C + cols[None, :], here.to(dprev_ptr.dtype.element_ty),
                 mask=first[:, None])  # fmt: skip

    @triton_op("diffrwkv::cm_mix", mutates_args=())
    def cm_mix_op(x: torch.Tensor, prev: torch.Tensor, x_k: torch.Tensor) -> torch.Tensor:
        """x + (shifted - x) x_k in bf16; ``x_k`` a contiguous ``[C]`` fp32 tensor."""
        B, T, C = x.shape
        out = torch.empty(x.shape, device=x.device, dtype=torch.bfloat16)
        wrap_triton(_cm_fwd_kernel)[_grid(B * T, C)](x, prev, x_k, out, B * T, T, C, ROWS=ROWS, COLS=COLS)
        return out

    @triton_op("diffrwkv::cm_mix_bwd", mutates_args=())
    def cm_mix_bwd_op(x: torch.Tensor, prev: torch.Tensor, x_k: torch.Tensor, d: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor
    ]:  # fmt: skip
        """(dx, dprev, partial sums ``[programs, C]`` fp32 of x_k's gradient)."""
        B, T, C = x.shape
        grid = _grid(B * T, C)
        dx, dprev = torch.empty_like(x), torch.zeros_like(prev)
        part = torch.empty(grid[0], C, device=x.device, dtype=torch.float32)
        wrap_triton(_cm_bwd_kernel)[grid](x, prev, x_k, d, dx, dprev, part, B * T, T, C, ROWS=ROWS, COLS=COLS)
        return dx, dprev, part

    def _cm_backward(ctx, d):
        x, prev, x_k = ctx.saved_tensors
        if d is None:  # the output fed nothing that needs a gradient
            return None, None, None
        dx, dprev, part = cm_mix_bwd_op(x, prev, x_k, d.contiguous())
        return dx, dprev, part.sum(0)

    cm_mix_op.register_autograd(_cm_backward, setup_context=_setup_context)

    def cm_mix(x, shift, x_k):
        """The region's ``cm_mix`` under bf16 autocast through the operator (bf16 out)."""
        if not KEEP:
            return cm_mix_op(x, shift.contiguous(), x_k.reshape(-1).float())
        return kept(cm_mix_op, x, shift.contiguous(), x_k.reshape(-1).float())
