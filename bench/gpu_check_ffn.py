"""GPU check of the channel-mix FFN operator (models/ffn.py) against the unfused path (outside CI).

    PYTHONPATH=$PWD python bench/gpu_check_ffn.py [--tiles] [--out results.json]

At the g1 0.1B and 0.4B widths (768, 1,024; FFN 4x) and 8,176 rows (16 x 511 tokens, as the training step runs),
bf16 operands: the operator's output and the gradients of ``x``, ``wk`` and ``wv`` against an fp64 reference,
beside the unfused bf16 path's own error (key matmul, ``relu(.)^2``, value matmul, as the model runs without the
operator), and a ragged row count. Bound: the operator's error at most 1.25x the unfused path's plus 1e-3 (both
round to bf16). Then both timed, forward and forward + backward (median of ``triton.testing.do_bench``), with the
autotuner's pick. ``--tiles`` also times the fused forward + backward with each tile of the autotuner's list
alone. Prints one line per row; exits non-zero if a bound is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


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
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    import triton.testing

    from rwkv_diffusion_rnn.models import ffn as mod

    dev = torch.device("cuda")
    rows, ok = [], True
    for m, c in ((8176, 768), (8176, 1024), (1000, 512)):
        x, wk, wv, dout = operands(m, c, dev, seed=m + c)
        ref = run(mod.ffn_plain, x.double(), wk.double(), wv.double(), dout.double())
        got = run(mod.ffn, x, wk, wv, dout)
        base = run(unfused, x, wk, wv, dout)
        names = ("out", "dx", "dwk", "dwv")
        err = {n: rel(a, r) for n, a, r in zip(names, got, ref, strict=True)}
        err_base = {n: rel(a, r) for n, a, r in zip(names, base, ref, strict=True)}
        good = all(err[n] <= 1.25 * err_base[n] + 1e-3 for n in names)
        ok &= good
        row = {"rows": m, "width": c, "err": err, "err_unfused": err_base, "ok": good}
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
            if args.tiles:
                row["tiles"] = {}
                for cfg in mod._configs():
                    kw = cfg.kwargs
                    mod.TILE = (kw["BLOCK_M"], kw["BLOCK_N"], cfg.num_stages, cfg.num_warps)
                    leaves = [t.clone().requires_grad_() for t in (x, wk, wv)]
                    try:
                        ms = triton.testing.do_bench(lambda leaves=leaves, d=dout: torch.autograd.grad(
                            mod.ffn(*leaves), leaves, d))  # fmt: skip
                    except Exception as e:  # a tile this card cannot hold: say so, time the rest
                        ms = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                    row["tiles"][",".join(map(str, mod.TILE))] = ms
                mod.TILE = None
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "env": {k: v for k, v in os.environ.items()
                       if k.startswith("DIFFRWKV_")}, "rows": rows, "ok": ok}, f, indent=1)  # fmt: skip
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
