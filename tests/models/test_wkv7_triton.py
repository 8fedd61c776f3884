"""Our Triton WKV-7 kernels (rwkv_diffusion_rnn/models/wkv7_triton.py) against the reference recurrence in fp64.

No GPU needed: the kernels run in Triton's CPU interpreter on CPU tensors. In triton 3.x the interpreter is chosen
when ``@triton.jit`` decorates a function (``triton.knobs.runtime.interpret``, read from ``TRITON_INTERPRET``),
and that includes triton's own library functions (``tl.sum`` ...) decorated when ``triton.language`` is first
imported. So the variable must be set before anything in the process imports triton, and must not leak into a
session that also runs compiled kernels (fla on a GPU machine): the cases run in one subprocess, this file run as a
script with ``TRITON_INTERPRET=1``, and the tests here judge its results.

Errors are relative norms ``||x - ref|| / ||ref||`` against the recurrence computed in float64 on the same
(dtype-rounded) inputs; the bounds are argued in :func:`bound`. Every case draws its inputs from a fixed seed (in the
failure message).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DECAY_FLOOR = -0.6065306597126334  # RWKV-7's log decay lies in [-exp(-0.5), 0)
NAMES = ("o", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate")

# (id, B, T, H, N, dtype, w dtype, initial state, loss on, config, decays pinned at the floor)
CASES = [
    # T not a multiple of the checkpoint stride C = 16; value columns split over programs (atomic backward path)
    ("T37_fp32_split", 2, 37, 2, 16, "float32", "float32", True, "both", {"fwd_bv": 8, "bwd_bv": 8}, False),
    # one program per head (plain-store backward), no initial state, loss on the output only
    ("T37_fp32_whole", 2, 37, 2, 16, "float32", "float32", False, "o", {"fwd_bv": 16, "bwd_bv": 16}, False),
    # a single step, loss on the final state only (no output gradient)
    ("T1_fp32", 2, 1, 2, 16, "float32", "float32", True, "state", {"fwd_bv": 8, "bwd_bv": 16}, False),
    # T a multiple of C, N = 32; bf16 activations with an fp32 log decay (the model's mix)
    ("T32_bf16_w32", 2, 32, 2, 32, "bfloat16", "float32", True, "both", {"fwd_bv": 16, "bwd_bv": 8}, False),
    # all bf16, no initial state
    ("T21_bf16", 2, 21, 2, 16, "bfloat16", "bfloat16", False, "both", {"fwd_bv": 4, "bwd_bv": 16}, False),
    # every decay at the floor (0.545): the largest amplification of the backward's step undoing
    ("T40_floor", 1, 40, 2, 16, "float32", "float32", True, "both", {"fwd_bv": 16, "bwd_bv": 8}, True),
    # checkpoint stride C = 4 with a partial last chunk
    ("T10_chunk4", 1, 10, 2, 16, "float32", "float32", True, "both", {"chunk": 4, "fwd_bv": 8, "bwd_bv": 8}, False),
]


def reference64(r, w, k, v, a, b, state=None):
    """``wkv7_reference`` in float64 throughout (by default it computes in fp32). Imported here: the interpreter
    subprocess must set TRITON_INTERPRET before the package (which pulls in triton) is imported."""
    from rwkv_diffusion_rnn.models.wkv7 import wkv7_reference

    return wkv7_reference(r, w, k, v, a, b, state, compute_dtype=torch.float64)


def make_inputs(B, T, H, N, dtype, w_dtype, with_state, seed, floor_decay=False):
    """RWKV-7-like operands: decays exp(w) in (0.545, 1), kk unit-norm, a = -kk, b = kk * sigmoid(.)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    r, k, v = rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N)
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    w = torch.full((B, T, H, N), DECAY_FLOOR) if floor_decay else DECAY_FLOOR * torch.sigmoid(rnd(B, T, H, N))
    a, b = -kk, kk * torch.sigmoid(rnd(B, T, H, N))
    xs = [x.to(dtype) for x in (r, w, k, v, a, b)]
    xs[1] = w.to(w_dtype)
    state = rnd(B, H, N, N, scale=0.3) if with_state else None
    # loss weights, exactly representable in the activation dtype so the kernel sees the same do as the oracle
    go, gs = rnd(B, T, H, N).to(dtype).float(), rnd(B, H, N, N)
    return xs, state, go, gs


def run(fn, xs, state, go, gs, loss_on, dtype=None):
    """Output, final state and the gradients of every operand and of the initial state (leaves cast to ``dtype``)."""
    xs = [x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]
    state = state.detach().to(dtype or state.dtype).requires_grad_() if state is not None else None
    o, S = fn(*xs, state)
    loss = 0.0
    if loss_on in ("both", "o"):
        loss = loss + (o.double() * go.double()).sum()
    if loss_on in ("both", "state"):
        loss = loss + (S.double() * gs.double()).sum()
    loss.backward()
    return [o, S, *(x.grad for x in xs), state.grad if state is not None else None]


