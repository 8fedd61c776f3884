"""GPU check of the master-weight AdamW (rwkv_diffusion_rnn/master_weights.py): the Triton update against the same
update in torch, tensor by tensor, then both against torch's fused AdamW in time.

    PYTHONPATH=$PWD python bench/gpu_check_master.py --out /tmp/master.json     # on a CUDA machine
    PYTHONPATH=$PWD python bench/gpu_check_master.py --cpu                      # the torch path only, a dry run

Correctness: two copies of one RWKV-7 model (``--shape``), the same gradients drawn for both (bf16 for the matmul
weights, fp32 for the rest; some tensors without a gradient on some steps), a clipping divisor and one skipped
step (``found_inf``); after ``--steps`` updates every master, moment, step count and bf16 copy of the kernel's
optimizer must match the torch path's within ``--tol`` (relative, max over elements; the copies within one bf16
rounding), and the kernel path's gradient norm (``grad_norm``, the clipping's) within ``--tol`` of torch's over
the same gradients at every step. Time: the median of 20 updates of the 0.1B and 0.4B parameter sets, our kernel
against torch's fused AdamW over fp32 parameters (what the step runs without master weights), with the bytes each
moves; and the gradient norm, the flat kernel against torch's multi-tensor norm.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config  # noqa: E402
from rwkv_diffusion_rnn.optimizer import build_optimizer, clip_grads_on_device  # noqa: E402

SHAPES = {"tiny": (2, 128, 1000), "0.1b": (12, 768, 65536), "0.4b": (24, 1024, 65536)}


def model_on(shape: str, dev: torch.device) -> RWKV7:
    torch.manual_seed(0)
    with torch.device(dev):
        return RWKV7(RWKV7Config.for_shape(*SHAPES[shape]))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def check(shape: str, dev: torch.device, steps: int, tol: float) -> dict:
    model = model_on(shape, dev)
    twin = copy.deepcopy(model)
    ours = build_optimizer(model, 1e-3, 0.1, master_weights=True)
    ref = build_optimizer(twin, 1e-3, 0.1, master_weights=True)
    ref.kernel = False
    if dev.type == "cuda" and not ours.kernel:
        return {"status": "error: the Triton kernel is not in use on CUDA"}
    gen = torch.Generator(dev).manual_seed(1)
    norm_err = 0.0
    for it in range(steps):
        for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            if it == 1 and n.endswith(".x_k"):  # no gradient this step: its step count and moments stay
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, device=dev, generator=gen) * 0.01
            p.grad, q.grad = g.to(p.dtype), g.to(q.dtype)
        if ours.kernel:  # the one-launch gradient norm against torch's over the same gradients
            gs = [p.grad.float().flatten() for p in model.parameters() if p.grad is not None]
            norm_err = max(norm_err, rel(ours.grad_norm(), torch.linalg.vector_norm(torch.cat(gs))))
        for opt in (ours, ref):
            opt.grad_scale = torch.tensor(1.5, device=dev)
            opt.found_inf = torch.tensor(1.0 if it == steps - 1 else 0.0, device=dev)  # the last one skipped
            opt.step()
    worst: dict[str, tuple[float, str]] = {}
    for key, get in (
        ("master", lambda o, w: w),
        ("exp_avg", lambda o, w: o.state[w]["exp_avg"]),
        ("exp_avg_sq", lambda o, w: o.state[w]["exp_avg_sq"]),
        ("step", lambda o, w: o.state[w]["step"]),
    ):
        worst[key] = max(
            (rel(get(ours, a), get(ref, b)), n)
            for (n, a), b in zip(ours.master_tensors().items(), ref.master_tensors().values(), strict=True)
        )
    copies = max((rel(p, q), n) for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True))
    ok = all(v[0] <= tol for v in worst.values()) and copies[0] <= 2.0**-7 and norm_err <= tol
    return {
        "status": "ok" if ok else "FAILED",
        "shape": shape,
        "steps": steps,
        "tol": tol,
        "max_rel": {k: {"value": v[0], "tensor": v[1]} for k, v in worst.items()},
        "module_copies_max_rel": {"value": copies[0], "tensor": copies[1]},
        "grad_norm_max_rel": norm_err,
    }


def timed(fn, dev: torch.device, n: int = 20) -> float:
    times = []
    for _ in range(n + 3):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[3:])


def timing(shape: str, dev: torch.device) -> dict:
    model = model_on(shape, dev)
    plain = build_optimizer(model, 1e-3, 0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 0.01
    n = sum(p.numel() for p in model.parameters())
    t_plain = timed(plain.step, dev)
    del plain
    master = build_optimizer(model, 1e-3, 0.1, master_weights=True)
    low = sum(p.numel() for p in model.parameters() if p.dtype == torch.bfloat16)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 0.01
    t_master = timed(master.step, dev)
    params = master.module_params()
    t_norm = timed(master.grad_norm, dev)  # the clipping's norm: the flat kernel, then torch's multi-tensor one
    t_norm_torch = timed(lambda: clip_grads_on_device(params, 0.0), dev)
    bytes_plain = 28 * n
    bytes_master = 28 * n  # low: 2 + 12 read, 12 + 2 written; the rest 4 + 12 read, 12 written
    return {
        "shape": shape,
        "parameters": n,
        "matmul_weights": low,
        "torch_fused_adamw_ms": t_plain,
        "master_adamw_ms": t_master,
        "grad_norm_kernel_ms": t_norm,
        "grad_norm_torch_ms": t_norm_torch,
        "torch_fused_TBps": bytes_plain / t_plain / 1e9,
        "master_TBps": bytes_master / t_master / 1e9,
        "master_kernel": master.kernel,
    }


SWEEP = ((1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8), (8192, 16))


def sweep(shape: str, dev: torch.device) -> list[dict]:
    """The update kernel's launch shape (elements a program, warps) timed over one parameter set: with bf16 copies of
    the matmul weights (master weights) and with every tensor fp32 in place (a flat AdamW for the default path),
    beside torch's fused AdamW."""
    from rwkv_diffusion_rnn.master_weights import MasterAdamW, matmul_weight_names

    def fresh():
        model = model_on(shape, dev)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 0.01
        return model

    rows = []
    model = fresh()
    n = sum(p.numel() for p in model.parameters())
    ms = timed(build_optimizer(model, 1e-3, 0.1).step, dev)
    rows.append({"shape": shape, "what": "torch fused AdamW", "ms": ms, "TBps": 28 * n / ms / 1e9})
    for kind in ("master", "flat fp32"):
        for block, warps in SWEEP:
            model = fresh()
            groups = [dict(g) for g in build_optimizer(model, 1e-3, 0.1).param_groups]
            low = matmul_weight_names(model) if kind == "master" else []
            opt = MasterAdamW(groups, low, lr=1e-3, block=block, num_warps=warps)
            for p in model.parameters():  # the bf16 copies need bf16 gradients
                p.grad = torch.randn_like(p) * 0.01
            ms = timed(opt.step, dev)
            rows.append({"shape": shape, "what": kind, "block": block, "warps": warps, "ms": ms,
                         "TBps": 28 * n / ms / 1e9})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            del opt, model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="0.1b", choices=tuple(SHAPES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--time", default="0.1b,0.4b", help="shapes to time ('' for none)")
    p.add_argument("--sweep", action="store_true", help="also time the kernel's launch shapes (SWEEP) per shape")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (the torch path against itself: a dry run)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    dev = torch.device("cpu" if a.cpu else "cuda")
    if a.cpu:
        a.shape = "tiny"
        a.time = a.time if a.time != "0.1b,0.4b" else "tiny"
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    out = {"device": name, "check": check(a.shape, dev, a.steps, a.tol)}
    print(json.dumps(out["check"], indent=1), flush=True)
    out["timing"] = []
    for shape in filter(None, a.time.split(",")):
        out["timing"].append(timing(shape, dev))
        print(json.dumps(out["timing"][-1]), flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if a.sweep:
        out["sweep"] = [row for shape in filter(None, a.time.split(",")) for row in sweep(shape, dev)]
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1))
    return 0 if out["check"]["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
