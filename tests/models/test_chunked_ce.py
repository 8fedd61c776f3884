"""Chunked head + cross-entropy (models/chunked_ce.py) against F.cross_entropy on materialised logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rwkv_diffusion_rnn.models.chunked_ce import linear_cross_entropy


def _case(n, c, v, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, requires_grad=True)
    w = (torch.randn(v, c, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    gl = torch.rand(n, generator=g)  # a weighted sum, as the ELBO weighting does
    return h, w, y, gl


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("n,chunk", [(37, 8), (64, 16), (5, 1024), (1, 1)])
def test_matches_cross_entropy_on_logits_fp32(n, chunk, keep):
    seed = 101
    h, w, y, gl = _case(n, 24, 301, seed)
    ref = F.cross_entropy(h @ w.T, y, reduction="none")
    (ref * gl).sum().backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss, pred = linear_cross_entropy(h, w, y, chunk=chunk, keep_logits=keep)
    (loss * gl).sum().backward()
    assert loss.dtype == torch.float32 and pred.dtype == torch.long and not pred.requires_grad
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    assert torch.equal(pred, (h @ w.T).argmax(-1))
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")


def test_under_bf16_autocast_matches_autocast_logits():
    """Under autocast the reference is what the trainer did before: bf16 logits, fp32 log-softmax."""
    seed = 102
    h, w, y, gl = _case(50, 32, 500, seed)
    with torch.autocast("cpu", torch.bfloat16):
        ref = F.cross_entropy((h @ w.T).float(), y, reduction="none")
    (ref * gl).sum().backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", torch.bfloat16):
        loss, _ = linear_cross_entropy(h, w, y, chunk=16)
    (loss * gl).sum().backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3, msg=f"seed {seed}")
    for got, want in ((h.grad, ref_gh), (w.grad, ref_gw)):
        assert float((got - want).norm() / want.norm()) < 2e-2, f"seed {seed}"


def test_under_autocast_the_weight_gradient_is_not_rounded_to_bf16():
    """The fp32 head's gradient reaches the parameter as summed (in fp32), not rounded to the autocast dtype and cast
    back: summed over 4 chunks, most of its entries are not bf16 numbers."""
    h, w, y, gl = _case(50, 32, 500, 104)
    with torch.autocast("cpu", torch.bfloat16):
        loss, _ = linear_cross_entropy(h, w, y, chunk=16)
    (loss * gl).sum().backward()
    assert w.grad.dtype == torch.float32
    off_grid = (w.grad != w.grad.bfloat16().float()).float().mean().item()
    assert off_grid > 0.5, off_grid


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_chunks_match_the_eager_reference(autocast):
    """The compiled per-chunk kernels (the CUDA default) against the eager functions they compile, on the CPU."""
    seed = 103
    out = []
    for fused in (False, True):
        h, w, y, gl = _case(45, 32, 700, seed)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss, pred = linear_cross_entropy(h, w, y, chunk=16, fused=fused)
        (loss * gl).sum().backward()
        out.append((loss.detach(), pred, h.grad, w.grad))
    (l0, p0, gh0, gw0), (l1, p1, gh1, gw1) = out
    # the same fp32 arithmetic fused: differences are summation order only (a bf16 softmax would miss by ~1e-2)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    assert torch.equal(p1, p0), f"seed {seed}"
    for got, want in ((gh1, gh0), (gw1, gw0)):
        assert float((got - want).norm() / want.norm()) < 1e-4, f"seed {seed}"


def test_kept_logits_skip_the_backward_matmul(monkeypatch):
    """With ``keep_logits`` the backward reuses the forward's logits: the same gradients from one head matmul
    fewer (counted), and the kept logits are the forward's own tensors."""
    h, w, y, gl = _case(40, 16, 97, 7)
    grads, matmuls = {}, {}
    real_matmul = torch.Tensor.__matmul__
    for keep in (False, True):
        count = [0]

        def counting(a, b, count=count):
            count[0] += 1
            return real_matmul(a, b)

        monkeypatch.setattr(torch.Tensor, "__matmul__", counting)
        h.grad = w.grad = None
        loss, _ = linear_cross_entropy(h, w, y, chunk=16, keep_logits=keep)
        (loss * gl).sum().backward()
        monkeypatch.setattr(torch.Tensor, "__matmul__", real_matmul)
        grads[keep], matmuls[keep] = (h.grad.clone(), w.grad.clone()), count[0]
    assert matmuls[False] - matmuls[True] == 3  # one logits matmul a chunk, 3 chunks of 16 rows for 40
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