def bound(dtype: torch.dtype, floor_decay: bool = False, interpreted: bool = True) -> float:
    """Relative norm error allowed for one result of the given dtype.

    fp32 results: the kernels compute in fp32 like the reference; the gradients that use S_{t-1} (dr, dw, da) get
    it by undoing up to C - 1 = 15 steps from an exact checkpoint, which multiplies rounding by up to exp(-w)^15:
    ~30x for typical decays (measured ~4e-6; bound 1e-4) and 1.83^15 ~ 9e3 with every decay pinned at the floor
    (measured ~1e-4; bound 1e-3). Everything else measures ~1e-7. A wrong term, step or index gives O(1).
    bf16 results: storing the exact value as bf16 moves each element by less than one ulp, 2^-7 relative, in the
    interpreter (its fp32 -> bf16 cast truncates; measured ~3.3e-3), and by at most half an ulp, 2^-8, compiled
    (round to nearest); the norm error is at most that plus the fp32 part. The same code paths are held to the
    fp32 bounds by the fp32 cases.
    """
    fp32 = 1e-3 if floor_decay else 1e-4
    if dtype == torch.bfloat16:
        return fp32 + (2.0**-7 if interpreted else 2.0**-8)
    return fp32


def evaluate(wt, case) -> dict:
    """One case (module ``wt`` = wkv7_triton): relative errors of every result, their bounds, dtype mismatches."""
    _, B, T, H, N, dtype, w_dtype, with_state, loss_on, cfg, floor = case
    dtype, w_dtype = getattr(torch, dtype), getattr(torch, w_dtype)
    seed = 115
    out = {"seed": seed, "errors": {}, "bounds": {}, "dtype_errors": []}
    try:
        wt.CONFIG = wt.TritonWKVConfig(**cfg)
        fn = wt.wkv7_triton
        xs, state, go, gs = make_inputs(B, T, H, N, dtype, w_dtype, with_state, seed, floor)
        ours = run(fn, xs, state, go, gs, loss_on)
        ref = run(reference64, xs, state, go, gs, loss_on, torch.float64)
        # the contract's dtypes: o in r's dtype, fp32 states, every gradient in its operand's dtype
        want = [dtype, torch.float32, *(x.dtype for x in xs), torch.float32]
        for name, x, y, dt in zip(NAMES, ours, ref, want, strict=True):
            if y is None and x is not None:  # unused by the loss (r when only the state counts): must be zero
                y = torch.zeros_like(x, dtype=torch.float64) if x.abs().max() == 0 else None
            if (x is None) != (y is None):
                out["dtype_errors"].append(f"{name}: {x is None=} {y is None=}")
            if x is None or y is None:
                continue
            if x.dtype != dt:
                out["dtype_errors"].append(f"{name}: {x.dtype}, expected {dt}")
            out["errors"][name] = ((x.double() - y).norm() / y.norm().clamp_min(1e-300)).item()
            out["bounds"][name] = bound(x.dtype, floor)
        if T > 1:  # the inference path (no_grad: nothing saved) gives the same result
            with torch.no_grad():
                o, S = fn(*xs, state)
            out["errors"]["o_nograd"] = ((o.double() - ours[0].double()).norm() / ours[0].double().norm()).item()
            out["bounds"]["o_nograd"] = 0.0
    except Exception:
        out["exception"] = traceback.format_exc()
    return out


def empty_sequence(wt) -> dict:
    """T = 0: an empty output in r's dtype and the initial state passed through in fp32, as the reference gives."""
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(2, 0, 2, 8, generator=g).to(torch.bfloat16) for _ in range(6)]
    state = torch.randn(2, 2, 8, 8, generator=g)
    problems = []
    for s in (state, None):
        o, S = wt.wkv7_triton(*xs, s)
        o_ref, S_ref = wkv7_reference_fp32(*xs, s)
        if o.shape != o_ref.shape or o.dtype != o_ref.dtype:
            problems.append(f"o: {tuple(o.shape)} {o.dtype}, expected {tuple(o_ref.shape)} {o_ref.dtype}")
        if S.dtype != torch.float32 or not torch.equal(S, S_ref):
            problems.append(f"state (initial {'given' if s is not None else 'None'}) differs from the reference's")
    return {"problems": problems}


def wkv7_reference_fp32(*args):
    from rwkv_diffusion_rnn.models.wkv7 import wkv7_reference

    return wkv7_reference(*args)


