"""GPU check: the denoiser's training step never makes the host wait for the GPU (outside CI).

    PYTHONPATH=$PWD python bench/gpu_check_sync.py [--shape tiny] [--length 128] [--batch 8] [--flags ...]

Builds the ``bench/throughput.py`` denoiser row (synthetic data, a random backbone) with the given throughput flags
(default: the fast path, ``--cuda-graphs --compile-blocks --chunked-ce --device-cache``), runs warm-up steps (CUDA
graph capture and compilation may wait), then steps under ``torch.cuda.set_sync_debug_mode("error")``, which turns
every synchronising CUDA call (a value read back, a value-sized index, a pageable copy) into an error. Prints OK, or
the error and the line of ours that caused it; exits non-zero then. The CPU suite checks the same property with a
dispatch-mode detector (tests/test_host_sync.py); this is the check on the real thing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

FAST = ["--cuda-graphs", "--compile-blocks", "--chunked-ce", "--device-cache"]


def check(flags: list[str], shape: str, length: int, batch: int, context: str, steps: int) -> tuple[bool, str]:
    import throughput

    a = throughput.build_parser().parse_args(
        ["--shapes", shape, "--length", str(length), "--batch", str(batch), "--device", "cuda", *flags]
    )
    dev = torch.device("cuda")
    with tempfile.TemporaryDirectory() as work:
        runner = throughput.denoiser_runner(a, throughput.SHAPES[shape], context, False, Path(work), dev)
        try:
            for _ in range(4):  # capture, compilation, the first cuBLAS plans: these may wait
                runner.read(runner.step())
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                results = [runner.step() for _ in range(steps)]
            finally:
                torch.cuda.set_sync_debug_mode(0)
            loss = runner.read(results[-1])["loss"]
            return True, f"{steps} steps without a wait; last loss {loss:.4f}"
        except RuntimeError as exc:
            ours = [f for f in traceback.extract_tb(exc.__traceback__) if "rwkv_diffusion_rnn" in f.filename]
            where = f"{ours[-1].filename}:{ours[-1].lineno} ({ours[-1].line})" if ours else "outside our code"
            return False, f"{str(exc).splitlines()[0]} at {where}"
        finally:
            runner.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tiny", help="a bench/throughput.py shape (tiny, 0.1b, ...)")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", default="causal", choices=("causal", "twice", "bidirectional"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--flags", default=" ".join(FAST), help="bench/throughput.py flags for the denoiser row")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    variants = [args.flags.split(), []] if args.flags.split() else [[]]
    failed = 0
    for flags in variants:  # the fast path, then the plain eager step
        ok, msg = check(flags, args.shape, args.length, args.batch, args.context, args.steps)
        failed += not ok
        print(f"{'OK ' if ok else 'WAIT'} [{' '.join(flags) or 'eager'}] {msg}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
