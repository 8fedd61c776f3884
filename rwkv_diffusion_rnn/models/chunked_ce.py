"""Head + cross-entropy over a large vocabulary in row chunks, without keeping the logits (issue #6, memory).

``F.cross_entropy(h @ W.T, y)`` at the g1 sizes keeps ``[N, V]`` logits alive for the backward: at 8,192 rows and
65,536 classes that is 1 GiB in bf16 plus 2 GiB in fp32 for the log-softmax and as much again for its gradient,
more than a 0.1B model's weights and optimizer state together. :func:`linear_cross_entropy` computes the loss a
chunk of rows at a time, keeps only the inputs and one log-sum-exp per row, and recomputes each chunk's logits in
the backward (one extra head matmul: BlinkDL's trainer makes the same trade). Rows are padded to a whole number of
chunks, so every matmul has one shape (cuBLAS plans each new shape on the host).

Numerics: the matmuls run in the autocast dtype (or the inputs' dtype without autocast), the softmax in fp32, the
weight gradient accumulates in fp32 — as ``F.cross_entropy(logits.float(), y)`` on autocast logits does, up to the
order of the fp32 sums. Tested against that reference (tests/models/test_chunked_ce.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        n = h.shape[0]
        pad = -n % chunk
        hp = F.pad(h, (0, 0, 0, pad)) if pad else h
        tp = F.pad(targets, (0, pad)) if pad else targets
        m = hp.shape[0]
        loss = torch.empty(m, device=h.device, dtype=torch.float32)
        lse = torch.empty(m, device=h.device, dtype=torch.float32)
        pred = torch.empty(m, device=h.device, dtype=torch.long)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, m, chunk):
                logits = (hp[s : s + chunk] @ weight.T).float()
                lse_c = torch.logsumexp(logits, -1)
                lse[s : s + chunk] = lse_c
                loss[s : s + chunk] = lse_c - logits.gather(1, tp[s : s + chunk, None]).squeeze(1)
                pred[s : s + chunk] = logits.argmax(-1)
        ctx.save_for_backward(hp, weight, tp, lse)
        ctx.n, ctx.chunk = n, chunk
        ctx.mark_non_differentiable(pred)
        return loss[:n], pred[:n]

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_pred):
        hp, weight, tp, lse = ctx.saved_tensors
        n, chunk, m = ctx.n, ctx.chunk, hp.shape[0]
        g_all = F.pad(grad_loss.float(), (0, m - n))  # padded rows: no gradient
        grad_h = torch.empty_like(hp) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        )
        with torch.autocast(hp.device.type, enabled=False):
            for s in range(0, m, chunk):
                h_c = hp[s : s + chunk]
                p = torch.exp((h_c @ weight.T).float() - lse[s : s + chunk, None])  # softmax
                p.scatter_add_(1, tp[s : s + chunk, None], p.new_full((p.shape[0], 1), -1.0))  # - one-hot
                p.mul_(g_all[s : s + chunk, None])
                g = p.to(hp.dtype)
                if grad_h is not None:
                    grad_h[s : s + chunk] = g @ weight
                if grad_w is not None:
                    grad_w.add_(g.T @ h_c)
        return (
            grad_h[:n] if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            None,
            None,
        )


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of ``h @ weight.T`` against ``targets`` and the argmax class, without the logits.

    ``h`` ``[N, C]``, ``weight`` ``[V, C]`` (an ``nn.Linear`` weight), ``targets`` ``[N]`` in ``0 .. V-1``.
    Returns ``(loss [N] fp32, pred [N] long)``; ``pred`` carries no gradient. Under autocast the matmuls run in the
    autocast dtype (the weight is cast once per call, as autocast would)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: h {tuple(h.shape)}, weight {tuple(weight.shape)}, targets "
            f"{tuple(targets.shape)} do not fit [N, C], [V, C], [N]"
        )
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        h, weight = h.to(dt), weight.to(dt)
    elif weight.dtype != h.dtype:
        weight = weight.to(h.dtype)
    return _LinearCrossEntropy.apply(h, weight, targets, chunk)
