"""Triton's CPU interpreter as the tests run it (in a subprocess started with ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_interpreted(path: str | Path) -> dict:
    """Run the test module ``path`` as a script under ``TRITON_INTERPRET=1`` (its ``__main__`` calls
    :func:`fit_interpreter_to_numpy`, runs the kernels and prints one JSON line last); returns that JSON."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_interpreter_to_numpy() -> None:
    """triton 3.6's interpreter calls ``int()`` on 1-element arrays, which numpy >= 2.4 refuses
    (triton-lang/triton#9171): give its tensors an ``__index__`` that reads the one element. A no-op where numpy
    still allows it. Call before the first kernel runs."""
    import numpy as np

    try:
        int(np.array([1]))
    except TypeError:
        import triton.runtime.interpreter as interp

        original = interp._patch_lang_tensor

        def patched(tensor, scope):
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interp._patch_lang_tensor = patched


def fit_interpreter_to_bf16() -> None:
    """bf16 in triton 3.6's interpreter as a GPU computes it. The interpreter keeps bf16 tiles as their uint16 bits
    (numpy has no bf16), so ``tl.dot`` multiplied those bits as integers: bf16 operands are widened to the fp32
    values they hold first (exact; a GPU's bf16 dot also accumulates in fp32). And its fp32 -> bf16 cast truncates,
    where a GPU's ``.to(tl.bfloat16)`` rounds to nearest even: it rounds. Call before the first kernel runs."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    builder = interp.InterpreterBuilder
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return interp.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # to nearest, ties to even (no NaN here)
            return interp.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
