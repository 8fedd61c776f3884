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
