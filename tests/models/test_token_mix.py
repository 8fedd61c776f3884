"""The time-mix's token shift and interpolations as one operator (models/token_mix.py), in Triton's CPU interpreter
(a subprocess), against the plain region function ``tm_mix_plain`` under bf16 matmuls: the seven outputs and the
gradients of x, the carried state and the six mix vectors; with and without the second value copy in the loss; and
the channel-mix's one interpolation against ``cm_mix_plain``."""

from __future__ import annotations

import json

import pytest
import torch

from rwkv_diffusion_rnn.models import token_mix as mod
from rwkv_diffusion_rnn.models.rwkv7_regions import cm_mix_plain, tm_mix_plain
from tests.triton_interpreter import run_interpreted


def _case(dtype: torch.dtype, seed: int, use_v2: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, T, C = 2, 37, 2 * mod.COLS  # 74 rows: two whole programs of 32 and a masked tail; two column blocks
    x = torch.randn(B, T, C, generator=g).to(dtype)
    shift = torch.randn(B, C, generator=g)  # a carried state (fp32, as the model keeps it)
    mix = [torch.rand(1, 1, C, generator=g) for _ in range(6)]  # x_r .. x_g in [0, 1), fp32
    weights = [torch.randn(B, T, C, generator=g) for _ in range(7)]
    if not use_v2:
        weights[4] = None  # the first layer: the second value copy feeds nothing

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, shift, *mix)]
        outs = fn(*leaves)
        loss = sum((o.float() * wt).sum() for o, wt in zip(outs, weights, strict=True) if wt is not None)
        grads = torch.autograd.grad(loss, leaves)
        return [o.detach().double() for o in outs], [t.double() for t in grads], [str(o.dtype) for o in outs]

    got, got_g, dtypes = run(lambda *ts: mod.tm_mix(*ts))
    ref, ref_g, _ = run(lambda *ts: tm_mix_plain(*ts, torch.bfloat16))
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    return {"out": [rel(a, b) for a, b in zip(got, ref, strict=True)],
            "grad": [rel(a, b) for a, b in zip(got_g, ref_g, strict=True)], "dtypes": dtypes}  # fmt: skip


def _exact_case(dtype: torch.dtype, seed: int, use_v2: bool) -> dict:
    """The operator's gradients against fp64 autograd of the same formula, where both are exact up to fp32 rounding:
    output gradients and a carried state that bf16 holds exactly (the interpreter's casts truncate where a GPU's
    round, so a state with more bits would differ there by one bf16 step on the first token)."""
    g = torch.Generator().manual_seed(seed)
    B, T, C = 2, 37, 2 * mod.COLS
    x = torch.randn(B, T, C, generator=g).to(dtype)
    shift = torch.randn(B, C, generator=g).to(torch.bfloat16).float()
    mix = [torch.rand(1, 1, C, generator=g) for _ in range(6)]
    weights = [torch.randn(B, T, C, generator=g).to(torch.bfloat16).double() for _ in range(7)]
    if not use_v2:
        weights[4] = None
    leaves = [t.clone().requires_grad_() for t in (x, shift, *mix)]
    outs = mod.tm_mix(*leaves)
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights, strict=True) if w is not None)
    got = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.double().requires_grad_() for t in (x, shift.to(dtype), *mix)]
    ref_outs = tm_mix_plain(*ref_leaves)
    ref_loss = sum((o * w).sum() for o, w in zip(ref_outs, weights, strict=True) if w is not None)
    ref = torch.autograd.grad(ref_loss, ref_leaves)
    rel = lambda a, b: float((a.double() - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    return {"grad": [rel(a, b) for a, b in zip(got, ref, strict=True)], "dx_dtype": str(got[0].dtype)}


def _cm_case(dtype: torch.dtype, seed: int) -> dict:
    """The channel-mix's one interpolation, the same way."""
    g = torch.Generator().manual_seed(seed)
    B, T, C = 2, 37, 2 * mod.COLS
    leaves0 = [torch.randn(B, T, C, generator=g).to(dtype), torch.randn(B, C, generator=g),
               torch.rand(1, 1, C, generator=g)]  # fmt: skip
    weight = torch.randn(B, T, C, generator=g)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in leaves0]
        out = fn(*leaves)
        grads = torch.autograd.grad((out.float() * weight).sum(), leaves)
        return out.detach().double(), [t.double() for t in grads], str(out.dtype)

    got, got_g, dtype_out = run(mod.cm_mix)
    ref, ref_g, _ = run(lambda *ts: cm_mix_plain(*ts, torch.bfloat16))
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    return {"out": [rel(got, ref)], "grad": [rel(a, b) for a, b in zip(got_g, ref_g, strict=True)],
            "dtypes": [dtype_out]}  # fmt: skip


def _interpreter_body() -> None:
    from tests.triton_interpreter import fit_interpreter_to_numpy

    fit_interpreter_to_numpy()
    torch.manual_seed(0)
    print(json.dumps({"fp32": _case(torch.float32, 3, True), "bf16": _case(torch.bfloat16, 4, True),
                      "first": _case(torch.float32, 5, False), "cm_fp32": _cm_case(torch.float32, 6),
                      "cm_bf16": _cm_case(torch.bfloat16, 7), "exact_fp32": _exact_case(torch.float32, 8, True),
                      "exact_bf16": _exact_case(torch.bfloat16, 9, True),
                      "exact_first": _exact_case(torch.float32, 10, False)}))  # fmt: skip


def test_never_without_the_switch_or_on_the_cpu():
    x = torch.randn(1, 3, 128)
    assert not mod.applies(x, torch.zeros(1, 128), torch.bfloat16)
    assert not mod.applies_cm(x, torch.zeros(1, 128), torch.bfloat16)


def test_the_operator_matches_the_region_in_the_interpreter():
    pytest.importorskip("triton")
    res = run_interpreted(__file__)
    assert res["fp32"]["dtypes"] == ["torch.bfloat16"] * 7 and res["cm_fp32"]["dtypes"] == ["torch.bfloat16"]
    exact = {name: res.pop(name) for name in ("exact_fp32", "exact_bf16", "exact_first")}
    for name, case in res.items():
        # outputs: bf16 roundings of the same fp32 values (the plain xv stays fp32: compared after the operator's
        # rounding, ~2e-3); gradients: the operator reads bf16 output gradients where the plain path keeps fp32 ones
        # for xv, and sums in another order
        assert max(case["out"]) < 1e-2 and max(case["grad"]) < 1e-2, (name, case)
    # against fp64 with exactly representable output gradients: fp32 rounding only (x's gradient in bf16 for a bf16
    # x, one rounding); a wrong shift at a row's first token or the tail, or a vector's sum missing a program, would
    # move these by orders of magnitude more
    for name, case in exact.items():
        dx, rest = case["grad"][0], case["grad"][1:]
        assert max(rest) < 1e-5 and dx < (1e-5 if case["dx_dtype"] == "torch.float32" else 1e-2), (name, case)


if __name__ == "__main__":
    _interpreter_body()
