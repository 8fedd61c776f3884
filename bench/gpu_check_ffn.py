"""GPU check of the channel-mix FFN operator (models/ffn.py) against the unfused path (outside CI).

    PYTHONPATH=$PWD python bench/gpu_check_ffn.py [--tiles] [--out results.json]

At the g1 0.1B and 0.4B widths (768, 1,024; FFN 4x) and 8,176 rows (16 x 511 tokens, as the training step runs),
bf16 operands: the operator's output and the gradients of ``x``, ``wk`` and ``wv`` against an fp64 reference,
beside the unfused bf16 path's own error (key matmul, ``relu(.)^2``, value matmul, as the model runs without the
operator), and a ragged row count. Bound: the operator's error at most 1.25x the unfused path's plus 1e-3 (both
round to bf16). Then both timed, forward and forward + backward (median of ``triton.testing.do_bench``), with the
autotuner's pick. ``--tiles`` also times the fused forward + backward with each tile of the autotuner's list
alone. ``--kernels pointer,tma`` checks and times each of the operator's matmul kernels (``DIFFRWKV_FFN_KERNEL``);
``--matmul`` times the two epilogue matmuls alone beside cuBLAS's plain product of the same shape, and with
``tma`` among the kernels, each tile of ``--tma-tiles`` too. Prints one line per row; exits non-zero if a bound is
missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from check_common import rel


def operands(m: int, c: int, dev, seed: int):
    g = torch.Generator(dev).manual_seed(seed)
    x = torch.randn(m, c, device=dev, generator=g).bfloat16()
    wk = (torch.randn(4 * c, c, device=dev, generator=g) / c**0.5).bfloat16()
    wv = (torch.randn(c, 4 * c, device=dev, generator=g) / (4 * c) ** 0.5).bfloat16()
    dout = torch.randn(m, c, device=dev, generator=g).bfloat16()
    return x, wk, wv, dout


def unfused(x, wk, wv):
    from rwkv_diffusion_rnn.models.sq_relu import sq_relu

    return sq_relu(x @ wk.t()) @ wv.t()


def run(fn, x, wk, wv, dout):
    leaves = [t.clone().requires_grad_() for t in (x, wk, wv)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    return [out.detach(), *grads]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--tiles", action="store_true", help="time every tile of the autotuner's list alone")
    ap.add_argument("--kernels", default="pointer", help="the operator's matmul kernels to check, comma-separated")
    ap.add_argument("--matmul", action="store_true", help="time the epilogue matmuls alone beside cuBLAS")
    ap.add_argument(
        "--tma-tiles",
        default="128,256,3,8,0,0;128,256,4,8,0,1;128,256,3,8,0,1;256,128,3,8,0,0;256,128,3,8,0,1;128,128,4,8,0,0;"
        "128,128,5,8,0,1;128,128,4,4,0,1",
        help="BLOCK_M,BLOCK_N,stages,warps,warp-specialise,split;... for the tma kernel's --matmul sweep",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    from rwkv_diffusion_rnn.models import ffn as mod

    dev = torch.device("cuda")
    rows, ok = [], True
    for kernel in args.kernels.split(","):
        mod.KERNEL = kernel
        for m, c in ((8176, 768), (8176, 1024), (1000, 512)):
            row = check_row(mod, m, c, dev, args)
            ok &= row["ok"]
            rows.append(row)
            print(json.dumps(row), flush=True)  # a row that ends the stage early is still in its log
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "env": {k: v for k, v in os.environ.items()
                       if k.startswith("DIFFRWKV_")}, "rows": rows, "ok": ok}, f, indent=1)  # fmt: skip
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


def bench(fn) -> float | str:
    """Milliseconds a call (median of ``triton.testing.do_bench``), or why it could not run (a tile this card cannot
    hold), so that a sweep times the rest."""
    import triton.testing

    try:
        return triton.testing.do_bench(fn)
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


def time_matmuls(mod, x, wk, wv, dout, tiles: str) -> dict:
    """The two epilogue matmuls alone (the key matmul with relu^2, the key gradient with 2 sqrt(y)) with the
    operator's current kernel, beside cuBLAS's plain ``x wk^T`` and ``dout wv``; for the tma kernel, each tile of
    ``tiles`` too. Milliseconds, and TFLOP/s."""
    import triton.testing

    flop = 2 * x.shape[0] * wk.shape[0] * wk.shape[1]
    y = mod.ffn_op(x, wk, wv)[1]
    r = {"cublas_key_ms": triton.testing.do_bench(lambda: x @ wk.t()),
         "cublas_key_grad_ms": triton.testing.do_bench(lambda: dout @ wv)}  # fmt: skip
    r["key_ms"] = triton.testing.do_bench(lambda: mod._launch(x, wk.t(), None, mod.RELU_SQ))
    r["key_grad_ms"] = triton.testing.do_bench(lambda: mod._launch(dout, wv, y, mod.TIMES_2_SQRT))
    r["tflops"] = {k: round(flop / v / 1e9, 1) for k, v in r.items()}
    if mod.KERNEL == "tma":
        saved, r["tma_tiles"] = dict(mod.TMA_TILE), {}
        for tile in tiles.split(";"):
            t = tuple(int(v) for v in tile.split(","))
            mod.TMA_TILE = {mod.RELU_SQ: t, mod.TIMES_2_SQRT: t}
            r["tma_tiles"][tile] = [bench(lambda: mod._launch(x, wk.t(), None, mod.RELU_SQ)),
                                    bench(lambda: mod._launch(dout, wv, y, mod.TIMES_2_SQRT))]  # fmt: skip
        mod.TMA_TILE = saved
    return r


def check_row(mod, m: int, c: int, dev, args) -> dict:
    """One shape with the operator's current kernel: its errors against fp64 beside the unfused path's, and at the
    training step's rows its timings."""
    import triton.testing

    x, wk, wv, dout = operands(m, c, dev, seed=m + c)
    ref = run(mod.ffn_plain, x.double(), wk.double(), wv.double(), dout.double())
    got = run(mod.ffn, x, wk, wv, dout)
    base = run(unfused, x, wk, wv, dout)
    names = ("out", "dx", "dwk", "dwv")
    err = {n: rel(a, r) for n, a, r in zip(names, got, ref, strict=True)}
    err_base = {n: rel(a, r) for n, a, r in zip(names, base, ref, strict=True)}
    good = all(err[n] <= 1.25 * err_base[n] + 1e-3 for n in names)
    row = {"kernel": mod.KERNEL, "rows": m, "width": c, "err": err, "err_unfused": err_base, "ok": good}
    if m == 8176 and args.matmul:
        row["matmul"] = time_matmuls(mod, x, wk, wv, dout, args.tma_tiles)
    if m == 8176:
        for label, fn in (("fused", mod.ffn), ("unfused", unfused)):
            leaves = [t.clone().requires_grad_() for t in (x, wk, wv)]
            row[f"{label}_fwd_ms"] = triton.testing.do_bench(lambda fn=fn, leaves=leaves: fn(*leaves))
            row[f"{label}_fwd_bwd_ms"] = triton.testing.do_bench(
                lambda fn=fn, leaves=leaves, d=dout: torch.autograd.grad(fn(*leaves), leaves, d)
            )
        tuned = getattr(mod, "_mm_tuned", None)
        if tuned is not None and getattr(tuned, "cache", None):
            row["picked"] = {str(k): str(v) for k, v in tuned.cache.items()}
        if args.tiles and mod.KERNEL == "pointer":
            row["tiles"] = {}
            for cfg in mod._configs():
                kw = cfg.kwargs
                mod.TILE = (kw["BLOCK_M"], kw["BLOCK_N"], cfg.num_stages, cfg.num_warps)
                leaves = [t.clone().requires_grad_() for t in (x, wk, wv)]
                row["tiles"][",".join(map(str, mod.TILE))] = bench(
                    lambda leaves=leaves, d=dout: torch.autograd.grad(mod.ffn(*leaves), leaves, d))  # fmt: skip
            mod.TILE = None
    return row


if __name__ == "__main__":
    sys.exit(main())
