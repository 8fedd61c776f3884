"""The channel-mix FFN ``relu(x Wk^T)^2 Wv^T`` with its activation inside the matmuls (CUDA, bf16/fp16, training).

Run as a matmul, an activation kernel and a matmul, the FFN spends two passes over ``[tokens, 4C]`` a layer on
the activation alone: the forward's ``relu(k)^2`` (read ``k``, write ``y``) and the backward's ``2 sqrt(y) dy``
(read ``y`` and ``dy``, write ``dk``), 1.07 + 1.57 ms of a 0.4B step's ~84 ms of kernels on an H100 (2026-12-07).
Here a Triton matmul applies each in its epilogue, on the fp32 accumulator: the key matmul writes ``y`` directly,
and the backward's ``dy = dout Wv`` matmul multiplies by ``2 sqrt(y)`` before it writes. The other four matmuls
(the value matmul and the three gradients) stay with cuBLAS.

Numerics: ``y`` is squared from the fp32 accumulator and rounded once, where the unfused path rounds the key
matmul's output to bf16 first and squares that; ``dk`` likewise skips one rounding. Both are within a rounding of
the plain formula (tests/models/test_ffn.py).

Where: :func:`applies` (CUDA with Triton, bf16 or fp16 operands, a gradient wanted, widths that are multiples of
:data:`BLOCK_K`); elsewhere the caller runs the modules. ``DIFFRWKV_FFN_OP=0`` (read at import) switches it off.

Measured (H100, 2026-12-08 00:27 UTC, the training step with and without it in one call): 36.4 -> 35.9 / 84.0 ->
83.3 ms of kernels a 0.1B / 0.4B step, 221.7k -> 225.0k / 96.3k -> 97.3k tokens/s back to back, the same first
loss and peak memory. The Triton matmul runs at ~480 TFLOP/s where cuBLAS ran the key matmul at ~650 (0.142
against ~0.106 ms a call at 0.4B, from the matmuls' total), so most of the two passes it removes (2.6 ms at 0.4B)
goes back to the slower matmul: a faster Triton matmul here is worth up to ~1.7 ms more. A second kernel for the
same two products, ``DIFFRWKV_FFN_KERNEL=tma`` (TMA descriptors on a persistent grid, one fixed tile per epilogue
in :data:`TMA_TILE`), is there to be measured against it (``bench/gpu_check_ffn.py --kernels pointer,tma
--matmul``); it is not the default until it wins.
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

#: ``DIFFRWKV_FFN_OP`` (read at import): "0" never runs the operator (for measuring)
USE_OP = os.environ.get("DIFFRWKV_FFN_OP") != "0" and triton is not None
BLOCK_K = 64  # the reduction's step; every config uses it, so K must be a multiple (no masked loads along K)
RELU_SQ, TIMES_2_SQRT = 0, 1  # the epilogues
#: ``DIFFRWKV_FFN_TILE`` (read at import) = "BLOCK_M,BLOCK_N,stages,warps": one tile for every call instead of the
#: autotuner's pick (for measuring; the tests set it, Triton's interpreter has no autotuner)
_TILE = os.environ.get("DIFFRWKV_FFN_TILE")
TILE = tuple(int(v) for v in _TILE.split(",")) if _TILE else None
#: ``DIFFRWKV_FFN_KERNEL`` (read at import): "tma" runs the matmuls through TMA descriptors on a persistent grid
#: (:data:`TMA_TILE`, Hopper and later), anything else the pointer kernel the autotuner tiles
KERNEL = os.environ.get("DIFFRWKV_FFN_KERNEL", "pointer")
#: the persistent kernel's tile for each epilogue (relu^2, x 2 sqrt): BLOCK_M, BLOCK_N, stages, warps, warp
#: specialisation 0/1, the output written in two halves 0/1 (no autotuner: a descriptor's block is fixed where it is
#: made, and torch.compile runs no autotuner pre-hooks). Triton 3.6 compiles compute 9.0 (H100, H200) the same with
#: and without warp specialisation (the same PTX, compiled for compute 9.0 on a CPU, 2026-12-08)
TMA_TILE = {0: (128, 256, 3, 8, 0, 0), 1: (128, 256, 3, 8, 0, 1)}  # whole, the gradient's aux tile needs 272 KB


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter on the CPU: a few programs, so that each walks several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def applies(x: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, mm_dtype: torch.dtype | None = None) -> bool:
    """Whether the FFN may run as the operator: switched on, CUDA, a gradient wanted, one 16-bit float dtype for
    the three operands (the weights' own, or ``mm_dtype``, autocast's, which :func:`ffn` casts them to), both widths
    multiples of :data:`BLOCK_K`."""
    return (
        USE_OP
        and x.is_cuda
        and torch.is_grad_enabled()
        and (x.requires_grad or wk.requires_grad or wv.requires_grad)
        and x.numel() > 0
        and x.dtype in (torch.bfloat16, torch.float16)
        and (wk.dtype if mm_dtype is None else mm_dtype) == x.dtype
        and (wv.dtype if mm_dtype is None else mm_dtype) == x.dtype
        and wk.dim() == 2
        and wv.dim() == 2
        and x.shape[-1] == wk.shape[1]
        and wv.shape == (wk.shape[1], wk.shape[0])
        and x.shape[-1] % BLOCK_K == 0
        and wk.shape[0] % BLOCK_K == 0
    )


def ffn_plain(x: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """``relu(x wk^T)^2 wv^T`` as torch operations: the reference."""
    return (torch.relu(x @ wk.t()) ** 2) @ wv.t()


if triton is not None:
    from torch.library import triton_op, wrap_triton

    def _configs():
        # tiles for the H100 / H200 (228 KB of shared memory a multiprocessor), the last (72 KB) for cards with less;
        # the autotuner keeps the fastest for each (M, N, K) it meets and skips a tile a card cannot hold
        shapes = [(128, 256, 3, 8), (256, 128, 3, 8), (128, 128, 4, 4), (128, 128, 4, 8), (64, 256, 4, 4)]
        shapes += [(128, 256, 4, 8), (256, 128, 4, 8)]  # four stages of 48 KB: on the H100 / H200 only
        shapes.append((64, 128, 3, 4))
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, s, w in shapes
        ]

    @triton.jit
    def _tile_offsets(tile, tiles_m, per_group, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The first row and column of the ``tile``-th tile, GROUP_M row tiles down a column before moving right."""
        first_m = (tile // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        return (first_m + (tile % per_group) % group_rows) * BLOCK_M, ((tile % per_group) // group_rows) * BLOCK_N

    @triton.jit
    def _mm_epilogue_kernel(
        a_ptr, b_ptr, c_ptr, aux_ptr, M, N, K,
        sa_m, sa_k, sb_k, sb_n,
        EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):  # fmt: skip
        """``c = epilogue(a @ b)``, ``a`` [M, K] and ``b`` [K, N] by strides, ``c`` and ``aux`` [M, N] contiguous;
        the epilogue on the fp32 sum: relu(.)^2, or . * 2 sqrt(aux)."""
        tiles_m = tl.cdiv(M, BLOCK_M)
        # programs walk GROUP_M row tiles down a column of tiles before moving right: neighbours share b's tiles
        off_m, off_n = _tile_offsets(
            tl.program_id(0), tiles_m, GROUP_M * tl.cdiv(N, BLOCK_N), GROUP_M, BLOCK_M, BLOCK_N
        )
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        # rows past M read row M - 1 (in bounds, never stored): no mask in the loop
        a_rows = tl.minimum(rows, M - 1).to(tl.int64)
        a_ptrs = a_ptr + a_rows[:, None] * sa_m + ks[None, :] * sa_k
        b_ptrs = b_ptr + ks[:, None] * sb_k + cols[None, :].to(tl.int64) * sb_n
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):
            acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
            a_ptrs += BLOCK_K * sa_k
            b_ptrs += BLOCK_K * sb_k

        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = (rows < M)[:, None]
        if EPILOGUE == 0:
            acc = tl.maximum(acc, 0.0)
            acc = acc * acc
        else:
            aux = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc = acc * (2.0 * tl.sqrt(aux))
        tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)

    _mm_tuned = triton.autotune(configs=_configs(), key=["M", "N", "K", "EPILOGUE"])(_mm_epilogue_kernel)

    @triton.jit
    def _tma_epilogue(c_desc, aux_desc, acc, off_m, off_n, EPILOGUE: tl.constexpr):
        if EPILOGUE == 0:
            acc = tl.maximum(acc, 0.0)
            acc = acc * acc
        else:
            acc = acc * (2.0 * tl.sqrt(aux_desc.load([off_m, off_n]).to(tl.float32)))
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))

    @triton.jit
    def _mm_tma_kernel(
        a_desc, b_desc, c_desc, aux_desc, M, N, K,
        EPILOGUE: tl.constexpr, B_ROWS_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
        SPLIT: tl.constexpr,
    ):  # fmt: skip
        """The same product and epilogues through TMA descriptors, on a persistent grid: ``PROGRAMS`` programs (one
        a multiprocessor) walk the tiles in :func:`_mm_epilogue_kernel`'s order, and the compiler's pipeline runs
        into the next tile while one tile writes (with ``WARP_SPECIALIZE``, loads, products and the epilogue in
        warps of their own). ``SPLIT`` writes a tile as two halves of ``BLOCK_N / 2`` columns (``c_desc`` and
        ``aux_desc`` have that block): less shared memory for the epilogue, more for the pipeline. ``a`` [M, K];
        ``b`` [N, K] (``B_ROWS_N``) or [K, N]; ``c``, ``aux`` [M, N]. Rows past M read zeros and are not written
        (the descriptors' bounds)."""
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        # the epilogue counts its tiles apart from the loads: a value both ends of the flattened loop use can
        # trip the software pipeliner on some cards
        tile_out = tl.program_id(0) - PROGRAMS
        for tile in tl.range(
            tl.program_id(0), tiles_m * tiles_n, PROGRAMS, flatten=True, warp_specialize=WARP_SPECIALIZE
        ):  # fmt: skip
            off_m, off_n = _tile_offsets(tile, tiles_m, per_group, GROUP_M, BLOCK_M, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                a = a_desc.load([off_m, k])
                if B_ROWS_N:
                    b = b_desc.load([off_n, k]).T
                else:
                    b = b_desc.load([k, off_n])
                acc = tl.dot(a, b, acc)
            tile_out += PROGRAMS
            off_m, off_n = _tile_offsets(tile_out, tiles_m, per_group, GROUP_M, BLOCK_M, BLOCK_N)
            if SPLIT:
                left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                _tma_epilogue(c_desc, aux_desc, left, off_m, off_n, EPILOGUE)
                _tma_epilogue(c_desc, aux_desc, right, off_m, off_n + BLOCK_N // 2, EPILOGUE)
            else:
                _tma_epilogue(c_desc, aux_desc, acc, off_m, off_n, EPILOGUE)

    def _launch_tma(a: torch.Tensor, b: torch.Tensor, aux: torch.Tensor | None, epilogue: int) -> torch.Tensor:
        from triton.tools.tensor_descriptor import TensorDescriptor

        M, K = a.shape
        N = b.shape[1]
        bm, bn, stages, warps, specialize, split = TMA_TILE[epilogue]
        c = torch.empty((M, N), dtype=a.dtype, device=a.device)
        rows_n = b.stride(0) == 1  # b is the transpose of a contiguous [N, K] (the key weight)
        b_desc = TensorDescriptor.from_tensor(b.t(), [bn, BLOCK_K]) if rows_n else TensorDescriptor.from_tensor(
            b, [BLOCK_K, bn])  # fmt: skip
        out_block = [bm, bn // 2 if split else bn]
        c_desc = TensorDescriptor.from_tensor(c, out_block)
        aux_desc = c_desc if aux is None else TensorDescriptor.from_tensor(aux, out_block)
        programs = min(_multiprocessors(a.device), triton.cdiv(M, bm) * triton.cdiv(N, bn))
        wrap_triton(_mm_tma_kernel)[(programs,)](
            TensorDescriptor.from_tensor(a, [bm, BLOCK_K]), b_desc, c_desc, aux_desc, M, N, K, EPILOGUE=epilogue,
            B_ROWS_N=rows_n, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K, GROUP_M=8, PROGRAMS=programs,
            WARP_SPECIALIZE=bool(specialize), SPLIT=bool(split), num_stages=stages, num_warps=warps,
        )  # fmt: skip
        return c

    def _launch(a: torch.Tensor, b: torch.Tensor, aux: torch.Tensor | None, epilogue: int) -> torch.Tensor:
        # a TMA descriptor needs a 16-byte aligned base (strides are: widths are multiples of BLOCK_K); allocations
        # are, so the offset into the storage decides (and it is known while torch.compile traces, a pointer is not)
        operands = (a, b) + (() if aux is None else (aux,))
        if KERNEL == "tma" and all(t.storage_offset() * t.element_size() % 16 == 0 for t in operands):
            return _launch_tma(a, b, aux, epilogue)
        M, K = a.shape
        N = b.shape[1]
        c = torch.empty((M, N), dtype=a.dtype, device=a.device)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        args = (a, b, c, c if aux is None else aux, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1))
        if TILE is None:
            wrap_triton(_mm_tuned)[grid](*args, EPILOGUE=epilogue, BLOCK_K=BLOCK_K)
        else:
            bm, bn, stages, warps = TILE
            wrap_triton(_mm_epilogue_kernel)[grid](
                *args, EPILOGUE=epilogue, BLOCK_K=BLOCK_K, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, num_stages=stages,
                num_warps=warps,
            )  # fmt: skip
        return c

    @triton_op("diffrwkv::ffn", mutates_args=())
    def ffn_op(x: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y wv^T, y)`` with ``y = relu(x wk^T)^2``: ``x`` [M, C] contiguous, ``wk`` [4C, C], ``wv`` [C, 4C].
        ``y`` is an output only so that the backward can keep it; :func:`ffn` hands out the first."""
        y = _launch(x, wk.t(), None, RELU_SQ)
        return y @ wv.t(), y

    @triton_op("diffrwkv::ffn_key_grad", mutates_args=())
    def ffn_key_grad_op(dout: torch.Tensor, wv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The gradient of the key matmul's output, ``(dout wv) * 2 sqrt(y)``: ``dout`` [M, C] contiguous, ``wv``
        [C, 4C], ``y`` [M, 4C] contiguous."""
        return _launch(dout, wv, y, TIMES_2_SQRT)

    def _setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs, output[1])
        # y's gradient is never read: without this, eager autograd fills a [M, 4C] tensor with zeros for it
        ctx.set_materialize_grads(False)

    def _backward(ctx, dout, _dy):
        # _dy: None (y is never handed out, ffn() returns the first output; its gradient is not materialised)
        x, wk, wv, y = ctx.saved_tensors
        dout = dout.contiguous()
        dk = ffn_key_grad_op(dout, wv, y)
        return dk @ wk, dk.t() @ x, dout.t() @ y

    ffn_op.register_autograd(_backward, setup_context=_setup_context)


def ffn(x: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """``relu(x wk^T)^2 wv^T`` for ``x`` [..., C], through the operator (check :func:`applies` first). Inside a
    compiled block ``y`` is kept for the backward, never recomputed there (a second key matmul; models/kept.py)."""
    lead = x.shape[:-1]
    wk, wv = wk.to(x.dtype), wv.to(x.dtype)  # autocast's cast of the weights (none where they are already)
    out, _ = kept(ffn_op, x.reshape(-1, x.shape[-1]).contiguous(), wk, wv)
    return out.view(*lead, wv.shape[0])
