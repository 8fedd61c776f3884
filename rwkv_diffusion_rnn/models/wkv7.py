"""The WKV-7 recurrence of RWKV-7 ("Goose"), with interchangeable backends.

Per head, with key/value size N (= 64 in every g1 model), the state S is an N x N matrix stored as ``S[k, v]`` (fla's
layout; BlinkDL's code keeps the transpose ``S[v, k]``). For each step t::

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    o_t = S_t^T r_t

``w`` is the LOG decay (w <= 0; RWKV-7 uses w = -exp(-0.5) * sigmoid(.)), and RWKV-7 sets ``a = -kk`` and
``b = kk * a_gate`` so that ``diag(w) + a b^T`` is a (scaled) generalised Householder transition.

Backends
--------
``reference``  plain PyTorch loop over time with an fp32 state: runs anywhere, differentiable, the ground truth.
``fla``        fla's Triton ``chunk_rwkv7`` (CUDA only; install ``diffrwkv[gpu]``).
``triton``     our own sequential Triton kernels, forward and backward (:mod:`.wkv7_triton`; CUDA only, needs
               ``triton``; opt-in: ``auto`` never picks it).
``cuda``       our own CUDA kernels, forward and backward, head size 64, no initial state (:mod:`.wkv7_cuda`;
               built on first use with nvcc and ninja, under a minute). Training runs it; a call it cannot take (an
               initial state, as the samplers' recurrent cache passes, or a head size other than 64) goes to
               ``fla`` when fla imports, else ``triton`` when triton imports, else ``reference`` (:func:`wkv7`).
``auto``       for CUDA tensors ``cuda`` where its kernel builds here (a CUDA build of torch, a GPU of compute
               capability 8.0 or newer, nvcc and ninja found, the build succeeds; checked once per process, a failed
               build warns once), else ``fla`` when fla imports, else ``reference``. ``cuda`` is the fastest in
               the training step (docs/RESULTS.md, "WKV-7 in the training step"); fla, the earlier default, stays
               one setting away.

The backend can be forced per call, per model (``RWKV7.wkv_backend``) or globally with the environment variable
``DIFFRWKV_WKV_BACKEND``, which a call or model asking for ``auto`` (or nothing) follows; an explicit name wins.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from functools import lru_cache

import torch

from rwkv_diffusion_rnn.errors import DiffRwkvError

WKVFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BACKENDS: dict[str, WKVFn] = {}


def register_backend(name: str) -> Callable[[WKVFn], WKVFn]:
    def deco(fn: WKVFn) -> WKVFn:
        BACKENDS[name] = fn
        return fn

    return deco


@register_backend("reference")
def wkv7_reference(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential WKV-7.

    Args:
        r, w, k, a, b: ``[B, T, H, N]``; ``w`` is the log decay.
        v: ``[B, T, H, N]``.
        state: ``[B, H, N, N]`` (``S[k, v]``), fp32; zeros when None.
        compute_dtype: the state's and the step's dtype (float64 makes the oracle the kernels' tests compare with).

    Returns:
        ``o`` ``[B, T, H, N]`` in the dtype of ``r``, and the final state ``[B, H, N, N]`` in ``compute_dtype``.
    """
    B, T, H, N = r.shape
    dtype = r.dtype
    # The state accumulates over the whole sequence: keep it (and the step's operands) in fp32 whatever the
    # activation dtype, as BlinkDL's reference does.
    r, w, k, v, a, b = (x.to(compute_dtype) for x in (r, w, k, v, a, b))
    S = state.to(compute_dtype) if state is not None else r.new_zeros(B, H, N, N)
    decay = torch.exp(w)
    outs = []
    for t in range(T):
        sa = torch.einsum("bhk,bhkv->bhv", a[:, t], S)
        S = (
            S * decay[:, t, :, :, None]
            + b[:, t, :, :, None] * sa[:, :, None, :]
            + k[:, t, :, :, None] * v[:, t, :, None, :]
        )
        outs.append(torch.einsum("bhk,bhkv->bhv", r[:, t], S))
    o = torch.stack(outs, dim=1) if outs else r.new_zeros(B, 0, H, N)
    return o.to(dtype), S


@lru_cache(maxsize=1)
def _fla_chunk():
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception:  # ImportError, or a Triton/driver problem surfacing at import
        return None
    return chunk_rwkv7


