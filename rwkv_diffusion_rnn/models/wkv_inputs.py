"""The WKV operands besides r and v (:func:`~rwkv_diffusion_rnn.models.rwkv7_regions.tm_kernel_inputs`) as one
operator with a hand-fused Triton forward and backward (CUDA, head size 64; by default from width 768, the 0.1B
model's, on).

Compiled by Inductor, the backward of this region (the per-head normalisation of ``k``, the in-context rate, the
decay's sigmoid and four per-channel parameter sums) is the slowest fused kernel of a block: 0.17-0.18 ms a call on
an H100 at both widths, ~1.5 TB/s (docs/RESULTS.md, 2026-12-07). Here the forward reads ``k`` and the two low-rank
outputs once and writes the four operands; the backward reads the same three inputs and the four gradients,
recomputes the rest in registers and writes the three input gradients and per-program partial sums of the four
parameter gradients (summed after, in a fixed order: deterministic).

One difference from the plain function: the gated key comes back in ``k``'s dtype (bf16 under autocast), where the
plain function returns it in fp32; the WKV kernel takes it in bf16 either way, and the bonus term then reads the
bf16 copy. ``DIFFRWKV_WKV_INPUTS_OP`` (read at import): ``1`` serves every width, ``0`` none; unset, widths from
:data:`MIN_WIDTH` on, where an H100 measured it faster.
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

#: ``DIFFRWKV_WKV_INPUTS_OP`` (read at import): "1" always, "0" never, unset: from width :data:`MIN_WIDTH` on
SWITCH = os.environ.get("DIFFRWKV_WKV_INPUTS_OP")
#: the narrowest model the operator serves by default. With its outputs kept for the backward (:data:`KEEP`), in one
#: H100 call (2026-12-07) the 0.4B step (width 1024) took 87.9 ms of kernels against 89.5 with them recomputed, and the
#: 0.1B step (width 768) 38.0 against 38.7 without the operator (docs/RESULTS.md). Recomputed, the operator had cost
#: the 0.1B step 0.3 ms: it was on from width 1024 only
MIN_WIDTH = 768
#: ``DIFFRWKV_WKV_INPUTS_KEEP`` (read at import; "0" for off): the partitioner of a compiled block keeps the
#: operator's four outputs for the WKV backward instead of running its forward again there (models/kept.py): 1.6 ms
#: less a 0.4B step for 1.7 GiB more peak memory (12.7 -> 14.4 GiB; H100, 2026-12-07)
KEEP = os.environ.get("DIFFRWKV_WKV_INPUTS_KEEP", "1") == "1"
HEAD = 64
ROWS = 32  # tokens a program (a program: ROWS tokens x one head)
EPS = 1e-12  # F.normalize's


def applies(k: torch.Tensor, w_low: torch.Tensor, a_low: torch.Tensor, n_head: int) -> bool:
    """Whether the region may call the operator for these operands: switched on (or, by default, a width of at
    least :data:`MIN_WIDTH`), CUDA, head size 64, contiguous."""
    # plain boolean tests (no generator): traced by torch.compile without a graph break
    wanted = SWITCH == "1" or (SWITCH is None and k.shape[-1] >= MIN_WIDTH)
    return (
        triton is not None
        and wanted
        and k.is_cuda
        and k.shape[-1] == n_head * HEAD
        and k.is_contiguous()
        and w_low.is_contiguous()
        and a_low.is_contiguous()
        and w_low.shape == k.shape
        and a_low.shape == k.shape
        and w_low.dtype == k.dtype
        and a_low.dtype == k.dtype
    )


if triton is not None:
    from torch.library import triton_op, wrap_triton

    from rwkv_diffusion_rnn.models.tiles import load, tile

    # the forward's values at this program's tile (ROWS tokens of one head), in fp32
    @triton.jit
    def _forward_tile(k_ptr, wl_ptr, al_ptr, p_ptr, cols, mask, off, C, EPS: tl.constexpr):
        k = load(k_ptr, off, mask)
        # p: the four parameters as rows of one [4, C] fp32 tensor (w0, a0, k_k, k_a)
        s = tl.sigmoid(load(wl_ptr, off, mask) + tl.load(p_ptr + cols)[None, :])
        a = tl.sigmoid(load(al_ptr, off, mask) + tl.load(p_ptr + C + cols)[None, :])
        k_k = tl.load(p_ptr + 2 * C + cols)[None, :]
        k_a = tl.load(p_ptr + 3 * C + cols)[None, :]
        u = k * k_k
        norm = tl.sqrt(tl.sum(u * u, axis=1))[:, None]
        return k, s, a, k_k, k_a, norm, u / tl.maximum(norm, EPS)

    @triton.jit
    def _fwd_kernel(k_ptr, wl_ptr, al_ptr, p_ptr, w_ptr, kp_ptr, nkk_ptr, kka_ptr, n_rows, C, SCALE: tl.constexpr,
                    EPS: tl.constexpr, ROWS: tl.constexpr, HEAD: tl.constexpr):  # fmt: skip
        _, cols, live, off = tile(n_rows, C, ROWS, HEAD)  # addresses from scalars only: models/tiles.py
        mask = live[:, None]
        k, s, a, k_k, k_a, norm, kk = _forward_tile(k_ptr, wl_ptr, al_ptr, p_ptr, cols, mask, off, C, EPS)
        kp = k * (1.0 + (a - 1.0) * k_a)
        tl.store(w_ptr + off, -SCALE * s, mask=mask)
        tl.store(kp_ptr + off, kp.to(kp_ptr.dtype.element_ty), mask=mask)
        tl.store(nkk_ptr + off, (-kk).to(nkk_ptr.dtype.element_ty), mask=mask)
        tl.store(kka_ptr + off, (kk * a).to(kka_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(k_ptr, wl_ptr, al_ptr, p_ptr, dw_ptr, dkp_ptr, dnkk_ptr, dkka_ptr, dk_ptr, dwl_ptr, dal_ptr,
                    part_ptr, n_rows, C, SCALE: tl.constexpr, EPS: tl.constexpr, ROWS: tl.constexpr,
                    HEAD: tl.constexpr):  # fmt: skip
        pr = tl.program_id(0)
        _, cols, live, off = tile(n_rows, C, ROWS, HEAD)  # addresses from scalars only: models/tiles.py
        mask = live[:, None]
        k, s, a, k_k, k_a, norm, kk = _forward_tile(k_ptr, wl_ptr, al_ptr, p_ptr, cols, mask, off, C, EPS)
        dw = load(dw_ptr, off, mask)
        dkp = load(dkp_ptr, off, mask)
        dkka = load(dkka_ptr, off, mask)
        dkk = a * dkka - load(dnkk_ptr, off, mask)
        # F.normalize's gradient: (dkk - kk <kk, dkk>) / |u| above eps, dkk / eps at or below it
        du = tl.where(norm > EPS, (dkk - kk * tl.sum(kk * dkk, axis=1)[:, None]) / tl.maximum(norm, EPS), dkk / EPS)
        da = kk * dkka + dkp * k * k_a
        dal = da * a * (1.0 - a)
        dwl = dw * (-SCALE) * s * (1.0 - s)
        dk = dkp * (1.0 + (a - 1.0) * k_a) + du * k_k
        tl.store(dk_ptr + off, dk.to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dwl_ptr + off, dwl.to(dwl_ptr.dtype.element_ty), mask=mask)
        tl.store(dal_ptr + off, dal.to(dal_ptr.dtype.element_ty), mask=mask)
        # the four parameter gradients, this program's rows summed: part[pr, j, c] (masked rows hold zeros)
        base = part_ptr + pr.to(tl.int64) * 4 * C + cols
        tl.store(base, tl.sum(dwl, axis=0))
        tl.store(base + C, tl.sum(dal, axis=0))
        tl.store(base + 2 * C, tl.sum(du * k, axis=0))
        tl.store(base + 3 * C, tl.sum(dkp * k * (a - 1.0), axis=0))

    def _grid(n_rows: int, C: int) -> tuple[int, int]:
        return (triton.cdiv(n_rows, ROWS), C // HEAD)

    @triton_op("diffrwkv::wkv_inputs", mutates_args=())
    def wkv_inputs_op(
        k: torch.Tensor, w_low: torch.Tensor, a_low: torch.Tensor, params: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """(w = -scale sigmoid(w0 + w_low) in fp32, gated k, -kk, kk * a), the last three in ``k``'s dtype;
        ``params``: w0, a0, k_k, k_a as the rows of one contiguous ``[4, C]`` fp32 tensor."""
        C = k.shape[-1]
        n_rows = k.numel() // C
        w = torch.empty(k.shape, device=k.device, dtype=torch.float32)
        kp, nkk, kka = (torch.empty_like(k) for _ in range(3))
        wrap_triton(_fwd_kernel)[_grid(n_rows, C)](k, w_low, a_low, params, w, kp, nkk, kka, n_rows, C,
                                                   SCALE=scale, EPS=EPS, ROWS=ROWS, HEAD=HEAD)  # fmt: skip
        return w, kp, nkk, kka

    @triton_op("diffrwkv::wkv_inputs_bwd", mutates_args=())
    def wkv_inputs_bwd_op(
        k: torch.Tensor, w_low: torch.Tensor, a_low: torch.Tensor, params: torch.Tensor, dw: torch.Tensor,
        dkp: torch.Tensor, dnkk: torch.Tensor, dkka: torch.Tensor, scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """(dk, dw_low, da_low, partial sums ``[programs, 4, C]`` fp32 of the four parameters' gradients)."""
        C = k.shape[-1]
        n_rows = k.numel() // C
        grid = _grid(n_rows, C)
        dk, dwl, dal = (torch.empty_like(x) for x in (k, w_low, a_low))
        part = torch.empty(grid[0], 4, C, device=k.device, dtype=torch.float32)
        wrap_triton(_bwd_kernel)[grid](k, w_low, a_low, params, dw, dkp, dnkk, dkka, dk, dwl, dal, part, n_rows, C,
                                       SCALE=scale, EPS=EPS, ROWS=ROWS, HEAD=HEAD)  # fmt: skip
        return dk, dwl, dal, part

    def _setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:4])
        ctx.scale = inputs[4]

    def _backward(ctx, dw, dkp, dnkk, dkka):
        k, w_low, a_low, params = ctx.saved_tensors
        dw, dkp, dnkk, dkka = (
            torch.zeros(k.shape, device=k.device, dtype=dt) if g is None else g.to(dt).contiguous()
            for g, dt in ((dw, torch.float32), (dkp, k.dtype), (dnkk, k.dtype), (dkka, k.dtype))
        )
        dk, dwl, dal, part = wkv_inputs_bwd_op(k, w_low, a_low, params, dw, dkp, dnkk, dkka, ctx.scale)
        return dk, dwl, dal, part.sum(0), None

    wkv_inputs_op.register_autograd(_backward, setup_context=_setup_context)

    def wkv_inputs(k, w_low, a_low, w0, a0, k_k, k_a, scale: float):
        """:func:`~rwkv_diffusion_rnn.models.rwkv7_regions.tm_kernel_inputs`'s outputs through the operator
        (parameters ``[1, 1, C]`` fp32). The four parameters reach the kernels as one new ``[4, C]`` tensor, made
        by the caller's graph and saved for the backward, not as the parameters themselves: where those are views of
        one flat buffer (the flat AdamW's), Inductor handed the Triton kernel a copy of the view's whole base (the
        0.1B model's 140M elements, once a parameter) and read past the buffer's end (an illegal address on an H100,
        2026-12-07)."""
        params = torch.stack([p.reshape(-1) for p in (w0, a0, k_k, k_a)]).float()
        if not KEEP:
            return wkv_inputs_op(k, w_low, a_low, params, scale)
        # in a compiled block, the outputs are saved for the WKV backward, not recomputed (models/kept.py)
        return kept(wkv_inputs_op, k, w_low, a_low, params, scale)
