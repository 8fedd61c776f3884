"""The channel-mix activation as an operator (models/sq_relu.py): its Triton kernel in Triton's CPU interpreter (a
subprocess) and its backward from the output, against relu(k)^2 and autograd."""

from __future__ import annotations

import json

import pytest
import torch

from rwkv_diffusion_rnn.models import sq_relu as mod
from tests.triton_interpreter import run_interpreted


def _interpreter_body() -> None:
    """Subprocess body (TRITON_INTERPRET=1): the operator's forward and gradient against the plain formula's."""
    from tests.triton_interpreter import fit_interpreter_to_numpy

    fit_interpreter_to_numpy()
    torch.manual_seed(11)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(3, 5, 2100, dtype=dtype)  # 31,500 elements: 31 whole programs and a masked tail
        k[0, 0, :4] = 0.0  # the kink
        dy = torch.randn_like(k)
        kk = k.clone().requires_grad_()
        y = mod.sq_relu_op(kk)
        dtype_of_y = y.dtype
        (g,) = torch.autograd.grad((y.float() * dy.float()).sum(), kk)
        kp = k.clone().requires_grad_()
        y0 = mod.sq_relu_plain(kp)
        (g0,) = torch.autograd.grad((y0.float() * dy.float()).sum(), kp)
        exact = 2 * torch.relu(k.double()) * dy.double()
        y, y0 = y.detach().double(), y0.detach().double()
        out[str(dtype)] = {
            "dtype": str(dtype_of_y),
            "y_err": float(((y - y0).abs() / y0.abs().clamp_min(1e-30)).max()),
            "g_rel": float((g.double() - exact).norm() / exact.norm()),
            "g0_rel": float((g0.double() - exact).norm() / exact.norm()),
            "kink": float(g[0, 0, :4].abs().max()),
        }
    print(json.dumps(out))


def test_backward_from_the_output_equals_autograd_of_the_formula():
    """The backward's formula, dk = 2 sqrt(y) dy, on the plain path's output: equal to autograd's in fp64."""
    torch.manual_seed(5)
    k = torch.randn(4, 7, 33, dtype=torch.float64)
    dy = torch.randn_like(k)
    y = mod.sq_relu_plain(k)
    kk = k.clone().requires_grad_()
    (ref,) = torch.autograd.grad((mod.sq_relu_plain(kk) * dy).sum(), kk)
    assert torch.allclose(2 * torch.sqrt(y) * dy, ref, rtol=1e-12, atol=0)


def test_off_cuda_the_plain_formula_runs():
    k = torch.randn(2, 3, 8, requires_grad=True)
    y = mod.sq_relu(k)
    assert torch.equal(y, torch.relu(k) ** 2) and "Pow" in type(y.grad_fn).__name__


def test_the_operator_matches_the_formula_in_the_interpreter():
    pytest.importorskip("triton")
    res = run_interpreted(__file__)
    f32, bf16 = res["torch.float32"], res["torch.bfloat16"]
    assert f32["dtype"] == "torch.float32" and bf16["dtype"] == "torch.bfloat16"
    assert f32["y_err"] <= 1e-6 and f32["g_rel"] <= 1e-6 and f32["kink"] == 0.0
    # bf16: the interpreter's cast truncates (one bf16 step); the gradient reads the rounded output
    assert bf16["y_err"] <= 2.0**-7 and bf16["g_rel"] <= 5e-3 and bf16["kink"] == 0.0
    assert bf16["g_rel"] <= 2 * bf16["g0_rel"]  # no worse than autograd on bf16 tensors, up to rounding


if __name__ == "__main__":
    _interpreter_body()
