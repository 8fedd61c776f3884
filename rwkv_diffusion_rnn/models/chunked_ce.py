"""Head + cross-entropy over a large vocabulary in row chunks, without the fp32 logits (memory).

``F.cross_entropy(h @ W.T, y)`` at the g1 sizes keeps ``[N, V]`` logits alive for the backward: at 8,192 rows and
65,536 classes that is 1 GiB in bf16 plus 2 GiB in fp32 for the log-softmax and as much again for its gradient,
more than a 0.1B model's weights and optimizer state together. :func:`linear_cross_entropy` computes the loss a
chunk of rows at a time. Each chunk's logits are turned, in place, into the gradient's direction
``softmax - one_hot`` (in the logits' dtype) in the forward, together with the loss and the argmax, and by default
(:data:`KEEP_LOGITS`) kept for the backward; with ``keep_logits=False`` nothing ``[N, V]`` is kept and the backward
recomputes each chunk's. Rows are padded to a multiple of :data:`PAD_ROWS`, so the matmuls take few shapes however
the row count moves from step to step (cuBLAS plans each new shape on the host, once).

The backward then touches no ``[N, V]`` tensor beyond the two matmuls that read it: the rows' gradient weights
``g`` (the loss's upstream gradient, one per row) scale the ``[N, C]`` operands instead, ``dh = g * (P @ W)`` and
``dW = P^T @ (g * h)``. The per-row work over the logits is one pass that reads each logit once and writes it once
(:func:`rows_kernel`, a Triton kernel on CUDA; the fp32 torch formula, :func:`rows_reference`, elsewhere and as its
reference). Before it, the forward's statistics and the backward's softmax were two compiled kernels that read the
logits three times and wrote them once (1.5 ms a step at 8,192 rows on an H100, docs/RESULTS.md).

Numerics: the matmuls run in the autocast dtype (or the inputs' dtype without autocast), the softmax in fp32, the
weight gradient accumulates in fp32. Against ``F.cross_entropy(logits.float(), y)`` on autocast logits, which
rounds ``(softmax - one_hot) * g`` to bf16 once, this rounds ``softmax - one_hot`` and ``g * h`` once each (the same
relative size). Tested against that reference (tests/models/test_chunked_ce.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without Triton: the torch formula only
    triton = None

# Rows a chunk; rows padded to a multiple of PAD_ROWS (the last chunk may be shorter); and whether each chunk's
# low-precision logits are kept for the backward instead of recomputed (one head matmul fewer; the [N, V] logits held
# in bf16, 1 GiB at 8,192 rows x 65,536; DIFFRWKV_CE_KEEP_LOGITS=0 turns it off). Kept, every chunk's logits live
# until the backward, so the chunk size does not move the peak; 8,192 rows take a training step's 16 x 512 tokens in
# one pass. The g1 heads on an H100 (bench/gpu_check_ce.py --time, 2026-12-06), fwd + bwd at 8,192 rows: 1,024 rows
# recomputed 8.29 / 9.99 ms (width 768 / 1,024), 4,096 kept 5.60 / 6.79 ms, for 2.1 GiB instead of 0.5 at the peak.
DEFAULT_CHUNK = 8192
PAD_ROWS = 1024
KEEP_LOGITS = os.environ.get("DIFFRWKV_CE_KEEP_LOGITS", "1") != "0"

# The rows kernel's launch: columns a program reads at a time, and warps a program (one program a row). On an H100
# (bench/gpu_check_ce.py --rows, 2026-12-07), a bf16 chunk of 4,096 x 65,536: 0.519 ms at 4,096 columns and 32
# warps (2.07 TB/s for one read and one write), 0.56-0.94 ms with 8 or 16 warps; programs walking several rows (so
# that a row's second read finds it in L2) were no faster.
ROWS_BLOCK = 4096
ROWS_WARPS = 32


def rows_reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's cross-entropy ``[n]`` (fp32) and argmax ``[n]`` (long) from its logits ``[n, V]`` (any float
    dtype), which it overwrites with ``softmax - one_hot(targets)`` in their dtype; all in fp32."""
    x = logits.float()
    lse = torch.logsumexp(x, -1)
    loss = lse - x.gather(1, targets[:, None]).squeeze(1)
    pred = x.argmax(-1)
    p = torch.exp(x - lse[:, None])
    p.scatter_add_(1, targets[:, None], p.new_full((p.shape[0], 1), -1.0))
    logits.copy_(p)
    return loss, pred


