"""GPU check of the hand-fused WKV-operand operator (rwkv_diffusion_rnn/models/wkv_inputs.py) against the plain
region ``tm_kernel_inputs`` at the 0.1B and 0.4B step shapes (B16 T511, C 768 / 1024), then both timed forward +
backward (the region compiled, as the blocks run it).

    PYTHONPATH=$PWD python bench/gpu_check_wkv_inputs.py --out /tmp/wkv_inputs.json      # on a CUDA machine

Inputs as in the step under bf16 autocast: ``k`` and the two low-rank outputs bf16, the four parameters fp32 (and
an all-fp32 case). Bounds (relative norm against the plain function): fp32 1e-5 for outputs and gradients; bf16
1e-2 for outputs and 2e-2 for gradients (the operator rounds the gated key, -kk and kk * a to bf16 where the plain
function keeps the key in fp32).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_diffusion_rnn.models import wkv_inputs as mod  # noqa: E402
from rwkv_diffusion_rnn.models.rwkv7_regions import DECAY_SCALE, tm_kernel_inputs  # noqa: E402


def _inputs(C: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator("cuda").manual_seed(seed)
    acts = [torch.randn(16, 511, C, device="cuda", generator=g).to(dtype) for _ in range(3)]
    return acts + [0.5 * torch.randn(1, 1, C, device="cuda", generator=g) for _ in range(4)]


def _op(*xs):
    return mod.wkv_inputs_op(*xs, DECAY_SCALE)


def check(C: int, dtype: torch.dtype) -> dict:
    xs = _inputs(C, dtype)
    weights = [torch.randn(16, 511, C, device="cuda") for _ in range(4)]
    res = {}
    for name, fn in (("op", _op), ("plain", lambda *t: tm_kernel_inputs(*t, C // mod.HEAD))):
        leaves = [x.clone().requires_grad_() for x in xs]
        outs = fn(*leaves)
        loss = sum((o.float() * w).sum() for o, w in zip(outs, weights, strict=True))
        res[name] = ([o.detach().double() for o in outs], [x.double() for x in torch.autograd.grad(loss, leaves)])
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    out = [rel(a, b) for a, b in zip(res["op"][0], res["plain"][0], strict=True)]
    grad = [rel(a, b) for a, b in zip(res["op"][1], res["plain"][1], strict=True)]
    tol_out, tol_grad = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 2e-2)
    return {"C": C, "dtype": str(dtype), "out_rel": out, "grad_rel": grad,
            "ok": max(out) <= tol_out and max(grad) <= tol_grad}  # fmt: skip


def time_fwd_bwd(C: int) -> dict:
    xs = [x.requires_grad_() for x in _inputs(C, torch.bfloat16, 1)]
    plain = torch.compile(lambda *t: tm_kernel_inputs(*t, C // mod.HEAD))
    out = {}
    for name, fn in (("op", _op), ("plain_compiled", plain)):

        def once(fn=fn):
            outs = fn(*xs)
            torch.autograd.grad(outs, xs, [torch.ones_like(o) for o in outs])

        for _ in range(3):
            once()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            once()
        end.record()
        torch.cuda.synchronize()
        out[name + "_ms"] = start.elapsed_time(end) / 20
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the results here (JSON)")
    a = p.parse_args()
    if not torch.cuda.is_available() or mod.triton is None:
        print("needs a CUDA GPU and Triton")
        return 2
    checks = [check(C, d) for C in (768, 1024) for d in (torch.float32, torch.bfloat16)]
    res = {"device": torch.cuda.get_device_name(), "checks": checks,
           "time_fwd_bwd": {C: time_fwd_bwd(C) for C in (768, 1024)}}  # fmt: skip
    for c in checks:
        print(c)
    print(res["time_fwd_bwd"])
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
