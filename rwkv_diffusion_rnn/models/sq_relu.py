"""The channel-mix activation relu(k)^2 as an operator that keeps only its output for the backward.

The FFN's value matmul keeps y = relu(k)^2 for its weight gradient anyway, and dk = 2 sqrt(y) dy needs nothing
else, so y alone can serve the whole backward. Written with torch ops, the compiled block's partitioner keeps ``k``
(the same size as ``y``) and recomputes ``y`` from it in the backward, a ``[tokens, 4C]`` write more a layer each
step. As an operator the partitioner may not recompute (a Triton kernel of its own), its output is what is kept.

On CUDA with Triton :func:`sq_relu` runs the operator (``DIFFRWKV_SQ_RELU_OP=0``, read at import, runs the plain
formula, for measuring); elsewhere the plain formula, which it equals (tests/models/test_sq_relu.py).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without Triton: the plain formula only
    triton = None

#: whether :func:`sq_relu` runs the operator on CUDA tensors
USE_OP = os.environ.get("DIFFRWKV_SQ_RELU_OP") != "0" and triton is not None
BLOCK = 1024  # elements a program: 8 bf16 (16 bytes) a thread at 4 warps


def sq_relu_plain(k: torch.Tensor) -> torch.Tensor:
    return torch.relu(k) ** 2


if triton is not None:
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _sq_relu_kernel(k_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        k = tl.maximum(tl.load(k_ptr + offs, mask=mask).to(tl.float32), 0.0)
        tl.store(y_ptr + offs, (k * k).to(y_ptr.dtype.element_ty), mask=mask)

    @triton_op("diffrwkv::sq_relu", mutates_args=())
    def sq_relu_op(k: torch.Tensor) -> torch.Tensor:
        """relu(k)^2 in ``k``'s dtype (computed in fp32, rounded once); ``k`` contiguous."""
        y = torch.empty_like(k, memory_format=torch.contiguous_format)
        n = k.numel()
        wrap_triton(_sq_relu_kernel)[(triton.cdiv(n, BLOCK),)](k, y, n, BLOCK=BLOCK)
        return y

    def _setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    def _backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return 2 * torch.sqrt(y) * dy

    sq_relu_op.register_autograd(_backward, setup_context=_setup_context)


def sq_relu(k: torch.Tensor) -> torch.Tensor:
    """relu(k)^2: the operator on contiguous CUDA tensors (backward from its output), else the plain formula."""
    if USE_OP and k.is_cuda and k.is_contiguous():
        return sq_relu_op(k)
    return sq_relu_plain(k)