if triton is not None:

    @triton.jit
    def _cross_entropy_rows_kernel(x_ptr, t_ptr, loss_ptr, pred_ptr, V, BLOCK: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        row = tl.program_id(0)  # one program a row
        base = x_ptr + tl.cast(row, tl.int64) * V
        # each lane: its running max m, its sum s of exp(x - m) and where m first occurred; one exp a logit:
        # exp(-|x - m|) is exp(m - x) that rescales s where x is a new max, else exp(x - m) that s gains
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        at = tl.zeros([BLOCK], tl.int32)
        for off in range(0, V, BLOCK):
            idx = off + cols
            x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
            e = tl.where(x == float("-inf"), 0.0, tl.exp(-tl.abs(x - m)))  # -inf beside -inf: nothing
            up = x > m
            s = tl.where(up, s * e + 1.0, s + e)
            at = tl.where(up, idx, at)
            m = tl.maximum(m, x)
        mx = tl.max(m, 0)
        lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
        pred = tl.min(tl.where(m == mx, at, V), 0)  # the first column holding the row's max
        t = tl.load(t_ptr + row)
        tl.store(loss_ptr + row, lse - tl.load(base + t).to(tl.float32))
        tl.store(pred_ptr + row, pred.to(tl.int64))
        for off in range(0, V, BLOCK):
            idx = off + cols
            mask = idx < V
            p = tl.exp(tl.load(base + idx, mask=mask, other=0.0).to(tl.float32) - lse)
            p = tl.where(idx == t, p - 1.0, p)
            tl.store(base + idx, p.to(x_ptr.dtype.element_ty), mask=mask)


def rows_kernel(
    logits: torch.Tensor, targets: torch.Tensor, block: int | None = None, warps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rows_reference` as one Triton kernel (``logits`` contiguous), one program a row: each row read once for
    its statistics and once more to write ``softmax - one_hot`` over it. ``block`` / ``warps``: the
    launch (default :data:`ROWS_BLOCK`, :data:`ROWS_WARPS`)."""
    n, v = logits.shape
    block = ROWS_BLOCK if block is None else block
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    pred = torch.empty(n, device=logits.device, dtype=torch.long)
    if n:
        _cross_entropy_rows_kernel[(n,)](
            logits, targets, loss, pred, v, BLOCK=min(block, triton.next_power_of_2(v)),
            num_warps=ROWS_WARPS if warps is None else warps,
        )  # fmt: skip
    return loss, pred


def _kernel_applies(logits: torch.Tensor) -> bool:
    return triton is not None and logits.is_cuda and logits.is_contiguous()


_KERNEL: dict[str, bool] = {}  # "works": a launch has succeeded; "failed": the first one raised (torch formula)


@torch.compiler.disable
def _rows(logits: torch.Tensor, targets: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rows_kernel` where it can run (CUDA, Triton, contiguous logits), else :func:`rows_reference`. Where
    the kernel's first launch fails (no Triton backend for this GPU), the torch formula from then on, with one
    warning."""
    if not (fused and _kernel_applies(logits)) or _KERNEL.get("failed"):
        return rows_reference(logits, targets)
    if _KERNEL.get("works"):
        return rows_kernel(logits, targets)
    try:
        out = rows_kernel(logits, targets)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever Triton raises on a GPU it cannot compile for
        import warnings

        _KERNEL["failed"] = True
        warnings.warn(f"chunked cross-entropy: the Triton kernel failed ({type(exc).__name__}: {exc}); "
                      "running the torch formula", stacklevel=2)  # fmt: skip
        return rows_reference(logits, targets)
    _KERNEL["works"] = True
    return out


_F32_OUT: dict[tuple[str, torch.dtype], bool] = {}


def _f32_out_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` and ``torch.addmm(c, a, b, beta=0 or 1,
    out_dtype=torch.float32, out=c)`` with ``dtype`` (bf16 / fp16) operands work on ``device`` and compute right:
    the head's weight gradient is then summed over chunks inside the GEMM, in fp32 (the first chunk writing over an
    uninitialised buffer, beta 0), and ``P @ W`` leaves the GEMM in fp32 for its rows' scaling, instead of a
    low-precision product added or scaled by a separate pass per chunk. Checked once per (device, dtype) on small
    random matrices, ``a`` transposed as the real call's is, against fp32 math; False (the plain path) on any error
    or mismatch."""
    key = (str(device), dtype)
    if key not in _F32_OUT:
        ok = False
        try:
            g = torch.Generator(device).manual_seed(0)
            with torch.autocast(device.type, enabled=False):
                a = torch.randn(48, 64, device=device, generator=g).to(dtype).T
                b = torch.randn(48, 40, device=device, generator=g).to(dtype)
                c = torch.full((64, 40), float("nan"), device=device)
                want = a.float() @ b.float()
                torch.addmm(c, a, b, beta=0, out_dtype=torch.float32, out=c)
                ok = bool(torch.allclose(c, want, rtol=1e-4, atol=1e-3))
                torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
                ok &= bool(torch.allclose(c, 2 * want, rtol=1e-4, atol=1e-3))
                ok &= bool(torch.allclose(torch.mm(a, b, out_dtype=torch.float32), want, rtol=1e-4, atol=1e-3))
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _F32_OUT[key] = ok
    return _F32_OUT[key]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, fused: bool, keep: bool):
        # the weight arrives in its own dtype (the fp32 parameter) and is cast to h's here, once: its gradient, summed
        # in fp32, then goes back to the parameter as it is, where a cast outside this function would have rounded it
        # to h's dtype and cast it back (two [V, C] copies a step, and a bf16 rounding of the head's gradient)
        ctx.weight_dtype = weight.dtype
        weight = weight.to(h.dtype)
        n = h.shape[0]
        pad = -n % min(chunk, PAD_ROWS)
        hp = F.pad(h, (0, 0, 0, pad)) if pad else h
        tp = F.pad(targets, (0, pad)) if pad else targets
        m = hp.shape[0]
        loss = torch.empty(m, device=h.device, dtype=torch.float32)
        pred = torch.empty(m, device=h.device, dtype=torch.long)
        kept = []
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, m, chunk):
                logits = hp[s : s + chunk] @ weight.T
                loss[s : s + chunk], pred[s : s + chunk] = _rows(logits, tp[s : s + chunk], fused)
                if keep:
                    kept.append(logits)  # now softmax - one_hot
        ctx.save_for_backward(hp, weight, tp, *kept)
        ctx.n, ctx.chunk, ctx.fused = n, chunk, fused
        ctx.mark_non_differentiable(pred)
        return loss[:n], pred[:n]

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_pred):
        hp, weight, tp, *kept = ctx.saved_tensors
        n, chunk, m = ctx.n, ctx.chunk, hp.shape[0]
        g_all = F.pad(grad_loss.float(), (0, m - n))[:, None]  # padded rows: no gradient
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hp) if need_h else None
        f32 = hp.is_cuda and hp.dtype in (torch.bfloat16, torch.float16) and _f32_out_ok(hp.device, hp.dtype)
        # one chunk and a weight in h's dtype (bf16 master-weight copies): the GEMM's fp32 sum is rounded once,
        # straight into the gradient: no fp32 [V, C] buffer and no cast after it (0.4B: 256 MiB; the cast took 0.13 ms
        # a step on an H100, 2026-12-07)
        direct = need_w and 0 < m <= chunk and ctx.weight_dtype == hp.dtype
        grad_w = None
        if need_w and not direct:  # fp32; the first chunk's GEMM writes it whole where it can write fp32 (no rows: 0)
            alloc = torch.empty if f32 and m else torch.zeros
            grad_w = alloc(weight.shape, device=weight.device, dtype=torch.float32)
        with torch.autocast(hp.device.type, enabled=False):
            for i, s in enumerate(range(0, m, chunk)):
                h_c, g = hp[s : s + chunk], g_all[s : s + chunk]
                if kept:
                    p = kept[i]
                else:
                    p = h_c @ weight.T
                    _rows(p, tp[s : s + chunk], ctx.fused)
                if grad_h is not None:  # the product scaled in fp32, rounded once into grad_h
                    ph = torch.mm(p, weight, out_dtype=torch.float32) if f32 else (p @ weight).float()
                    torch.mul(ph, g, out=grad_h[s : s + chunk])
                if need_w:
                    hg = torch.mul(h_c, g, out=torch.empty_like(h_c))  # in fp32, rounded once to h's dtype
                    if direct:
                        grad_w = p.T @ hg
                    elif f32:  # fp32 accumulation in the GEMM's epilogue
                        torch.addmm(grad_w, p.T, hg, beta=1 if i else 0, out_dtype=torch.float32, out=grad_w)
                    else:
                        grad_w.add_(p.T @ hg)
        return (
            grad_h[:n] if grad_h is not None else None,
            grad_w.to(ctx.weight_dtype) if grad_w is not None else None,  # a no-op where direct
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int | None = None,
    fused: bool | None = None,
    keep_logits: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of ``h @ weight.T`` against ``targets`` and the argmax class, without the logits.

    ``h`` ``[N, C]``, ``weight`` ``[V, C]`` (an ``nn.Linear`` weight), ``targets`` ``[N]`` in ``0 .. V-1``.
    Returns ``(loss [N] fp32, pred [N] long)``; ``pred`` carries no gradient. Under autocast the matmuls run in the
    autocast dtype (the weight is cast once per call, as autocast would, and its gradient reaches the parameter in
    the parameter's dtype, summed in fp32, without a round trip through the autocast dtype). ``fused``: each chunk's
    per-row work as one Triton kernel (default: on CUDA, where Triton is installed); ``False`` runs the torch
    formula. ``chunk``: rows a chunk (default :data:`DEFAULT_CHUNK`, read at the call). ``keep_logits``: keep the
    chunks' ``softmax - one_hot`` for the backward instead of recomputing it (default :data:`KEEP_LOGITS`)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: h {tuple(h.shape)}, weight {tuple(weight.shape)}, targets "
            f"{tuple(targets.shape)} do not fit [N, C], [V, C], [N]"
        )
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        h = h.to(torch.get_autocast_dtype(dev))  # the weight is cast to h's dtype inside (_LinearCrossEntropy)
    if fused is None:
        fused = h.is_cuda
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    if chunk <= 0:
        raise ValueError(f"linear_cross_entropy: chunk must be positive, got {chunk}")
    keep = KEEP_LOGITS if keep_logits is None else keep_logits
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, bool(fused), bool(keep))
