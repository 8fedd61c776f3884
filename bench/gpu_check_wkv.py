"""GPU check of our Triton WKV-7 kernels (backend ``triton``) against the reference and fla (outside CI).

    export PYTHONPATH=$PWD; python bench/gpu_check_wkv.py [--shapes 16x512x12x64,16x512x16x64] [--sweep]
        [--w-fp32] [--out results.json]

1. Correctness, on the GPU, on the first shape (``--check-shape`` to change it): the ``triton`` backend (and
   ``fla`` when it imports) against the recurrence in fp64 on the same bf16 inputs, with an initial state and a
   loss on both the output and the final state: output, final state and the gradients of r, w, k, v, a, b and the
   initial state, as relative norm errors. The fp32 reference's own error is printed beside them. Bound for
   ``triton``: 2^-8 (one bf16 rounding) + 1e-4 for bf16 results, 1e-4 for fp32 ones (see
   tests/models/test_wkv7_triton.py). fla is printed, not judged.
2. Timing, per shape and backend, bf16 inputs, no initial state (the training call): the forward (with autograd
   recording, as in training) and forward + backward (output gradient only), median of ``triton.testing.do_bench``.
   ``--sweep`` first times the triton launch configurations and uses the fastest (printed, and in the JSON).

Prints a table last; exits non-zero if a triton correctness bound is missed.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import torch
import triton
import triton.testing
from check_common import rel

from rwkv_diffusion_rnn.models import wkv7_triton as wt
from rwkv_diffusion_rnn.models.wkv7 import BACKENDS, _fla_chunk, wkv7_reference

NAMES = ("o", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate")
DECAY_FLOOR = -0.6065306597126334
FWD_CONFIGS = [(4, 1), (8, 1), (8, 2), (16, 1), (16, 2), (32, 1), (32, 2), (64, 2), (64, 4)]
BWD_CONFIGS = [(8, 1), (16, 1), (16, 2), (32, 1), (32, 2), (32, 4), (64, 4), (64, 8)]
DEVICE = "cuda"


def parse_shape(s: str) -> tuple[int, int, int, int]:
    B, T, H, N = (int(x) for x in s.lower().split("x"))
    return B, T, H, N


def inputs(B, T, H, N, dtype, w_fp32, seed, with_state):
    """RWKV-7-like operands on the GPU (decays in (0.545, 1), kk unit-norm, a = -kk, b = kk * sigmoid(.))."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=DEVICE) * scale

    r, k, v = rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N)
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    w = DECAY_FLOOR * torch.sigmoid(rnd(B, T, H, N))
    a, b = -kk, kk * torch.sigmoid(rnd(B, T, H, N))
    xs = [x.to(dtype) for x in (r, w, k, v, a, b)]
    if w_fp32:
        xs[1] = w
    state = rnd(B, H, N, N, scale=0.3) if with_state else None
    return xs, state


# the reference recurrence in float64 throughout (by default wkv7_reference computes in fp32)
reference64 = functools.partial(wkv7_reference, compute_dtype=torch.float64)


def results(fn, xs, state, go, gs, dtype=None):
    """Output, final state and all gradients (leaves cast to ``dtype``), for a loss on the output and final state."""
    xs = [x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]
    state = state.detach().to(dtype or state.dtype).requires_grad_()
    o, S = fn(*xs, state)
    ((o.double() * go.double()).sum() + (S.double() * gs.double()).sum()).backward()
    return [o.detach(), S.detach(), *(x.grad for x in xs), state.grad]


def bound(t: torch.Tensor) -> float:
    return 2.0**-8 + 1e-4 if t.dtype == torch.bfloat16 else 1e-4


def check(shape, dtype, w_fp32, seed, label) -> list[dict]:
    B, T, H, N = shape
    xs, state = inputs(B, T, H, N, dtype, w_fp32, seed, with_state=True)
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    go = torch.randn(B, T, H, N, generator=g, device=DEVICE).to(dtype).double()  # exact in the activation dtype
    gs = torch.randn(B, H, N, N, generator=g, device=DEVICE).double()
    truth = results(reference64, xs, state, go, gs, torch.float64)
    runs = {"triton": results(BACKENDS["triton"], xs, state, go, gs)}
    runs["reference fp32"] = results(wkv7_reference, xs, state, go, gs, torch.float32)
    if _fla_chunk() is not None:
        runs["fla"] = results(BACKENDS["fla"], xs, state, go, gs)
    rows = []
    print(f"\ncorrectness {label}: B{B} T{T} H{H} N{N}, {str(dtype)[6:]} inputs (w {'fp32' if w_fp32 else 'same'}),"
          f" seed {seed}; relative error vs fp64")  # fmt: skip
    print(f"{'result':<8}" + "".join(f"{name:>16}" for name in runs) + f"{'bound':>10}  ok")
    for i, name in enumerate(NAMES):
        errs = {backend: rel(res[i], truth[i]) for backend, res in runs.items()}
        bd = bound(runs["triton"][i])
        ok = errs["triton"] <= bd
        rows.append({"check": label, "result": name, "bound": bd, "ok": ok, **errs})
        print(f"{name:<8}" + "".join(f"{e:>16.2e}" for e in errs.values()) + f"{bd:>10.1e}  {'yes' if ok else 'NO'}")
    if "fla" in runs:
        worst = max(rel(x, y) for x, y in zip(runs["triton"], runs["fla"], strict=True))
        print(f"triton vs fla: largest relative difference {worst:.2e}")
    return rows


