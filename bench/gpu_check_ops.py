"""GPU check of the blocks' hand-written Triton operators against the plain functions they replace, then timed:
the channel-mix activation (rwkv_diffusion_rnn/models/sq_relu.py) and the WKV operands
(rwkv_diffusion_rnn/models/wkv_inputs.py), at the 0.1B and 0.4B step shapes (B16 T511).

    PYTHONPATH=$PWD python bench/gpu_check_ops.py --out /tmp/ops.json      # on a CUDA machine

Bounds (relative, against the plain function): the activation's fp32 forward exact and its gradient within 1e-6
of 2 relu(k) dy in fp64; in bf16 its output within one rounding and its gradient no further from the fp64 one than
twice autograd's own. The WKV operands: fp32 1e-5 for outputs and gradients; bf16 1e-2 for outputs and 2e-2 for
gradients (the operator rounds the gated key, -kk and kk * a to bf16 where the plain function keeps the key fp32).
Inputs as in the step under bf16 autocast (activations bf16, parameters fp32) and all-fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_diffusion_rnn.models import sq_relu, wkv_inputs  # noqa: E402
from rwkv_diffusion_rnn.models.rwkv7_regions import DECAY_SCALE, tm_kernel_inputs_plain  # noqa: E402

WIDTHS = (768, 1024)  # 0.1B, 0.4B


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _outputs_and_grads(fn: Callable, xs: list[torch.Tensor], weights: list[torch.Tensor]):
    leaves = [x.clone().requires_grad_() for x in xs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * w).sum() for o, w in zip(outs, weights, strict=True))
    return [o.detach().double() for o in outs], [g.double() for g in torch.autograd.grad(loss, leaves)]


def cuda_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _randn(*shape, dtype=torch.float32, g=None) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", generator=g).to(dtype)


def check_sq_relu(C: int, dtype: torch.dtype) -> dict:
    g = torch.Generator("cuda").manual_seed(0)
    k, dy = _randn(16, 511, 4 * C, dtype=dtype, g=g), _randn(16, 511, 4 * C, g=g)
    (y_op,), (g_op,) = _outputs_and_grads(sq_relu.sq_relu_op, [k], [dy])
    (y_plain,), (g_plain,) = _outputs_and_grads(sq_relu.sq_relu_plain, [k], [dy])
    exact = 2 * torch.relu(k.double()) * dy.double()
    y_err = float(((y_op - y_plain).abs() / y_plain.abs().clamp_min(1e-30)).max())
    e_op, e_plain = _rel(g_op, exact), _rel(g_plain, exact)
    ok = y_err <= (0.0 if dtype == torch.float32 else 2.0**-8) and (
        e_op <= 1e-6 if dtype == torch.float32 else e_op <= 2 * e_plain
    )
    return {"op": "sq_relu", "C": C, "dtype": str(dtype), "y_rel_max": y_err, "grad_rel_op": e_op,
            "grad_rel_plain": e_plain, "ok": ok}  # fmt: skip


def _wkv_inputs(C: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator("cuda").manual_seed(seed)
    return [_randn(16, 511, C, dtype=dtype, g=g) for _ in range(3)] + [0.5 * _randn(1, 1, C, g=g) for _ in range(4)]


def _op(*xs):
    return wkv_inputs.wkv_inputs(*xs, DECAY_SCALE)


def check_wkv_inputs(C: int, dtype: torch.dtype) -> dict:
    xs = _wkv_inputs(C, dtype, 0)
    weights = [_randn(16, 511, C) for _ in range(4)]
    got, got_g = _outputs_and_grads(_op, xs, weights)
    ref, ref_g = _outputs_and_grads(lambda *t: tm_kernel_inputs_plain(*t, C // wkv_inputs.HEAD), xs, weights)
    out = [_rel(a, b) for a, b in zip(got, ref, strict=True)]
    grad = [_rel(a, b) for a, b in zip(got_g, ref_g, strict=True)]
    tol_out, tol_grad = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 2e-2)
    return {"op": "wkv_inputs", "C": C, "dtype": str(dtype), "out_rel": out, "grad_rel": grad,
            "ok": max(out) <= tol_out and max(grad) <= tol_grad}  # fmt: skip


def timings(C: int) -> dict:
    """ms: the activation's forward (operator; the formula compiled), the WKV operands' forward + backward
    (operator; the region compiled), bf16."""
    k = _randn(16, 511, 4 * C, dtype=torch.bfloat16)
    plain_act = torch.compile(sq_relu.sq_relu_plain)
    xs = [x.requires_grad_() for x in _wkv_inputs(C, torch.bfloat16, 1)]
    plain_region = torch.compile(lambda *t: tm_kernel_inputs_plain(*t, C // wkv_inputs.HEAD))

    def fwd_bwd(fn):
        outs = fn(*xs)
        torch.autograd.grad(outs, xs, [torch.ones_like(o) for o in outs])

    return {"sq_relu_op_ms": cuda_ms(lambda: sq_relu.sq_relu_op(k), 50),
            "sq_relu_plain_compiled_ms": cuda_ms(lambda: plain_act(k), 50),
            "wkv_inputs_op_fwd_bwd_ms": cuda_ms(lambda: fwd_bwd(_op)),
            "wkv_inputs_plain_compiled_fwd_bwd_ms": cuda_ms(lambda: fwd_bwd(plain_region))}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the results here (JSON)")
    a = p.parse_args()
    if not torch.cuda.is_available() or sq_relu.triton is None:
        print("needs a CUDA GPU and Triton")
        return 2
    dtypes = (torch.float32, torch.bfloat16)
    checks = [fn(C, d) for fn in (check_sq_relu, check_wkv_inputs) for C in WIDTHS for d in dtypes]
    res = {"device": torch.cuda.get_device_name(), "checks": checks, "time": {C: timings(C) for C in WIDTHS}}
    for c in checks:
        print(c)
    print(res["time"])
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
