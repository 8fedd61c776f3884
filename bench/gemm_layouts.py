"""Each linear's three bf16 gemms of an RWKV-7 block (forward, input gradient, weight gradient) at 8,192 rows and
the 0.1B / 0.4B widths, timed in every operand layout (CUDA events over a loop of launches; the small low-rank gemms
are launch-bound in such a loop). Prints a JSON line a linear and writes them all to the path given.

    python bench/gemm_layouts.py $OUT/gemm.json          # on a GPU; ~20 s
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch

ROWS = 8192  # batch 16 x 512 tokens
WIDTHS = ((768, 3072), (1024, 4096))  # (D, FFN width) of the 0.1B and 0.4B shapes


def time_us(fn: Callable[[], object], reps: int = 40) -> float:
    """Mean microseconds a call over ``reps`` back-to-back calls (after 5 warm-up calls)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1000


def variants(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The gemms of ``y = x w^T`` (x ``[M, i]``, w ``[o, i]``, dy ``[M, o]``), each written in several layouts."""
    wt, x_col, dy_col = w.t().contiguous(), x.t().contiguous().t(), dy.t().contiguous().t()
    g = torch.zeros(w.shape, device=w.device, dtype=torch.float32)
    return {
        "fwd x@w.t": lambda: x @ w.t(),
        "fwd x@wt": lambda: x @ wt,
        "fwd (w@x.t).t": lambda: (w @ x.t()).t(),
        "dgrad dy@w": lambda: dy @ w,
        "dgrad dy@wt.t": lambda: dy @ wt.t(),
        "dgrad (w.t@dy.t).t": lambda: (w.t() @ dy.t()).t(),
        "wgrad dy.t@x": lambda: dy.t() @ x,
        "wgrad (x.t@dy).t": lambda: (x.t() @ dy).t(),
        "wgrad column-major operands": lambda: dy_col.t() @ x_col,
        "wgrad fp32 out": lambda: torch.mm(dy.t(), x, out_dtype=torch.float32),
        "wgrad addmm into fp32": lambda: torch.addmm(g, dy.t(), x, out_dtype=torch.float32),
        "wgrad then add into fp32": lambda: g.add_(dy.t() @ x),
    }


def main(out: str) -> None:
    rows = []
    for d, f in WIDTHS:
        for i, o in ((d, d), (d, f), (f, d), (d, 64), (64, d), (d, 128), (128, d), (d, 32), (32, d)):
            gen = torch.Generator(device="cuda").manual_seed(i * 7 + o)
            x, w, dy = (torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)
                        for s in ((ROWS, i), (o, i), (ROWS, o)))  # fmt: skip
            row: dict[str, object] = {"width": d, "in": i, "out": o, "gflop": 2 * ROWS * i * o / 1e9}
            for name, fn in variants(x, w, dy).items():
                try:
                    row[name] = round(time_us(fn), 1)
                except (RuntimeError, TypeError) as e:  # an option this torch does not have
                    row[name] = f"unavailable: {str(e).splitlines()[0][:80]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(out, "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench/gemm_layouts.py: needs a CUDA GPU")
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gemm.json")