def bench_backend(name, shape, dtype, w_fp32) -> dict:
    """Median ms of the forward (autograd recording) and of forward + backward (gradient of the output only)."""
    B, T, H, N = shape
    xs, _ = inputs(B, T, H, N, dtype, w_fp32, 0, with_state=False)
    xs = [x.requires_grad_() for x in xs]
    fn = BACKENDS[name]
    do = torch.randn(B, T, H, N, device=DEVICE, dtype=dtype)

    def fwd():
        return fn(*xs, None)

    def fwd_bwd():
        o, _ = fn(*xs, None)
        torch.autograd.backward(o, do)

    fwd_bwd()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    t_fwd = triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median")
    t_all = triton.testing.do_bench(fwd_bwd, warmup=25, rep=200, grad_to_none=xs, return_mode="median")
    return {"fwd_ms": t_fwd, "fwd_bwd_ms": t_all, "bwd_ms": t_all - t_fwd}


def sweep(shape, dtype, w_fp32) -> dict:
    """Time the triton launch configurations; set wt.CONFIG to the fastest and return the table."""
    table = {"fwd": {}, "bwd": {}}
    print(f"\nsweep B{shape[0]} T{shape[1]} H{shape[2]} N{shape[3]}: forward (BV, warps) -> ms")
    best = {}
    for part, configs in (("fwd", FWD_CONFIGS), ("bwd", BWD_CONFIGS)):  # the forward first: the backward times on top
        for bv, nw in configs:
            setattr(wt.CONFIG, f"{part}_bv", bv)
            setattr(wt.CONFIG, f"{part}_warps", nw)
            try:
                t = bench_backend("triton", shape, dtype, w_fp32)[f"{part}_ms"]
            except Exception as e:  # a configuration the compiler or the GPU refuses
                print(f"  {part} {bv:>3} {nw}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                continue
            table[part][f"{bv}x{nw}"] = t
            print(f"  {part} {bv:>3} {nw}: {t:.3f}")
        best[part] = min(table[part], key=table[part].get)
        bv, nw = (int(x) for x in best[part].split("x"))
        setattr(wt.CONFIG, f"{part}_bv", bv)
        setattr(wt.CONFIG, f"{part}_warps", nw)
    best_fwd, best_bwd = best["fwd"], best["bwd"]
    table["best"] = {"fwd": best_fwd, "bwd": best_bwd}
    print(f"  best: fwd {best_fwd}, bwd {best_bwd} (BV x warps) -> {wt.CONFIG}")
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="16x512x12x64,16x512x16x64", help="comma list of BxTxHxN to time")
    ap.add_argument("--check-shape", help="BxTxHxN of the correctness check (default: the first timed shape)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--w-fp32", action="store_true", help="feed the log decay in fp32 (as the model does)")
    ap.add_argument("--backends", default="triton,fla", help="comma list of backends to time")
    ap.add_argument("--sweep", action="store_true", help="time triton launch configs first and use the fastest")
    ap.add_argument("--seed", type=int, help="seed of the correctness inputs (default: random)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    backends = [b for b in args.backends.split(",") if b != "fla" or _fla_chunk() is not None]
    seed = args.seed if args.seed is not None else int(time.time()) % 2**31
    device = torch.cuda.get_device_name()
    print(f"{device}; torch {torch.__version__}, triton {triton.__version__}, fla {_fla_chunk() is not None}")
    report = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype,
              "w_fp32": args.w_fp32, "config_default": vars(wt.CONFIG).copy()}  # fmt: skip

    check_shape = parse_shape(args.check_shape) if args.check_shape else shapes[0]
    rows = check(check_shape, dtype, args.w_fp32, seed, "default config")
    if args.sweep:
        report["sweep"] = sweep(shapes[0], dtype, args.w_fp32)
        rows += check(check_shape, dtype, args.w_fp32, seed + 2, f"swept config {report['sweep']['best']}")
    report["config_timed"] = vars(wt.CONFIG).copy()
    report["check"] = rows

    timings = []
    for shape in shapes:
        for name in backends:
            t = bench_backend(name, shape, dtype, args.w_fp32)
            timings.append({"shape": "x".join(map(str, shape)), "backend": name, **t})
            torch.cuda.empty_cache()
    report["timings"] = timings

    print(f"\ntiming ({args.dtype} inputs{', w fp32' if args.w_fp32 else ''}; triton config {wt.CONFIG}):")
    print(f"{'shape BxTxHxN':<16}{'backend':<9}{'fwd ms':>9}{'fwd+bwd ms':>12}{'bwd ms':>9}{'vs fla':>8}")
    for row in timings:
        fla = next((x for x in timings if x["shape"] == row["shape"] and x["backend"] == "fla"), None)
        speed = f"{fla['fwd_bwd_ms'] / row['fwd_bwd_ms']:.2f}x" if fla else "-"
        print(f"{row['shape']:<16}{row['backend']:<9}{row['fwd_ms']:>9.3f}{row['fwd_bwd_ms']:>12.3f}"
              f"{row['bwd_ms']:>9.3f}{speed:>8}")  # fmt: skip
    failed = [r for r in rows if not r["ok"]]
    print(f"correctness: {len(rows) - len(failed)}/{len(rows)} triton results within bounds")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
