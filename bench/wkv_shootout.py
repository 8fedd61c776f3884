"""Op-level WKV-7 kernel shoot-out: correctness and speed of every kernel we could adopt (outside CI).

    export PYTHONPATH=$PWD; python bench/wkv_shootout.py [--blinkdl-src DIR] [--out results.json]
        [--shapes 16x512x12x64,16x512x16x64] [--check-shape 4x512x12x64] [--budget-s 290]
    python bench/wkv_shootout.py --cpu-dry-run      # the adapters against the reference, on the CPU

Kernels (each optional; one that cannot load or build prints one line and the others go on):

``triton``            ours (rwkv_diffusion_rnn/models/wkv7_triton.py).
``ours_cuda``         ours in CUDA (rwkv_diffusion_rnn/models/wkv7_cuda.py, backend ``cuda``: head size 64, no initial
                      state), built in this process on first use (nvcc and ninja) while the other builds run; 2
                      threads per state row (its default), ``ours_cuda_x1`` / ``ours_cuda_x4``: 1 or 4.
``fla``               fla's chunked ``chunk_rwkv7`` (flash-linear-attention / fla-core), when it imports.
``blinkdl``           BlinkDL's RWKV-7 training kernel (RWKV-LM, RWKV-v7/train_temp/cuda/rwkv7_clampw.cu, .cpp),
``blinkdl_v3``        ... its H100 variant (rwkv7_clampw_v3_for_h100.cu + rwkv7_clampw_v3.cpp),
``blinkdl_v3_alt``    ... and the alternative H100 variant (rwkv7_clampw_v3_for_h100_alt.cu). Built with
                      torch.utils.cpp_extension from the sources in ``--blinkdl-src`` (copied first into the
                      git-ignored bench/_external/), so they need nvcc and ninja; skipped, saying so, without them.
``rwkv_ops_triton``   rwkv-ops' Triton kernel (loaded straight from its files: the package itself needs keras).
``rwkv_ops_cuda``     rwkv-ops' CUDA kernel (BlinkDL's older kernel plus an initial state), built like BlinkDL's.
``flashrwkv2``        FlashRWKV2's TileLang recurrence (needs tilelang and nvcc).

Conventions (ours: state ``S[k, v]``, ``w`` the log decay, see rwkv_diffusion_rnn/models/wkv7.py). BlinkDL's current
kernels and FlashRWKV2 take the decay LOGIT ``z`` with ``w = -exp(-0.5) * sigmoid(z)`` (the soft clamp lives in the
kernel), so the adapters feed ``z = logit(w / -exp(-0.5))``; rwkv-ops takes ``w' = log(-w)`` (decay
``exp(-exp(w'))``) and keeps the state as ``S[v, k]``. BlinkDL's kernels take no initial state and return no final
state; the adapter reads the final state (without gradient) from the last chunk checkpoint, stored ``S[k, v]``.

1. Correctness on ``--check-shape`` with bf16 inputs against the recurrence in fp64 on the same inputs: output,
   final state, and the gradients of r, w, k, v, a, b (and of the initial state) for a loss on the output and the
   final state, as relative norm errors; kernels without an initial state or a differentiable final state are
   checked with a zero initial state and a loss on the output only (their truth likewise). Printed with a verdict:
   ``ok`` (all <= 1e-2: bf16 roundings), ``near`` (<= 0.1), ``WRONG``.
2. Timing per shape, bf16 inputs already in each kernel's own parameterisation (the conversion is not timed), no
   initial state: the forward with autograd recording and forward + backward (output gradient only), median of
   ``triton.testing.do_bench``. Builds run in parallel processes while the Python kernels are checked; timing
   starts once they are done.

``--budget-s`` bounds the whole run: what does not fit is skipped with one line. Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: gpu_check_wkv
import gpu_check_wkv as gcw  # noqa: E402

from rwkv_diffusion_rnn.models.wkv7 import BACKENDS, _fla_chunk, wkv7_reference  # noqa: E402

CHUNK = 16  # the chunk length BlinkDL's and rwkv-ops' CUDA kernels are built with (T must be a multiple)
EXTERNAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_external")
RESULTS = ("o", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate")
T0 = time.monotonic()


def left(budget: float) -> float:
    return budget - (time.monotonic() - T0)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1][:160] if text else ''}"


# ---------------------------------------------------------------- parameterisations (not timed)


def w_logit(w: torch.Tensor) -> torch.Tensor:
    """Our log decay -> the decay logit z of BlinkDL / FlashRWKV2 (w = -exp(-0.5) sigmoid(z))."""
    return torch.logit(w.float() / gcw.DECAY_FLOOR, eps=1e-6).to(w.dtype)


def w_loglog(w: torch.Tensor) -> torch.Tensor:
    """Our log decay -> rwkv-ops' w' (decay exp(-exp(w'))): w' = log(-w)."""
    return torch.log((-w.float()).clamp_min(1e-30)).to(w.dtype)


# ---------------------------------------------------------------- adapters: (raw kernel, our operands) -> ours


def adapt_ours(raw, r, w, k, v, a, b, state):
    return raw(r, w, k, v, a, b, state)


def adapt_blinkdl(raw, r, z, k, v, a, b, state):
    if state is not None:
        raise ValueError("BlinkDL's kernel takes no initial state")
    return raw(*(x.contiguous() for x in (r, z, k, v, a, b)))


def adapt_rwkv_ops(raw, r, wl, k, v, a, b, state):
    h0 = state.transpose(-1, -2) if state is not None else None  # ours S[k, v] -> theirs S[v, k]
    o, S = raw(r, wl, k, v, a, b, initial_state=h0, output_final_state=True)
    return o, S.transpose(-1, -2)


def adapt_flashrwkv2(raw, r, z, k, v, a, b, state):
    B, T, H, N = r.shape
    flat = [x.contiguous().view(B * T, H, N) for x in (r, z, k, v, a, b)]  # packed sequences [B*T, H, N]
    s0 = state.float().contiguous() if state is not None else r.new_zeros(B, H, N, N, dtype=torch.float32)
    cu = torch.arange(B + 1, dtype=torch.int32, device=r.device) * T
    y, S = raw(*flat, s0, cu)
    return y.view(B, T, H, N), S


# ---------------------------------------------------------------- CPU stand-ins of the kernels' own contracts


def recurrence_vk(r, decay, k, v, a, b, S):
    """WKV-7 with the state kept as S[v, k] (BlinkDL's layout), fp32; a second statement of the recurrence."""
    outs = []
    for t in range(r.shape[1]):
        sa = S @ a[:, t, :, :, None]  # [B, H, V, 1]
        S = S * decay[:, t, :, None, :] + sa * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        outs.append((S @ r[:, t, :, :, None])[..., 0])
    return torch.stack(outs, dim=1), S


def emulate_blinkdl(r, z, k, v, a, b):
    f = [x.float() for x in (r, z, k, v, a, b)]
    decay = torch.exp(gcw.DECAY_FLOOR * torch.sigmoid(f[1]))
    B, _, H, N = r.shape
    o, S = recurrence_vk(f[0], decay, *f[2:], r.new_zeros(B, H, N, N, dtype=torch.float32))
    return o.to(r.dtype), S.transpose(-1, -2).detach()  # the last checkpoint, stored S[k, v]; no gradient


def emulate_rwkv_ops(r, wl, k, v, a, b, initial_state=None, output_final_state=True):
    f = [x.float() for x in (r, wl, k, v, a, b)]
    B, _, H, N = r.shape
    S0 = initial_state.float() if initial_state is not None else r.new_zeros(B, H, N, N, dtype=torch.float32)
    o, S = recurrence_vk(f[0], torch.exp(-torch.exp(f[1])), *f[2:], S0)
    return o.to(r.dtype), S


def emulate_flashrwkv2(r, z, k, v, a, b, s0, cu):
    B, (_, H, N) = cu.numel() - 1, r.shape
    f = [x.float().view(B, -1, H, N) for x in (r, z, k, v, a, b)]
    o, S = recurrence_vk(f[0], torch.exp(gcw.DECAY_FLOOR * torch.sigmoid(f[1])), *f[2:], s0.transpose(-1, -2))
    return o.reshape(r.shape).to(r.dtype), S.transpose(-1, -2)


# ---------------------------------------------------------------- loaders (GPU): return the raw kernel


def load_triton():
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("triton is not installed")
    return BACKENDS["triton"]


def ours_cuda_loader(split: int, bwd_split: int | None = None):
    """Our CUDA kernel with ``split`` threads per state row in the forward and ``bwd_split`` (by default the same) in
    the backward."""

    def load():
        from rwkv_diffusion_rnn.models import wkv7_cuda

        wkv7_cuda.extension()  # the build (or the load of an earlier build); one line without nvcc / ninja

        def run(*args):
            saved = wkv7_cuda.CONFIG
            wkv7_cuda.CONFIG = wkv7_cuda.CudaWKVConfig(split, bwd_split or split)  # the backward reads it here
            try:
                return BACKENDS["cuda"](*args)
            finally:
                wkv7_cuda.CONFIG = saved

        return run

    return load


def load_fla():
    if _fla_chunk() is None:
        raise RuntimeError("fla does not import (pip install fla-core==0.6.0 einops)")
    return BACKENDS["fla"]


def blinkdl_fn(lib: str):
    ops = getattr(torch.ops, lib)

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, r, w, k, v, a, b):
            B, T, H, N = r.shape
            if T % CHUNK:
                raise ValueError(f"T={T} must be a multiple of {CHUNK}")
            y = torch.empty_like(v)
            s = torch.empty(B, H, T // CHUNK, N, N, dtype=torch.float32, device=r.device)
            sa = torch.empty(B, T, H, N, dtype=torch.float32, device=r.device)
            ops.forward(r, w, k, v, a, b, y, s, sa)
            ctx.save_for_backward(r, w, k, v, a, b, s, sa)
            last = s[:, :, -1]
            ctx.mark_non_differentiable(last)
            return y, last

        @staticmethod
        def backward(ctx, dy, _dlast):
            r, w, k, v, a, b, s, sa = ctx.saved_tensors
            grads = [torch.empty_like(x) for x in (r, w, k, v, a, b)]
            ops.backward(r, w, k, v, a, b, dy.contiguous(), s, sa, *grads)
            return tuple(grads)

    return Fn.apply


def rwkv_ops_cuda_fn(lib: str):
    """The autograd wrapper rwkv-ops puts around its CUDA op (its own imports keras): states S[v, k]."""
    ops = getattr(torch.ops, lib)

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w, q, k, v, a, b, h0):
            B, T, H, N = w.shape
            if T % CHUNK:
                raise ValueError(f"T={T} must be a multiple of {CHUNK}")
            y = torch.empty_like(v)
            s = torch.empty(B, H, T // CHUNK, N, N, dtype=torch.float32, device=w.device)
            sa = torch.empty(B, T, H, N, dtype=torch.float32, device=w.device)
            ops.forward(w, q, k, v, a, b, y, s, sa, h0)
            ctx.save_for_backward(w, q, k, v, a, b, s, sa)
            return y, s[:, :, -1].transpose(-1, -2).contiguous()

        @staticmethod
        def backward(ctx, dy, dht):
            w, q, k, v, a, b, s, sa = ctx.saved_tensors
            B, _, H, N = w.shape
            dy = torch.zeros_like(v) if dy is None else dy.contiguous()
            dht = w.new_zeros(B, H, N, N, dtype=torch.float32) if dht is None else dht.float().contiguous()
            dh0 = torch.empty_like(dht)
            grads = [torch.empty_like(x) for x in (w, q, k, v, a, b)]
            ops.backward(w, q, k, v, a, b, dy, s, sa, dht, dh0, *grads)
            return (*grads, dh0)

    def run(r, wl, k, v, a, b, initial_state=None, output_final_state=True):
        B, _, H, N = r.shape
        h0 = (
            initial_state.float().contiguous()
            if initial_state is not None
            else r.new_zeros(B, H, N, N, dtype=torch.float32)
        )
        return Fn.apply(*(x.contiguous() for x in (wl, r, k, v, a, b)), h0)

    return run


def rwkv_ops_dir() -> str:
    spec = importlib.util.find_spec("rwkv_ops")  # finds the package without running its __init__ (keras)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("rwkv-ops is not installed")
    return os.path.join(spec.submodule_search_locations[0], "rwkv7_kernel")


def load_rwkv_ops_triton():
    pkg = types.ModuleType("_rwkv_ops_wkv7")
    pkg.__path__ = [rwkv_ops_dir()]
    sys.modules.setdefault("_rwkv_ops_wkv7", pkg)
    return importlib.import_module("_rwkv_ops_wkv7.torch_triton_kernel").generalized_delta_rule


def load_flashrwkv2():
    from flashrwkv2.tmix.wkv7.tilelang import tmix_wkv7_recurrent

    return tmix_wkv7_recurrent


# ---------------------------------------------------------------- CUDA builds


BLINKDL_FLAGS = ["-res-usage", "-D_N_=64", f"-D_CHUNK_LEN_={CHUNK}", "--use_fast_math", "-O3", "-Xptxas -O3",
                 "--extra-device-vectorization"]  # fmt: skip


def build_specs(blinkdl_src: str | None) -> dict[str, dict]:
    """cpp_extension.load arguments per CUDA kernel; BlinkDL's files are copied into bench/_external/ first."""
    specs = {}
    if blinkdl_src:
        dst = os.path.join(EXTERNAL, "blinkdl")
        os.makedirs(dst, exist_ok=True)
        for name in ("rwkv7_clampw.cu", "rwkv7_clampw.cpp", "rwkv7_clampw_v3.cpp", "rwkv7_clampw_v3_for_h100.cu",
                     "rwkv7_clampw_v3_for_h100_alt.cu"):  # fmt: skip
            shutil.copy(os.path.join(blinkdl_src, name), dst)
        # the alternative H100 kernel shares the v3 bindings: register them under another library name
        with open(os.path.join(dst, "rwkv7_clampw_v3.cpp")) as f:
            text = f.read().replace("TORCH_LIBRARY(rwkv7_clampw_v3,", "TORCH_LIBRARY(rwkv7_clampw_v3_alt,")
        with open(os.path.join(dst, "rwkv7_clampw_v3_alt.cpp"), "w") as f:
            f.write(text)
        for kernel, lib, cu, cpp in (
            ("blinkdl", "rwkv7_clampw", "rwkv7_clampw.cu", "rwkv7_clampw.cpp"),
            ("blinkdl_v3", "rwkv7_clampw_v3", "rwkv7_clampw_v3_for_h100.cu", "rwkv7_clampw_v3.cpp"),
            ("blinkdl_v3_alt", "rwkv7_clampw_v3_alt", "rwkv7_clampw_v3_for_h100_alt.cu", "rwkv7_clampw_v3_alt.cpp"),
        ):
            specs[kernel] = {"name": lib, "sources": [os.path.join(dst, cu), os.path.join(dst, cpp)],
                             "extra_cuda_cflags": BLINKDL_FLAGS}  # fmt: skip
    try:
        src = os.path.join(rwkv_ops_dir(), "torch_cuda_kernel")
        lib = f"wind_backstepping_64_{CHUNK}"
        specs["rwkv_ops_cuda"] = {
            "name": lib,
            "sources": [os.path.join(src, "wkv7_cuda.cu"), os.path.join(src, "wkv7_op.cpp")],
            "extra_cflags": [f"-DTORCH_LIBRARY_NAME={lib}"],
            "extra_cuda_cflags": ["-res-usage", "-D_C_=64", f"-D_CHUNK_LEN_={CHUNK}", f"-DTORCH_LIBRARY_NAME={lib}",
                                  "--use_fast_math", "-O3", "-Xptxas -O3", "--extra-device-vectorization"],
        }  # fmt: skip
    except RuntimeError:
        pass
    for spec in specs.values():
        spec.update(is_python_module=False, build_directory=os.path.join(EXTERNAL, "build", spec["name"]))
        os.makedirs(spec["build_directory"], exist_ok=True)
    return specs


def toolchain() -> dict:
    """nvcc and ninja for the CUDA builds. CUDA_HOME, when unset, is the first of torch's guess, /usr/local/cuda and
    the folder above nvcc's that holds both bin/nvcc and include/cuda_runtime.h (an nvcc on PATH may be a wrapper
    script, which misleads torch's guess)."""
    from torch.utils import cpp_extension as ce

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        on_path = shutil.which("nvcc")
        above = os.path.dirname(os.path.dirname(os.path.realpath(on_path))) if on_path else None
        for cand in (ce.CUDA_HOME, "/usr/local/cuda", above):
            if cand and all(os.path.exists(os.path.join(cand, x)) for x in ("bin/nvcc", "include/cuda_runtime.h")):
                home = cand
                break
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    nvcc = nvcc if nvcc and os.path.exists(nvcc) else None
    if nvcc and torch.version.cuda:  # the builds (this process and its children) use this toolkit
        os.environ["CUDA_HOME"] = ce.CUDA_HOME = home
    version = None
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
            version = out.strip().splitlines()[-1] if out.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    return {"nvcc": nvcc, "nvcc_version": version, "ninja": ce.is_ninja_available(), "torch_cuda": torch.version.cuda}


BUILD = """import json, os, sys
from torch.utils import cpp_extension as ce
ce.CUDA_HOME = os.environ.get("CUDA_HOME") or ce.CUDA_HOME  # as chosen by toolchain()
ce.load(verbose=True, **json.loads(sys.argv[1]))"""


def start_builds(specs: dict[str, dict]) -> dict[str, tuple[subprocess.Popen, float, str]]:
    procs = {}
    for kernel, spec in specs.items():
        log = os.path.join(EXTERNAL, f"build_{kernel}.log")
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-c", BUILD, json.dumps(spec)], stdout=f, stderr=subprocess.STDOUT)
        procs[kernel] = (proc, time.monotonic(), log)
    return procs


def finish_build(kernel, procs, spec, deadline) -> tuple[float, str | None]:
    """Wait for one build; load it in this process. Returns (seconds, error line or None)."""
    proc, started, log = procs[kernel]
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return time.monotonic() - started, f"build still running past the budget (killed); log {log}"
    seconds = time.monotonic() - started
    if proc.returncode:
        with open(log) as f:
            lines = [x.strip() for x in f if x.strip()]
        compiler = [x for x in lines if any(m in x for m in ("error:", "cannot find", "undefined reference"))]
        first = (compiler or lines or ["(empty log)"])[0 if compiler else -1]  # first compiler error, else last line
        return seconds, f"build failed ({first[:200]}); log {log}"
    from torch.utils.cpp_extension import load

    load(**spec, verbose=False)  # up to date: only loads the library
    return seconds, None


# ---------------------------------------------------------------- kernels


@dataclass
class Kernel:
    name: str
    origin: str
    adapt: Callable
    native_w: Callable[[torch.Tensor], torch.Tensor]
    init_state: bool  # takes an initial state (and returns its gradient)
    final_grad: bool  # returns a differentiable final state
    load: Callable | None  # -> raw kernel (GPU); None: built, see raw_from_build
    emulate: Callable  # the raw kernel's contract in plain PyTorch, for --cpu-dry-run
    raw_from_build: Callable[[str], Callable] | None = None


def identity(w):
    return w


KERNELS = [
    Kernel("triton", "ours", adapt_ours, identity, True, True, load_triton, wkv7_reference),
    Kernel("ours_cuda", "ours", adapt_ours, identity, False, True, ours_cuda_loader(2), wkv7_reference),
    Kernel("ours_cuda_x1", "ours", adapt_ours, identity, False, True, ours_cuda_loader(1), wkv7_reference),
    Kernel("ours_cuda_x4", "ours", adapt_ours, identity, False, True, ours_cuda_loader(4), wkv7_reference),
    Kernel("fla", "fla-core 0.6.0", adapt_ours, identity, True, True, load_fla, wkv7_reference),
    Kernel("blinkdl", "RWKV-LM train_temp", adapt_blinkdl, w_logit, False, False, None, emulate_blinkdl, blinkdl_fn),
    Kernel("blinkdl_v3", "RWKV-LM train_temp", adapt_blinkdl, w_logit, False, False, None, emulate_blinkdl,
           blinkdl_fn),
    Kernel("blinkdl_v3_alt", "RWKV-LM train_temp", adapt_blinkdl, w_logit, False, False, None, emulate_blinkdl,
           blinkdl_fn),
    Kernel("rwkv_ops_triton", "rwkv-ops", adapt_rwkv_ops, w_loglog, True, True, load_rwkv_ops_triton,
           emulate_rwkv_ops),
    Kernel("rwkv_ops_cuda", "rwkv-ops", adapt_rwkv_ops, w_loglog, True, True, None, emulate_rwkv_ops,
           rwkv_ops_cuda_fn),
    Kernel("flashrwkv2", "FlashRWKV2", adapt_flashrwkv2, w_logit, True, True, load_flashrwkv2, emulate_flashrwkv2),
]  # fmt: skip


def as_ours(kern: Kernel, raw) -> Callable:
    def fn(r, w, k, v, a, b, state):
        return kern.adapt(raw, r, kern.native_w(w), k, v, a, b, state)

    return fn


# ---------------------------------------------------------------- correctness


def outcome(fn, xs, state, go, gs, dtype=None) -> dict[str, torch.Tensor]:
    """Output, final state and gradients (leaves cast to ``dtype``) for a loss on the output (and final state)."""
    xs = [x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]
    st = state.detach().to(dtype or state.dtype).requires_grad_() if state is not None else None
    o, S = fn(*xs, st)
    loss = (o.double() * go).sum()
    if gs is not None:
        loss = loss + (S.double() * gs).sum()
    loss.backward()
    res = dict(zip(RESULTS, (o.detach(), S.detach(), *(x.grad for x in xs)), strict=False))
    if st is not None:
        res["dstate"] = st.grad
    return res


class Checker:
    """Inputs and fp64 truths of one check shape, for the two contracts (with / without states)."""

    def __init__(self, shape, dtype, seed, device):
        B, T, H, N = shape
        self.shape, self.dtype, self.seed, self.truths = shape, dtype, seed, {}
        g = torch.Generator(device=device).manual_seed(seed + 1)
        self.go = torch.randn(B, T, H, N, generator=g, device=device).to(dtype).double()
        self.gs = torch.randn(B, H, N, N, generator=g, device=device).double()

    def case(self, with_state: bool):
        B, T, H, N = self.shape
        xs, state = gcw.inputs(B, T, H, N, self.dtype, False, self.seed, with_state=with_state)
        gs = self.gs if with_state else None
        if with_state not in self.truths:
            self.truths[with_state] = outcome(gcw.reference64, xs, state, self.go, gs, torch.float64)
        return xs, state, gs, self.truths[with_state]

    def run(self, kern: Kernel, raw) -> dict:
        with_state = kern.init_state and kern.final_grad
        xs, state, gs, truth = self.case(with_state)
        got = outcome(as_ours(kern, raw), xs, state, self.go, gs)
        errs = {name: gcw.rel(got[name], ref) for name, ref in truth.items() if got.get(name) is not None}
        worst_name = max(errs, key=errs.get)
        worst = errs[worst_name]
        verdict = "ok" if worst <= 1e-2 else "near" if worst <= 0.1 else "WRONG"
        contract = "initial state, loss on o and final state" if with_state else "no initial state, loss on o"
        return {"contract": contract, "errors": errs, "worst": worst, "worst_result": worst_name, "verdict": verdict}


def print_check(name: str, res: dict) -> None:
    errs = " ".join(f"{k} {v:.1e}" for k, v in res["errors"].items())
    print(
        f"  {name:<16}{res['verdict']:<6} worst {res['worst_result']} {res['worst']:.2e} ({res['contract']}): {errs}",
        flush=True,
    )


# ---------------------------------------------------------------- timing


def time_kernel(kern: Kernel, raw, shape, dtype) -> dict:
    import triton.testing

    B, T, H, N = shape
    xs, _ = gcw.inputs(B, T, H, N, dtype, False, 0, with_state=False)
    xs[1] = kern.native_w(xs[1])  # the kernel's own parameterisation, outside the timing
    xs = [x.detach().requires_grad_() for x in xs]
    do = torch.randn(B, T, H, N, device=gcw.DEVICE, dtype=dtype)

    def fwd():
        return kern.adapt(raw, *xs, None)

    def fwd_bwd():
        o, _ = kern.adapt(raw, *xs, None)
        torch.autograd.backward(o, do)

    fwd_bwd()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    t_fwd = triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median")
    t_all = triton.testing.do_bench(fwd_bwd, warmup=25, rep=200, grad_to_none=xs, return_mode="median")
    return {"shape": "x".join(map(str, shape)), "fwd_ms": t_fwd, "fwd_bwd_ms": t_all, "bwd_ms": t_all - t_fwd}


def print_table(report: dict) -> None:
    rows = [(name, t) for name, k in report["kernels"].items() for t in k.get("timings", [])]
    if not rows:
        print("\nno timings")
        return
    print("\ntiming (bf16, median ms; speed-up = the other's fwd+bwd / this one's):")
    print(f"{'shape BxTxHxN':<16}{'kernel':<17}{'fwd':>8}{'fwd+bwd':>9}{'bwd':>8}{'vs fla':>8}{'vs triton':>10}  check")
    for shape in dict.fromkeys(t["shape"] for _, t in rows):
        here = {name: t for name, t in rows if t["shape"] == shape}
        for name, t in sorted(here.items(), key=lambda x: x[1]["fwd_bwd_ms"]):
            vs = [f"{here[o]['fwd_bwd_ms'] / t['fwd_bwd_ms']:.2f}x" if o in here else "-" for o in ("fla", "triton")]
            check = report["kernels"][name].get("check", {}).get("verdict", "-")
            print(f"{shape:<16}{name:<17}{t['fwd_ms']:>8.3f}{t['fwd_bwd_ms']:>9.3f}{t['bwd_ms']:>8.3f}"
                  f"{vs[0]:>8}{vs[1]:>10}  {check}")  # fmt: skip


# ---------------------------------------------------------------- main


def dry_run(args) -> int:
    """The adapters with each kernel's contract emulated in PyTorch, against the fp64 reference, on the CPU."""
    gcw.DEVICE = "cpu"
    torch.manual_seed(0)
    if args.blinkdl_src:
        specs = build_specs(args.blinkdl_src)
        print(f"copied BlinkDL's sources to {EXTERNAL}/blinkdl; would build: {', '.join(specs)}")
    print(f"toolchain: {toolchain()}; rwkv_ops: {importlib.util.find_spec('rwkv_ops') is not None}, "
          f"flashrwkv2: {importlib.util.find_spec('flashrwkv2') is not None}")  # fmt: skip
    shape = gcw.parse_shape(args.dry_shape)
    checker = Checker(shape, torch.bfloat16, args.seed, "cpu")
    print(f"dry run: adapters + emulated kernels vs the fp64 reference, B{shape[0]} T{shape[1]} H{shape[2]} "
          f"N{shape[3]}, bf16 inputs")  # fmt: skip
    bad = 0
    for kern in KERNELS:
        res = checker.run(kern, kern.emulate)
        print_check(kern.name, res)
        bad += res["verdict"] != "ok"
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="16x512x12x64,16x512x16x64", help="comma list of BxTxHxN to time")
    ap.add_argument("--check-shape", default="4x512x12x64", help="BxTxHxN of the correctness check")
    ap.add_argument("--kernels", default=",".join(k.name for k in KERNELS), help="comma list of kernels")
    ap.add_argument("--blinkdl-src", help="folder with BlinkDL's rwkv7_clampw*.cu/.cpp (RWKV-v7/train_temp/cuda)")
    ap.add_argument("--budget-s", type=float, default=290.0, help="wall-clock budget of the whole run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the correctness inputs")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--cpu-dry-run", action="store_true", help="check the adapters on the CPU (no kernels run)")
    ap.add_argument("--dry-shape", default="2x32x2x64", help="BxTxHxN of the dry run")
    args = ap.parse_args()
    if args.cpu_dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (or --cpu-dry-run)", file=sys.stderr)
        return 2
    import triton

    os.makedirs(EXTERNAL, exist_ok=True)
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")  # build for this GPU only
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    wanted = [k for k in KERNELS if k.name in args.kernels.split(",")]
    tools = toolchain()
    device = torch.cuda.get_device_name()
    print(f"{device}; torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}; "
          f"nvcc {tools['nvcc'] or 'not found'} ({tools['nvcc_version']}), ninja {tools['ninja']}")  # fmt: skip
    report = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "toolchain": tools,
              "shapes": args.shapes, "check_shape": args.check_shape, "seed": args.seed, "kernels": {}}  # fmt: skip
    results = report["kernels"]

    def dump() -> None:  # after every step: a run cut short still leaves its results
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)

    for k in wanted:
        results[k.name] = {"origin": k.origin, "initial_state": k.init_state, "final_state_grad": k.final_grad}

    # builds first, in the background
    specs = {n: s for n, s in build_specs(args.blinkdl_src).items() if n in results}
    for k in wanted:
        if k.load is None and k.name not in specs:
            why = "no --blinkdl-src" if k.name.startswith("blinkdl") else "rwkv-ops is not installed"
            results[k.name].update(status="skipped", reason=why)
    if specs and not (tools["nvcc"] and tools["ninja"]):
        why = "needs nvcc" if not tools["nvcc"] else "needs ninja (pip install ninja)"
        for name in specs:
            results[name].update(status="skipped", reason=f"CUDA build {why}: not found on this machine")
        specs = {}
    procs = start_builds(specs) if specs else {}
    if procs:
        print(f"building {', '.join(procs)} in the background (logs in {EXTERNAL})", flush=True)

    gcw.DEVICE = "cuda"
    checker = Checker(gcw.parse_shape(args.check_shape), torch.bfloat16, args.seed, "cuda")
    print(f"\ncorrectness on {args.check_shape}, bf16 inputs, seed {args.seed}; relative error vs fp64:")
    raws = {}

    def check(k: Kernel, raw) -> None:
        if left(args.budget_s) < 20:
            results[k.name].update(status="skipped", reason="out of time budget before its check")
            print(f"  {k.name:<16}skipped: out of time budget", flush=True)
            return
        try:
            res = checker.run(k, raw)
        except Exception as e:
            results[k.name].update(status="failed", reason=f"check: {one_line(e)}")
            print(f"  {k.name:<16}failed: {one_line(e)}", flush=True)
            return
        results[k.name]["check"] = res
        raws[k.name] = raw
        print_check(k.name, res)
        dump()

    for k in wanted:
        if k.load is None:
            continue
        try:
            raw = k.load()
        except Exception as e:
            results[k.name].update(status="unavailable", reason=one_line(e))
            print(f"  {k.name:<16}unavailable: {one_line(e)}", flush=True)
            continue
        check(k, raw)
    deadline = T0 + args.budget_s - 60  # leave a minute to check and time what was built
    for k in wanted:
        if k.name not in procs:
            continue
        try:
            seconds, err = finish_build(k.name, procs, specs[k.name], deadline)
        except Exception as e:
            seconds, err = time.monotonic() - procs[k.name][1], f"load: {one_line(e)}"
        results[k.name]["build_s"] = round(seconds, 1)
        if err:
            results[k.name].update(status="failed", reason=err)
            print(f"  {k.name:<16}failed after {seconds:.0f} s: {err}", flush=True)
            continue
        print(f"  {k.name:<16}built in {seconds:.0f} s", flush=True)
        check(k, k.raw_from_build(specs[k.name]["name"]))

    print("\ntiming:", flush=True)
    for shape in (gcw.parse_shape(s) for s in args.shapes.split(",")):
        for name, raw in raws.items():
            k = next(x for x in wanted if x.name == name)
            if left(args.budget_s) < 10:
                print(f"  {name} {shape}: skipped, out of time budget", flush=True)
                continue
            try:
                t = time_kernel(k, raw, shape, torch.bfloat16)
            except Exception as e:
                results[name].setdefault("timing_errors", []).append(one_line(e))
                print(f"  {name} {shape}: failed: {one_line(e)}", flush=True)
                continue
            results[name].setdefault("timings", []).append(t)
            results[name]["status"] = "ok"
            print(
                f"  {name:<16}{t['shape']:<16} fwd {t['fwd_ms']:.3f} ms, fwd+bwd {t['fwd_bwd_ms']:.3f} ms", flush=True
            )
            torch.cuda.empty_cache()
            dump()
    print_table(report)
    print(f"\nwall time {time.monotonic() - T0:.0f} s")
    for name, res in results.items():
        if res.get("status") not in (None, "ok"):
            print(f"  {name}: {res['status']}: {res.get('reason', '')}")
    report["wall_s"] = round(time.monotonic() - T0, 1)
    dump()
    return 0 if any("timings" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