@register_backend("fla")
def wkv7_fla(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's chunked Triton kernel; same contract as :func:`wkv7_reference`."""
    chunk = _fla_chunk()
    if chunk is None:
        raise DiffRwkvError(
            "WKV backend 'fla' needs flash-linear-attention on a CUDA machine (pip install 'diffrwkv[gpu]')"
        )
    if not r.is_cuda:
        raise DiffRwkvError("WKV backend 'fla' runs on CUDA tensors only; use backend 'reference' on the CPU")
    # fla needs one dtype for all operands (under autocast r/k/v/a/b are bf16 while our log decay w is fp32);
    # its own RWKV-7 layer feeds w in the activation dtype too. Gradients flow through fla's backward kernels;
    # the state stays fp32.
    dtype = r.dtype
    w, k, v, a, b = (x.to(dtype) for x in (w, k, v, a, b))
    o, S = chunk(
        r=r,
        w=w,
        k=k,
        v=v,
        a=a,
        b=b,
        scale=1.0,
        initial_state=state.float() if state is not None else None,
        output_final_state=True,
    )
    return o, S


@register_backend("triton")
def wkv7_triton(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our sequential Triton kernels (:mod:`.wkv7_triton`, imported on first use); same contract as
    :func:`wkv7_reference`."""
    if importlib.util.find_spec("triton") is None:
        raise DiffRwkvError("WKV backend 'triton' needs the triton package on a CUDA machine (pip install triton)")
    from rwkv_diffusion_rnn.models.wkv7_triton import wkv7_triton as run

    return run(r, w, k, v, a, b, state)


@register_backend("cuda")
def wkv7_cuda(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    keep_states: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our CUDA kernels (:mod:`.wkv7_cuda`, imported on first use; head size 64, no initial state); otherwise the
    contract of :func:`wkv7_reference` (``keep_states``: :func:`wkv7`)."""
    from rwkv_diffusion_rnn.models.wkv7_cuda import wkv7_cuda as run

    return run(r, w, k, v, a, b, state, keep_states=keep_states)


@torch.compiler.disable  # under training.compile (the whole model traced): a graph break, never a traced import
def resolve_backend(name: str | None, device: torch.device) -> str:
    if not name or name == "auto":  # "auto" (the config's default) defers to the environment variable too
        name = os.environ.get("DIFFRWKV_WKV_BACKEND") or "auto"
    if name == "auto":
        if device.type != "cuda":
            return "reference"
        return "cuda" if cuda_kernel_builds() else "fla" if _fla_chunk() is not None else "reference"
    if name not in BACKENDS:
        raise DiffRwkvError(f"unknown WKV backend '{name}'; expected one of: auto, {', '.join(BACKENDS)}")
    return name


@torch.compiler.disable  # never traced: fla's Triton kernels and the reference's time loop run as they are
def wkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    backend: str | None = None,
    keep_states: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to a backend (see module docstring). Shapes as in :func:`wkv7_reference`.

    ``keep_states`` (backend ``cuda`` only; the others keep what their backward needs): True keeps the forward's
    states for the backward (~150 MiB a layer at 0.4B, B16 T512), False rebuilds them in the backward with a second
    forward, None follows ``DIFFRWKV_WKV_CUDA_RECOMPUTE`` (keep unless it is 1). See :func:`set_wkv_keep_states`
    for a model's layers."""
    name = resolve_backend(backend, r.device)
    if name == "cuda" and (state is not None or r.shape[-1] != 64):
        name = stateful_fallback(r.device)
    if name == "cuda" and keep_states is not None:
        return BACKENDS[name](r, w, k, v, a, b, state, keep_states=keep_states)
    return BACKENDS[name](r, w, k, v, a, b, state)


@lru_cache(maxsize=1)
def cuda_kernel_builds() -> bool:
    """Whether backend ``cuda`` can run here: a CUDA build of torch with a GPU, nvcc and ninja, and the kernel
    builds (the first call builds it, under a minute, or loads the build folder's copy). A failed build warns once and
    ``auto`` takes the next backend."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    if torch.cuda.get_device_capability() < (8, 0):  # older GPUs keep fla: native bf16 arithmetic starts at Ampere
        return False
    from rwkv_diffusion_rnn.models import wkv7_cuda

    try:
        wkv7_cuda.extension()
    except Exception as exc:  # no toolkit, no ninja, a compiler error: auto falls back, with one line saying why
        import warnings

        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        warnings.warn(f"WKV backend 'auto': our CUDA kernel is unavailable here ({first}); using the next backend",
                      stacklevel=2)  # fmt: skip
        return False
    return True


def stateful_fallback(device: torch.device) -> str:
    """The backend that runs a call ``cuda`` does not take (an initial state, as the samplers pass; another head
    size): on CUDA ``fla`` when it imports (what ``auto`` ran such calls on before it picked ``cuda``), else
    ``triton`` when triton imports, else ``reference``."""
    if device.type != "cuda":
        return "reference"
    if _fla_chunk() is not None:
        return "fla"
    return "triton" if importlib.util.find_spec("triton") is not None else "reference"
