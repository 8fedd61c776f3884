"""GPU check of the chunked head + cross-entropy (models/chunked_ce.py) against materialised logits (outside CI).

    PYTHONPATH=$PWD python bench/gpu_check_ce.py [--out results.json]

On CUDA each chunk's per-row work runs as one Triton kernel (the loss, the argmax and ``softmax - one_hot`` written
over the logits) and, where ``torch.addmm(..., out_dtype=torch.float32)`` passes its self-check, the head's weight
gradient accumulates in fp32 inside the GEMM. First the kernel alone against the torch formula on one chunk of the
g1 head's logits (4,096 x 65,536, bf16 and fp32): the same argmax, the loss and the written gradient within
rounding. Then, under bf16 autocast with fp32 master weights (as training runs), it compares the loss, the argmax and
the gradients of ``h`` and of the head weight with ``F.cross_entropy`` on autocast logits (the reference the CPU
tests use), at the g1 0.1B head (8,192 rows x 768 x 65,536) and a ragged row count. The reference itself rounds the
logits and their gradient to bf16, so the bounds are bf16-level. Prints one line per quantity; exits non-zero if a
bound is missed.

``--rows`` times the rows kernel alone on that chunk for each launch in ``ROWS_LAUNCHES`` (columns a program at a
time, warps), as bytes moved per second (one read and one write of the logits). ``--time CHUNKS``
(e.g. ``1024,2048,4096,8192``) then times the head + cross-entropy forward and backward at 8,192 rows and 65,536
classes for widths 768 and 1,024 (the 0.1B and 0.4B heads) with each chunk size, its logits recomputed in the
backward or kept (median of ``triton.testing.do_bench``, fp32 master weight under bf16 autocast, as the training
step runs it), with its peak memory above the inputs and its loss against the reference: what the chunk size costs
in time and memory.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from check_common import rel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--rows", action="store_true", help="time the rows kernel per launch configuration")
    ap.add_argument("--time", default="", help="comma-separated chunk sizes to time (empty: only the checks)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    from rwkv_diffusion_rnn.models import chunked_ce
    from rwkv_diffusion_rnn.models.chunked_ce import linear_cross_entropy

    dev = torch.device("cuda")
    rows, ok = check_rows(dev)
    for n, c, v in ((8192, 768, 65536), (5000, 512, 16424)):
        g = torch.Generator(dev).manual_seed(n)
        h = torch.randn(n, c, device=dev, generator=g, requires_grad=True)
        w = (torch.randn(v, c, device=dev, generator=g) / c**0.5).requires_grad_()
        y = torch.randint(0, v, (n,), device=dev, generator=g)
        gl = torch.rand(n, device=dev, generator=g)
        with torch.autocast("cuda", torch.bfloat16):
            ref = F.cross_entropy((h @ w.T).float(), y, reduction="none")
        (ref * gl).sum().backward()
        ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
        h.grad = w.grad = None
        grads = {}
        for path in ("in_gemm", "plain"):  # the weight gradient accumulated in the GEMM, then the plain add
            key = (str(h.device), torch.bfloat16)
            chunked_ce._F32_OUT.pop(key, None)
            if path == "plain":
                chunked_ce._F32_OUT[key] = False
            h.grad = w.grad = None
            with torch.autocast("cuda", torch.bfloat16):
                loss, pred = linear_cross_entropy(h, w, y)
            (loss * gl).sum().backward()
            grads[path] = (h.grad.clone(), w.grad.clone(), chunked_ce._F32_OUT[key])
        chunked_ce._F32_OUT.pop(key, None)
        in_gemm = grads["in_gemm"][2]
        with torch.autocast("cuda", torch.bfloat16):
            argmax = (h @ w.T).float().argmax(-1)
        gh, gw, _ = grads["in_gemm"]
        checks = {
            "loss": (rel(loss, ref), 1e-3),
            "argmax agreement": (1.0 - float((pred == argmax).float().mean()), 1e-3),
            "grad h": (rel(gh, ref_gh), 2e-2),
            "grad w": (rel(gw, ref_gw), 2e-2),
            # the two accumulations differ by the plain path's bf16 rounding of each chunk's product
            "grad w: GEMM vs plain": (rel(gw, grads["plain"][1]), 5e-3),
            "GEMM path taken": (0.0 if in_gemm else 1.0, 0.0),
        }
        for name, (err, bound) in checks.items():
            good = err <= bound
            ok &= good
            rows.append({"shape": [n, c, v], "check": name, "err": err, "bound": bound, "ok": good,
                         "weight_grad_in_gemm": in_gemm})  # fmt: skip
            print(f"{n} x {c} x {v}  {name:22s} {err:.2e} (bound {bound:.0e}) {'ok' if good else 'MISSED'}")
    # no rows (a batch with no masked token): the head's gradient must come back zero, not the GEMM's unwritten buffer
    w = torch.randn(65536, 768, device=dev, requires_grad=True)
    h = torch.zeros(0, 768, device=dev, requires_grad=True)
    with torch.autocast("cuda", torch.bfloat16):
        loss, _ = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long, device=dev))
    loss.sum().backward()
    err = float(w.grad.abs().max())
    ok &= err == 0.0
    rows.append({"shape": [0, 768, 65536], "check": "no rows: zero weight gradient", "err": err, "bound": 0.0,
                 "ok": err == 0.0})  # fmt: skip
    print(f"0 x 768 x 65536  no rows: zero weight gradient {err:.2e} {'ok' if err == 0.0 else 'MISSED'}")
    launches = time_rows(dev) if args.rows else []
    timings = time_chunks([int(c) for c in args.time.split(",") if c], dev) if args.time else []
    if args.out:
        with open(args.out, "w") as f:
            res = {"device": torch.cuda.get_device_name(dev), "rows": rows, "launches": launches, "timings": timings}
            json.dump(res, f, indent=1)
    return 0 if ok else 1


def check_rows(dev: torch.device) -> tuple[list[dict], bool]:
    """The rows kernel against the torch formula on one chunk of the g1 head's logits (see the docstring)."""
    from rwkv_diffusion_rnn.models.chunked_ce import rows_kernel, rows_reference

    rows, ok = [], True
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator(dev).manual_seed(7)
        x = (torch.randn(4096, 65536, device=dev, generator=g) * 4).to(dtype)
        x[0, 10] = x[0, 60000] = x[0].max() + 1  # a tie for the max: the first column wins
        t = torch.randint(0, 65536, (4096,), device=dev, generator=g)
        want_p = x.clone()
        want_loss, want_pred = rows_reference(want_p, t)
        p = x.clone()
        loss, pred = rows_kernel(p, t)
        step = 2.0**-8 if dtype == torch.bfloat16 else 1e-5  # one rounding of values below 1; fp32: the lse's sum order
        checks = {
            "argmax equal": (0.0 if torch.equal(pred, want_pred) else 1.0, 0.0),
            "loss": (float((loss - want_loss).abs().max()), 1e-4),
            "softmax - one_hot": (float((p.float() - want_p.float()).abs().max()), step),
        }
        for name, (err, bound) in checks.items():
            good = err <= bound
            ok &= good
            rows.append({"shape": [4096, 65536], "dtype": str(dtype), "check": "rows kernel: " + name, "err": err,
                         "bound": bound, "ok": good})  # fmt: skip
            print(f"rows kernel 4096 x 65536 {str(dtype):15s} {name:18s} {err:.2e} (bound {bound:.0e}) "
                  f"{'ok' if good else 'MISSED'}")  # fmt: skip
        del x, p, want_p
    return rows, ok


