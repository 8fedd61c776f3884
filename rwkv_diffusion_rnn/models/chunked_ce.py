"""Head + cross-entropy over a large vocabulary in row chunks, without the fp32 logits (memory).

``F.cross_entropy(h @ W.T, y)`` at the g1 sizes keeps ``[N, V]`` logits alive for the backward: at 8,192 rows and
65,536 classes that is 1 GiB in bf16 plus 2 GiB in fp32 for the log-softmax and as much again for its gradient,
more than a 0.1B model's weights and optimizer state together. :func:`linear_cross_entropy` computes the loss a
chunk of rows at a time and keeps the inputs, one log-sum-exp per row and (by default, :data:`KEEP_LOGITS`) the
chunks' low-precision logits; with ``keep_logits=False`` it keeps no logits and recomputes each chunk's in the
backward (one extra head matmul for ~1 GiB less). Rows are padded to a whole number of chunks, so every matmul has
one shape (cuBLAS plans each new shape on the host).

Numerics: the matmuls run in the autocast dtype (or the inputs' dtype without autocast), the softmax in fp32, the
weight gradient accumulates in fp32 — as ``F.cross_entropy(logits.float(), y)`` on autocast logits does, up to the
order of the fp32 sums. Tested against that reference (tests/models/test_chunked_ce.py).

Fused per-chunk work (on CUDA by default): the fp32 work on a chunk's ``[chunk, V]`` logits — log-sum-exp, target
logit and argmax in the forward; softmax minus one-hot times the row's gradient, cast back, in the backward — is
one compiled kernel each way (``torch.compile`` of :func:`_chunk_stats` / :func:`_chunk_grad`), reading the
low-precision logits once instead of materialising fp32 copies between five or six separate kernels (a profile
of the 0.1B step on an H200: ~4.2 ms on that fp32 softmax; docs/RESULTS.md, 2026-11-27, "our Triton WKV-7
kernels on the GPU; a profile of the step"). The eager functions are the reference
(``fused=False``); the same code runs compiled.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# Rows a chunk, and whether each chunk's low-precision logits are kept for the backward instead of recomputed (one
# head matmul fewer; the [N, V] logits held in bf16, 1 GiB at 8,192 rows x 65,536; DIFFRWKV_CE_KEEP_LOGITS=0 turns
# it off). The g1 heads on an H100 (bench/gpu_check_ce.py --time, 2026-12-06), fwd + bwd at 8,192 rows: 1,024 rows
# recomputed 8.29 / 9.99 ms (width 768 / 1,024), 4,096 kept 5.60 / 6.79 ms, for 2.1 GiB instead of 0.5 at the peak.
DEFAULT_CHUNK = 4096
KEEP_LOGITS = os.environ.get("DIFFRWKV_CE_KEEP_LOGITS", "1") != "0"


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's log-sum-exp, cross-entropy and argmax from its logits (any float dtype), in fp32."""
    x = logits.float()
    lse = torch.logsumexp(x, -1)
    return lse, lse - x.gather(1, targets[:, None]).squeeze(1), x.argmax(-1)


