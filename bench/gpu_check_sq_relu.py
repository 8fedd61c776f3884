"""GPU check of the channel-mix activation operator (rwkv_diffusion_rnn/models/sq_relu.py): forward and gradient
against the plain formula at the FFN shapes of the 0.1B and 0.4B steps (B16 T511, 4C), bf16 and fp32, and the
forward's time against the plain formula's compiled kernel.

    PYTHONPATH=$PWD python bench/gpu_check_sq_relu.py --out /tmp/sq_relu.json      # on a CUDA machine

Bounds: fp32 forward exact, gradient within 1e-6 (relative norm) of 2 relu(k) dy in fp64; bf16 output within one
rounding of the formula's, gradient no further from the fp64 one than twice autograd's own bf16 gradient.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_diffusion_rnn.models import sq_relu as mod  # noqa: E402


def check(shape: tuple[int, ...], dtype: torch.dtype) -> dict:
    g = torch.Generator("cuda").manual_seed(0)
    k = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    dy = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    exact = 2 * torch.relu(k.double()) * dy.double()
    grads, outs = {}, {}
    for name, fn in (("op", mod.sq_relu_op), ("plain", mod.sq_relu_plain)):
        kk = k.clone().requires_grad_()
        y = fn(kk)
        (grads[name],) = torch.autograd.grad(y, kk, dy)
        outs[name] = y.detach()
    rel = lambda a: float((a.double() - exact).norm() / exact.norm())  # noqa: E731
    y_err = float(
        ((outs["op"].double() - outs["plain"].double()).abs() / outs["plain"].double().abs().clamp_min(1e-30)).max()
    )
    g_op, g_plain = rel(grads["op"]), rel(grads["plain"])
    bound_y = 0.0 if dtype == torch.float32 else 2.0**-8
    ok = y_err <= bound_y and (g_op <= 1e-6 if dtype == torch.float32 else g_op <= 2 * g_plain)
    return {"shape": list(shape), "dtype": str(dtype), "y_rel_max": y_err, "grad_rel_op": g_op,
            "grad_rel_plain": g_plain, "ok": ok}  # fmt: skip


def time_forward(shape: tuple[int, ...]) -> dict:
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    plain = torch.compile(mod.sq_relu_plain)
    out = {}
    for name, fn in (("op", mod.sq_relu_op), ("plain_compiled", plain)):
        for _ in range(3):
            fn(k)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fn(k)
        end.record()
        torch.cuda.synchronize()
        out[name + "_ms"] = start.elapsed_time(end) / 50
    out["bytes"] = 2 * k.numel() * k.element_size()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the results here (JSON)")
    a = p.parse_args()
    if not torch.cuda.is_available() or mod.triton is None:
        print("needs a CUDA GPU and Triton")
        return 2
    shapes = [(16, 511, 3072), (16, 511, 4096)]
    checks = [check(s, d) for s in shapes for d in (torch.float32, torch.bfloat16)]
    res = {"device": torch.cuda.get_device_name(), "checks": checks,
           "time": {"x".join(map(str, s)): time_forward(s) for s in shapes}}  # fmt: skip
    for c in res["checks"]:
        print(c)
    print(res["time"])
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0 if all(c["ok"] for c in res["checks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