ROWS_LAUNCHES = [(b, w) for b in (2048, 4096, 8192) for w in (8, 16, 32)]


def time_rows(dev: torch.device) -> list[dict]:
    """The rows kernel's time per launch on a bf16 chunk of 4,096 x 65,536 logits (see the docstring)."""
    from triton.testing import do_bench

    from rwkv_diffusion_rnn.models import chunked_ce

    g = torch.Generator(dev).manual_seed(3)
    x = (torch.randn(4096, 65536, device=dev, generator=g) * 4).to(torch.bfloat16)
    t = torch.randint(0, 65536, (4096,), device=dev, generator=g)
    work = x.clone()
    copy = do_bench(lambda: work.copy_(x), warmup=10, rep=100, return_mode="median")  # taken off each launch's time
    out = []
    for block, warps in ROWS_LAUNCHES:

        def run(block=block, warps=warps):
            work.copy_(x)  # timed apart above and taken off
            chunked_ce.rows_kernel(work, t, block=block, warps=warps)

        ms = do_bench(run, warmup=10, rep=100, return_mode="median") - copy
        row = {"block": block, "warps": warps, "ms": ms, "tb_s": 2 * x.numel() * 2 / ms / 1e9}
        out.append(row)
        print(f"rows kernel bf16 4096 x 65536: block {block:5d}, {warps:2d} warps: {ms:.3f} ms, {row['tb_s']:.2f} TB/s")
    return out


def time_chunks(chunks: list[int], dev: torch.device) -> list[dict]:
    """Forward + backward time, peak memory and loss error of the chunked head per chunk size (see the docstring)."""
    from triton.testing import do_bench

    from rwkv_diffusion_rnn.models.chunked_ce import linear_cross_entropy

    out = []
    for c in (768, 1024):
        n, v = 8192, 65536
        g = torch.Generator(dev).manual_seed(c)
        h = torch.randn(n, c, device=dev, generator=g).to(torch.bfloat16).requires_grad_()
        w = (torch.randn(v, c, device=dev, generator=g) / c**0.5).requires_grad_()
        y = torch.randint(0, v, (n,), device=dev, generator=g)
        with torch.autocast("cuda", torch.bfloat16):
            ref = F.cross_entropy((h @ w.T).float(), y)
        for chunk, keep in ((size, k) for size in chunks for k in (False, True)):

            def step(chunk=chunk, keep=keep, h=h, w=w, y=y):
                h.grad = w.grad = None
                with torch.autocast("cuda", torch.bfloat16):
                    loss = linear_cross_entropy(h, w, y, chunk=chunk, keep_logits=keep)[0].mean()
                loss.backward()
                return loss

            loss = step()
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            step()
            torch.cuda.synchronize(dev)
            peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
            ms = do_bench(step, warmup=50, rep=300, return_mode="median")
            row = {"rows": n, "width": c, "classes": v, "chunk": chunk, "keep_logits": keep, "ms_fwd_bwd": ms,
                   "peak_gib_above": peak,
                   "loss_rel_err": abs(float(loss) - float(ref)) / abs(float(ref))}  # fmt: skip
            out.append(row)
            print(
                f"head {n} x {c} x {v}, chunk {chunk:5d}, {'kept' if keep else 'recomputed'} logits: "
                f"{ms:.3f} ms fwd+bwd, +{peak:.2f} GiB peak, "
                f"loss rel err {row['loss_rel_err']:.1e}"
            )
    return out


if __name__ == "__main__":
    sys.exit(main())
