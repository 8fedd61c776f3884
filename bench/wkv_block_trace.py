"""Where our WKV-7 backward's thread blocks run and for how long: SM id, start and end of every block (outside CI).

Our backward (rwkv_diffusion_rnn/models/csrc/wkv7_cuda.cu, one block per (batch, head), at most two resident a SM)
takes 0.59 ms with one block on every SM of an H100 (132 blocks) and 0.65 ms with two on every SM (264), but
0.72-0.75 ms with any count in between (192: the 0.1B step; docs/RESULTS.md, 2026-12-07). This script says which
blocks are late: it compiles a copy of the kernel source with two probes added to the backward (each block's first
thread records ``%smid`` and ``%globaltimer`` on entry and the timer on exit), links it into a small library with
nvcc, runs the backward on operands prepared by the product's own forward, and summarises per launch:

* the makespan (first start to last end) and the blocks a SM held (how many SMs ran 1, 2, ... blocks);
* block durations, apart for blocks that shared their SM and blocks that ran alone;
* start offsets (when each block began after the first): late starts mean a second wave or slow dispatch.

    python bench/wkv_block_trace.py --shapes 16x511x12x64,22x511x12x64,11x511x12x64 [--out trace.json]

Needs a CUDA GPU, nvcc and the product's CUDA kernel (it builds on first use). The probe build lives in the
git-ignored ``bench/_external/wkv_trace/``; nothing of it is committed. ``--source-only`` writes the probed source
and stops (no GPU needed).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # the package, and bench/: gpu_check_wkv
import gpu_check_wkv as gcw  # noqa: E402

SOURCE = REPO / "rwkv_diffusion_rnn" / "models" / "csrc" / "wkv7_cuda.cu"
BUILD = REPO / "bench" / "_external" / "wkv_trace"

# where the probes go: after the backward's index line, and before the backward's closing brace (the kernel is the
# last definition in the first anonymous namespace)
BWD_INDEX_LINE = "const int bh = blockIdx.x, bb = bh / H, hh = bh % H, tid = threadIdx.x, i = tid / P, p = tid % P;"
BWD_END = "\n}\n\n}  // namespace\n"

PROBE_DECL = """
__device__ unsigned long long* g_wkv7_trace = nullptr;  // [blocks, 3]: SM id, start ns, end ns
__device__ __forceinline__ unsigned long long wkv7_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
"""
PROBE_START = """
    if (g_wkv7_trace != nullptr && threadIdx.x == 0) {
        unsigned int sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        g_wkv7_trace[3 * blockIdx.x] = sm;
        g_wkv7_trace[3 * blockIdx.x + 1] = wkv7_now();
    }"""
PROBE_END = """
    __syncthreads();
    if (g_wkv7_trace != nullptr && threadIdx.x == 0) g_wkv7_trace[3 * blockIdx.x + 2] = wkv7_now();"""
WRAPPER = """
// the probed backward for bench/wkv_block_trace.py: bf16 operands, fp32 decay, no final-state gradient
extern "C" int wkv7_trace_backward(int split, int B, int Tn, int H, const void* r, const void* w, const void* k,
                                   const void* v, const void* a, const void* b, const void* dout, const float* sa,
                                   const float* ckpt, void* dr, void* dw, void* dk, void* dv, void* da, void* db,
                                   unsigned long long* trace, void* stream) {
    int err = (int)cudaMemcpyToSymbol(g_wkv7_trace, &trace, sizeof(trace));
    if (err) return err;
    return wkv7_cuda_backward(1, 0, split, B, Tn, H, r, w, k, v, a, b, dout, sa, ckpt, nullptr, dr, dw, dk, dv, da,
                              db, stream);
}
"""


def probed_source(text: str) -> str:
    """The kernel source with the probes and the C entry point added; raises ValueError naming the anchor that the
    kernel no longer has (this script must then follow the kernel)."""
    if text.count(BWD_INDEX_LINE) != 1:
        raise ValueError(f"wkv7_cuda.cu: expected the backward's index line once: {BWD_INDEX_LINE!r}")
    if BWD_END not in text:
        raise ValueError("wkv7_cuda.cu: expected the backward to close the first anonymous namespace")
    head, sep, tail = text.partition("namespace {\n")
    out = head + sep + PROBE_DECL + tail
    out = out.replace(BWD_INDEX_LINE, BWD_INDEX_LINE + PROBE_START, 1)
    i = out.index(BWD_END)
    return out[:i] + PROBE_END + out[i:] + WRAPPER


def summarise(trace: list[tuple[int, int, int]]) -> dict:
    """Per launch: makespan, blocks a SM, durations by SM sharing, start offsets (ms). ``trace``: (SM, start ns,
    end ns) per block."""
    t0 = min(s for _, s, _ in trace)
    per_sm = Counter(sm for sm, _, _ in trace)
    dur = lambda rows: [(e - s) / 1e6 for _, s, e in rows]  # noqa: E731
    shared = [row for row in trace if per_sm[row[0]] > 1]
    alone = [row for row in trace if per_sm[row[0]] == 1]
    starts = sorted((s - t0) / 1e6 for _, s, _ in trace)

    def stats(xs: list[float]) -> dict | None:
        return {"n": len(xs), "min": min(xs), "median": statistics.median(xs), "max": max(xs)} if xs else None

    return {
        "blocks": len(trace),
        "sms_used": len(per_sm),
        "blocks_a_sm": dict(sorted(Counter(per_sm.values()).items())),
        "makespan_ms": (max(e for _, _, e in trace) - t0) / 1e6,
        "duration_shared_ms": stats(dur(shared)),
        "duration_alone_ms": stats(dur(alone)),
        "start_offset_ms": stats(starts),
    }


def build(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "wkv7_trace.cu"
    src.write_text(probed_source(SOURCE.read_text()))
    lib = out_dir / "libwkv7_trace.so"
    import torch

    major, minor = torch.cuda.get_device_capability()
    cmd = ["nvcc", "-O3", "--use_fast_math", f"-arch=sm_{major}{minor}", "-shared", "-Xcompiler", "-fPIC",
           "-o", str(lib), str(src)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"nvcc failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    return lib


def trace_once(lib, shape: tuple[int, int, int, int], split: int, repeats: int) -> tuple[list[dict], list]:
    """The summaries of ``repeats`` traced launches, and the last launch's raw rows (SM, start ns, end ns)."""
    import torch

    from rwkv_diffusion_rnn.models import wkv7_cuda as wc

    B, T, H, N = shape
    if N != 64:
        raise ValueError(f"head size {N}: the kernel is for 64")
    (r, w, k, v, a, b), _ = gcw.inputs(B, T, H, N, torch.bfloat16, True, 0, False)  # bf16, the decay fp32
    do = torch.randn_like(r)
    _, _, sa, ckpt = wc.wkv7_cuda_fwd(r, w, k, v, a, b, True, split)
    grads = [torch.empty_like(x) for x in (r, w, k, v, a, b)]
    trace = torch.zeros(B * H, 3, dtype=torch.int64, device="cuda")
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    args = [ptr(x) for x in (r, w, k, v, a, b, do, sa, ckpt, *grads, trace)]
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    rows, raw = [], []
    for i in range(repeats + 2):  # two launches to warm up, then the ones kept
        trace.zero_()
        err = lib.wkv7_trace_backward(split, B, T, H, *args, stream)
        torch.cuda.synchronize()
        if err:
            raise RuntimeError(f"launch failed: cudaError {err}")
        if i >= 2:
            raw = [tuple(x) for x in trace.cpu().tolist()]
            rows.append(summarise(raw))
    return rows, raw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="16x511x12x64,22x511x12x64,11x511x12x64,18x511x12x64",
                   help="BxTxHxN, comma-separated; default: 192, 264, 132 and 216 blocks at 12 heads")  # fmt: skip
    p.add_argument("--split", type=int, default=2, choices=(1, 2, 4), help="threads a state row (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="traced launches a shape (default 3)")
    p.add_argument("--out", help="write every launch's summary here (JSON)")
    p.add_argument("--source-only", metavar="FILE", help="write the probed source here and stop (no GPU)")
    a = p.parse_args(argv)
    try:
        shapes = [gcw.parse_shape(s) for s in a.shapes.split(",") if s]
        if any(min(s) <= 0 for s in shapes):
            raise ValueError
    except ValueError:
        print(f"--shapes {a.shapes}: expected BxTxHxN,... with positive integers")
        return 2
    if a.source_only:
        Path(a.source_only).write_text(probed_source(SOURCE.read_text()))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU (--source-only writes the probed source without one)")
        return 2
    lib = ctypes.CDLL(str(build(BUILD)))
    lib.wkv7_trace_backward.restype = ctypes.c_int
    out = {"device": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count,
           "split": a.split, "shapes": {}, "raw": {}}  # fmt: skip
    for shape in shapes:
        rows, raw = trace_once(lib, shape, a.split, a.repeats)
        out["shapes"]["x".join(map(str, shape))] = rows
        out["raw"]["x".join(map(str, shape))] = raw  # the last launch, block by block
        for r in rows:
            sh, al, st = r["duration_shared_ms"], r["duration_alone_ms"], r["start_offset_ms"]
            print(f"{'x'.join(map(str, shape))}: {r['blocks']} blocks on {r['sms_used']} SMs {r['blocks_a_sm']}, "
                  f"makespan {r['makespan_ms']:.3f} ms; shared SM {sh and round(sh['median'], 3)} "
                  f"(max {sh and round(sh['max'], 3)}), alone {al and round(al['median'], 3)}; "
                  f"last start +{st['max']:.3f} ms", flush=True)  # fmt: skip
    print(f"{out['device']}, {out['sms']} SMs")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