def _worker() -> None:
    """Subprocess entry: run every case under the interpreter (TRITON_INTERPRET=1 set by the caller)."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    from tests.triton_interpreter import fit_interpreter_to_numpy

    fit_interpreter_to_numpy()

    from rwkv_diffusion_rnn.models import wkv7_triton as wt

    assert wt.INTERPRET
    torch.set_num_threads(1)
    results = {case[0]: evaluate(wt, case) for case in CASES}
    results["T0"] = empty_sequence(wt)
    print(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker()
else:
    import pytest

    from rwkv_diffusion_rnn.errors import DiffRwkvError
    from rwkv_diffusion_rnn.models import wkv7 as wkv7_mod
    from rwkv_diffusion_rnn.models.wkv7 import wkv7, wkv7_reference

    triton = pytest.importorskip("triton", reason="the triton WKV backend needs triton (pip install triton)")

    @pytest.fixture(scope="module")
    def interpreted() -> dict:
        """Every case's results from one interpreter subprocess (~30 s on two cores)."""
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, cwd=REPO
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_matches_fp64_reference(interpreted, case):
        res = interpreted[case[0]]
        assert "exception" not in res, res.get("exception")
        assert not res["dtype_errors"], res["dtype_errors"]
        summary = " ".join(f"{n}={e:.1e}" for n, e in res["errors"].items())
        bad = [f"{n}: {e:.2e} > {res['bounds'][n]:.1e}" for n, e in res["errors"].items() if not e <= res["bounds"][n]]
        assert not bad, f"seed {res['seed']} case {case}: {'; '.join(bad)} [{summary}]"
        expected = {"o", "state", "dr", "dw", "dk", "dv", "da", "db"} | ({"dstate"} if case[7] else set())
        assert expected <= set(res["errors"]), sorted(res["errors"])

    def test_empty_sequence(interpreted):
        assert not interpreted["T0"]["problems"], interpreted["T0"]["problems"]

    def test_fp64_oracle_is_the_reference_recurrence():
        """The fp64 twin used above agrees with wkv7_reference (fp32) to fp32 precision."""
        seed = 116
        xs, state, _, _ = make_inputs(2, 9, 2, 8, torch.float32, torch.float32, True, seed)
        for x, y in zip(reference64(*xs, state), wkv7_reference(*xs, state), strict=True):
            assert ((x - y.double()).norm() / x.norm()).item() < 1e-5, f"seed {seed}"

    def test_dispatch_and_errors(monkeypatch):
        """'triton' is registered but opt-in; on the CPU (compiled mode) it refuses in one line."""
        import importlib.util

        from rwkv_diffusion_rnn.models import wkv7_triton as compiled

        assert "triton" in wkv7_mod.BACKENDS
        monkeypatch.delenv("DIFFRWKV_WKV_BACKEND", raising=False)
        assert wkv7_mod.resolve_backend(None, torch.device("cpu")) == "reference"
        assert wkv7_mod.resolve_backend("auto", torch.device("cuda")) in ("cuda", "fla", "reference")  # never triton
        monkeypatch.setenv("DIFFRWKV_WKV_BACKEND", "triton")
        assert wkv7_mod.resolve_backend(None, torch.device("cpu")) == "triton"
        assert wkv7_mod.resolve_backend("auto", torch.device("cpu")) == "triton"  # the config's default defers too
        assert wkv7_mod.resolve_backend("reference", torch.device("cpu")) == "reference"  # an explicit name wins
        xs, state, _, _ = make_inputs(1, 3, 1, 8, torch.float32, torch.float32, True, 0)
        if not compiled.INTERPRET:
            with pytest.raises(DiffRwkvError, match="CUDA tensors only"):
                wkv7(*xs, state, backend="triton")
        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a)
        )
        with pytest.raises(DiffRwkvError, match="needs the triton package"):
            wkv7(*xs, state, backend="triton")

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a CUDA GPU")
    def test_compiled_on_gpu():
        """On a GPU machine: the compiled kernels (default launch config) at the real head size."""
        from rwkv_diffusion_rnn.models import wkv7_triton as compiled

        seed = 117
        xs, state, go, gs = make_inputs(2, 100, 3, 64, torch.bfloat16, torch.float32, True, seed)
        cuda = [x.cuda() for x in xs]
        ours = run(compiled.wkv7_triton, cuda, state.cuda(), go.cuda(), gs.cuda(), "both")
        ref = run(reference64, xs, state, go, gs, "both", torch.float64)
        for name, x, y in zip(NAMES, ours, ref, strict=True):
            err = ((x.double().cpu() - y).norm() / y.norm()).item()
            assert err <= bound(x.dtype, interpreted=False), f"seed {seed} {name}: {err:.2e}"
