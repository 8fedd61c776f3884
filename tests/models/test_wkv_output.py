"""The WKV output's GroupNorm, bonus and gate as one operator (models/wkv_output.py), in Triton's CPU interpreter (a
subprocess), against the plain region function ``tm_output_plain``: the bf16 output and the gradients of the five
operands and three parameters; and against fp64 autograd of the same formula where both are exact to fp32."""

from __future__ import annotations

import json

import pytest
import torch

from rwkv_diffusion_rnn.models import wkv_output as mod
from rwkv_diffusion_rnn.models.rwkv7_regions import tm_output_plain
from tests.triton_interpreter import run_interpreted

EPS = 64e-5  # the model's GroupNorm eps (head size x 1e-5)


def _inputs(dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, T, H = 2, 37, 2  # 74 rows: two whole programs of 32 and a masked tail; two heads
    C = H * mod.HEAD
    acts = [torch.randn(B, T, C, generator=g).to(dtype) for _ in range(5)]  # o, r, k, v, g
    params = [1 + 0.3 * torch.randn(C, generator=g), 0.3 * torch.randn(C, generator=g),
              0.5 * torch.randn(H, mod.HEAD, generator=g)]  # ln_w, ln_b, r_k (fp32)  # fmt: skip
    dy = torch.randn(B, T, C, generator=g).to(torch.bfloat16).double()  # exact in bf16: the op's dy is bf16
    return acts, params, dy, H


def _run(fn, acts, params, dy, to_double: bool):
    leaves = [x.clone().double() if to_double else x.clone() for x in (*acts, *params)]
    leaves = [x.requires_grad_() for x in leaves]
    o, r, k, v, g, lnw, lnb, rk = leaves
    y = fn(o, lnw, lnb, r, k, v, rk, g)
    grads = torch.autograd.grad((y.double() * dy).sum(), leaves)
    return y.detach().double(), [x.double() for x in grads], str(y.dtype)


def _op(o, w, b, r, k, v, rk, g):
    return mod.tm_output(o, w, b, EPS, r, k, v, rk, g)


def _plain(n_head: int, mm_dtype: torch.dtype | None):
    return lambda o, w, b, r, k, v, rk, g: tm_output_plain(o, w, b, EPS, r, k, v, rk, g, n_head, mm_dtype)


def _case(dtype: torch.dtype, seed: int) -> dict:
    acts, params, dy, H = _inputs(dtype, seed)
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    got, got_g, y_dtype = _run(_op, acts, params, dy, False)
    ref, ref_g, _ = _run(_plain(H, torch.bfloat16), acts, params, dy, False)
    _, exact_g, _ = _run(_plain(H, None), acts, params, dy, True)
    return {"out": rel(got, ref), "grad": [rel(a, b) for a, b in zip(got_g, ref_g, strict=True)],
            "grad_exact": [rel(a, b) for a, b in zip(got_g, exact_g, strict=True)], "dtype": y_dtype}  # fmt: skip


def _interpreter_body() -> None:
    from tests.triton_interpreter import fit_interpreter_to_numpy

    fit_interpreter_to_numpy()
    torch.manual_seed(0)
    print(json.dumps({"fp32": _case(torch.float32, 3), "bf16": _case(torch.bfloat16, 4)}))


def test_never_without_the_switch_or_on_the_cpu():
    x = torch.randn(1, 3, 128)
    assert not mod.applies(x, x, x, x, x, 2, torch.bfloat16)


def test_the_operator_matches_the_region_in_the_interpreter():
    pytest.importorskip("triton")
    res = run_interpreted(__file__)
    f32, bf16 = res["fp32"], res["bf16"]
    assert f32["dtype"] == bf16["dtype"] == "torch.bfloat16"
    # against the plain region with a bf16 output: one bf16 rounding of the output (the interpreter's cast
    # truncates); its gradients the same formula in another order
    assert f32["out"] < 1e-2 and bf16["out"] < 1e-2, (f32, bf16)
    assert max(f32["grad"]) < 1e-5 and max(bf16["grad"]) < 1e-2, (f32, bf16)
    # fp32 operands against fp64 autograd with a dy bf16 holds exactly: fp32 rounding only
    assert max(f32["grad_exact"]) < 1e-5, f32


if __name__ == "__main__":
    _interpreter_body()