def _chunk_grad(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d(loss . g)/d(logits) for one chunk: ``(softmax - one_hot) * g`` in fp32, returned in the logits' dtype."""
    p = torch.exp(logits.float() - lse[:, None])
    hit = torch.arange(logits.shape[1], device=logits.device)[None, :] == targets[:, None]
    return (torch.where(hit, p - 1.0, p) * g[:, None]).to(logits.dtype)


_COMPILED: dict[str, object] = {}


def _kernels(fused: bool):
    """``(stats, grad)``: the compiled pair when ``fused`` (compiled once per process, on first use), else eager.
    One graph per (chunk, V, dtype, device); past dynamo's recompile limit a new combination runs eager (no
    ``fullgraph``, so that is a fallback, not an error), and where the compiler cannot build the kernels at all
    (no Triton for this GPU) the eager pair is used from then on, with one warning."""
    if not fused or _COMPILED.get("failed"):
        return _chunk_stats, _chunk_grad
    if not _COMPILED:
        _COMPILED["stats"] = _guarded(torch.compile(_chunk_stats, dynamic=False), _chunk_stats)
        _COMPILED["grad"] = _guarded(torch.compile(_chunk_grad, dynamic=False), _chunk_grad)
    return _COMPILED["stats"], _COMPILED["grad"]


def _guarded(compiled, eager):
    def run(*args):
        if _COMPILED.get("failed"):
            return eager(*args)
        try:
            return compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            import warnings

            _COMPILED["failed"] = True
            msg = f"chunked cross-entropy: compiled kernels unavailable ({type(exc).__name__}); running eager"
            warnings.warn(msg, stacklevel=2)
            return eager(*args)

    return run


_ADDMM_F32: dict[tuple[str, torch.dtype], bool] = {}


def _addmm_f32_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(c_fp32, a, b, out_dtype=torch.float32, out=c_fp32)`` with ``dtype`` (bf16 / fp16)
    operands works on ``device`` and accumulates right: the head's weight gradient is then summed over chunks inside
    the GEMM, in fp32, instead of a low-precision product added by a separate fp32 pass per chunk (1.65 ms of a 0.1B
    step on an H100). Checked once per (device, dtype) on small random matrices, ``a`` transposed as the real call's
    is, against fp32 math; False (the plain path) on any error or mismatch."""
    key = (str(device), dtype)
    if key not in _ADDMM_F32:
        ok = False
        try:
            g = torch.Generator(device).manual_seed(0)
            with torch.autocast(device.type, enabled=False):
                a = torch.randn(48, 64, device=device, generator=g).to(dtype).T
                b = torch.randn(48, 40, device=device, generator=g).to(dtype)
                c = torch.randn(64, 40, device=device, generator=g)
                want = c + a.float() @ b.float()
                torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
                ok = bool(torch.allclose(c, want, rtol=1e-4, atol=1e-3))
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _ADDMM_F32[key] = ok
    return _ADDMM_F32[key]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, fused: bool, keep: bool):
        # the weight arrives in its own dtype (the fp32 parameter) and is cast to h's here, once: its gradient, summed
        # in fp32, then goes back to the parameter as it is, where a cast outside this function would have rounded it
        # to h's dtype and cast it back (two [V, C] copies a step, and a bf16 rounding of the head's gradient)
        ctx.weight_dtype = weight.dtype
        weight = weight.to(h.dtype)
        n = h.shape[0]
        pad = -n % chunk
        hp = F.pad(h, (0, 0, 0, pad)) if pad else h
        tp = F.pad(targets, (0, pad)) if pad else targets
        m = hp.shape[0]
        loss = torch.empty(m, device=h.device, dtype=torch.float32)
        lse = torch.empty(m, device=h.device, dtype=torch.float32)
        pred = torch.empty(m, device=h.device, dtype=torch.long)
        stats, _ = _kernels(fused)
        kept = []
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, m, chunk):
                logits = hp[s : s + chunk] @ weight.T
                lse[s : s + chunk], loss[s : s + chunk], pred[s : s + chunk] = stats(logits, tp[s : s + chunk])
                if keep:
                    kept.append(logits)
        ctx.save_for_backward(hp, weight, tp, lse, *kept)
        ctx.n, ctx.chunk, ctx.fused = n, chunk, fused
        ctx.mark_non_differentiable(pred)
        return loss[:n], pred[:n]

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_pred):
        hp, weight, tp, lse, *kept = ctx.saved_tensors
        n, chunk, m = ctx.n, ctx.chunk, hp.shape[0]
        g_all = F.pad(grad_loss.float(), (0, m - n))  # padded rows: no gradient
        grad_h = torch.empty_like(hp) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        )
        _, grad_fn = _kernels(ctx.fused)
        in_gemm = (grad_w is not None and hp.is_cuda and hp.dtype in (torch.bfloat16, torch.float16)
                   and _addmm_f32_ok(hp.device, hp.dtype))  # fmt: skip
        with torch.autocast(hp.device.type, enabled=False):
            for i, s in enumerate(range(0, m, chunk)):
                h_c = hp[s : s + chunk]
                logits = kept[i] if kept else h_c @ weight.T
                g = grad_fn(logits, lse[s : s + chunk], tp[s : s + chunk], g_all[s : s + chunk])
                if grad_h is not None:
                    grad_h[s : s + chunk] = g @ weight
                if in_gemm:  # fp32 accumulation in the GEMM's epilogue
                    torch.addmm(grad_w, g.T, h_c, out_dtype=torch.float32, out=grad_w)
                elif grad_w is not None:
                    grad_w.add_(g.T @ h_c)
        return (
            grad_h[:n] if grad_h is not None else None,
            grad_w.to(ctx.weight_dtype) if grad_w is not None else None,
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
    fp32 work as one compiled kernel each way (default: on CUDA); ``False`` runs the eager reference. ``chunk``: rows
    a chunk (default :data:`DEFAULT_CHUNK`, read at the call). ``keep_logits``: keep the chunks' logits for the
    backward instead of recomputing them (default :data:`KEEP_LOGITS`)."""
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
