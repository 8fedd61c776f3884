"""Chunked head + cross-entropy (models/chunked_ce.py) against F.cross_entropy on materialised logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rwkv_diffusion_rnn.models import chunked_ce
from rwkv_diffusion_rnn.models.chunked_ce import linear_cross_entropy
from tests.triton_interpreter import run_interpreted


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


@pytest.mark.parametrize("chunk", [2048, 16])
def test_a_bf16_weight_gets_its_gradient_rounded_once(chunk):
    """bf16 ``h`` and weight (master-weight copies): one chunk's GEMM writes the bf16 gradient directly, its fp32 sum
    rounded once; several chunks are summed across chunks (on the CPU each chunk's product is rounded first)."""
    seed = 105
    h, w, y, gl = _case(50, 32, 500, seed)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    loss, _ = linear_cross_entropy(hb, wb, y, chunk=chunk, keep_logits=True)
    (loss * gl).sum().backward()
    assert wb.grad.dtype == torch.bfloat16 and hb.grad.dtype == torch.bfloat16
    # the reference in fp32 from the same bf16 numbers: softmax - one_hot of the bf16 logits, times the weighting
    logits = (hb.detach() @ wb.detach().T).float()
    p = (logits.softmax(-1) - F.one_hot(y, 500)).bfloat16().float()
    hg = (hb.detach().float() * gl[:, None]).bfloat16().float()
    want = p.T @ hg
    err = (wb.grad.float() - want).abs()
    terms = p.abs().T @ hg.abs()  # what the sum's rounding errors scale with
    if chunk >= 50:  # one rounding of the fp32 sum: half a bf16 step of the result, plus the sum's own fp32 error
        assert bool((err <= 2**-8 * want.abs() + 1e-6 * terms).all()), f"seed {seed}"
    else:  # a rounding per chunk product and one of the total
        assert bool((err <= 2**-7 * terms).all()), f"seed {seed}"


def test_rows_are_padded_to_pad_rows_and_the_last_chunk_is_shorter(monkeypatch):
    """37 rows in chunks of 16 with PAD_ROWS 4: padded to 40, chunks of 16, 16 and 8 rows (the head's matmuls see
    those shapes), and the result still the reference's."""
    monkeypatch.setattr(chunked_ce, "PAD_ROWS", 4)
    h, w, y, gl = _case(37, 12, 71, 5)
    ref = F.cross_entropy(h @ w.T, y, reduction="none")
    (ref * gl).sum().backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    rows = []
    real_matmul = torch.Tensor.__matmul__

    def recording(a, b):
        if b.shape == (12, 71):  # the logits matmul: h_chunk @ weight.T
            rows.append(a.shape[0])
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", recording)
    loss, _ = linear_cross_entropy(h, w, y, chunk=16, keep_logits=True)
    monkeypatch.setattr(torch.Tensor, "__matmul__", real_matmul)
    (loss * gl).sum().backward()
    assert rows == [16, 16, 8]
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-4, atol=1e-5)


def test_no_rows_gives_an_empty_loss_and_zero_gradients():
    """A batch with no selected row (no masked token): an empty loss, and the head's gradient zeros."""
    w = torch.randn(31, 8, requires_grad=True)
    h = torch.randn(0, 8, requires_grad=True)
    loss, pred = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), chunk=16)
    assert loss.shape == pred.shape == (0,)
    loss.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w)) and h.grad.shape == (0, 8)


def test_a_kernel_that_cannot_run_falls_back_to_the_formula_once(monkeypatch):
    """Where the kernel's first launch raises (a GPU Triton cannot compile for), the torch formula runs instead, with
    one warning, and the kernel is not tried again."""
    calls = []

    def failing(logits, targets):
        calls.append(1)
        raise RuntimeError("no Triton backend for this GPU")

    monkeypatch.setattr(chunked_ce, "_kernel_applies", lambda logits: True)
    monkeypatch.setattr(chunked_ce, "rows_kernel", failing)
    monkeypatch.setattr(chunked_ce, "_KERNEL", {})
    h, w, y, gl = _case(20, 8, 53, 3)
    ref = F.cross_entropy(h @ w.T, y, reduction="none")
    with pytest.warns(UserWarning, match="Triton kernel failed .*RuntimeError.*torch formula"):
        loss, _ = linear_cross_entropy(h, w, y, chunk=16, fused=True)
    loss2, _ = linear_cross_entropy(h, w, y, chunk=16, fused=True)
    assert calls == [1]
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss2, ref, rtol=1e-5, atol=1e-5)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))


def _interpreter_body() -> None:
    """Subprocess body (TRITON_INTERPRET=1): the rows kernel against :func:`rows_reference` on one chunk of logits
    with ties for the max, -inf logits and a width that is no multiple of the block, fp32 and bf16."""
    import json

    from tests.triton_interpreter import fit_interpreter_to_numpy

    fit_interpreter_to_numpy()
    g = torch.Generator().manual_seed(31)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        n, v = 37, 700
        x = (torch.randn(n, v, generator=g) * 3).to(dtype)
        x[3, 5] = x[3, 600] = x[3, 650] = x[3].max() + 1  # ties: the first column wins
        x[4, :300] = float("-inf")  # a lane's first block all -inf
        x[5, 699] = x[5].max() + 1  # the max in the masked last block
        t = torch.randint(0, v, (n,), generator=g)
        t[4], t[5] = 400, 699  # a finite target where -inf logits sit beside it
        want_p = x.clone()
        want_loss, want_pred = chunked_ce.rows_reference(want_p, t)
        for block in (256, 1024):  # several blocks a row; one block past the row's end
            p = x.clone()
            loss, pred = chunked_ce.rows_kernel(p, t, block=block)
            out[f"{dtype} {block}"] = {
                "loss": float((loss - want_loss).abs().max()),
                "pred": bool(torch.equal(pred, want_pred)),
                "pred3": int(pred[3]),
                "p": float((p.float() - want_p.float()).abs().max()),
                "p_dtype": str(p.dtype),
                "finite": bool(torch.isfinite(p).all()),
            }
    print(json.dumps(out))


def test_the_rows_kernel_matches_the_reference_in_the_interpreter():
    pytest.importorskip("triton")
    res = run_interpreted(__file__)
    assert len(res) == 4
    for key, r in res.items():
        assert r["pred"] and r["pred3"] == 5 and r["finite"], key
        assert r["loss"] <= 1e-5, key
        # fp32: summation order; bf16: the interpreter's cast truncates where torch rounds (one step, < 2^-8)
        assert r["p"] <= (2e-6 if "float32" in key else 2.0**-8), key
        assert r["p_dtype"] == key.split()[0]


def test_the_forward_leaves_softmax_minus_one_hot_for_the_backward():
    """The kept chunks hold the gradient's direction; the backward scales the [N, C] operands by the rows' weights:
    the same gradients as scaling the [N, V] gradient (the reference's way)."""
    h, w, y, gl = _case(20, 8, 53, 9)
    logits = (h @ w.T).detach()
    p = logits.clone()
    loss, pred = chunked_ce.rows_reference(p, y)
    want = torch.softmax(logits, -1) - F.one_hot(y, 53)
    torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, reduction="none"), rtol=1e-5, atol=1e-6)
    assert torch.equal(pred, logits.argmax(-1))
    gh = gl[:, None] * (p @ w.detach())
    gw = p.T @ (gl[:, None] * h.detach())
    torch.testing.assert_close(gh, (want * gl[:, None]) @ w.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, (want * gl[:, None]).T @ h.detach(), rtol=1e-5, atol=1e-6)


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


if __name__ == "__main__":
    _interpreter_body()
