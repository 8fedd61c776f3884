"""Our own CUDA kernels for the WKV-7 recurrence (backend ``cuda`` of :mod:`rwkv_diffusion_rnn.models.wkv7`).

Same contract as the ``triton`` backend for training: operands ``[B, T, H, 64]`` (head size 64 only), ``w`` the log
decay, ``S[k, v]`` state, output in ``r``'s dtype and the fp32 final state (differentiable: its gradient seeds the
backward). No initial state: one given raises :class:`DiffRwkvError` (use ``triton`` or ``reference``). With ``r``
in bf16 the kernel runs on bf16 operands (k, v, a, b rounded to bf16, ``w`` kept in fp32); otherwise in fp32
(:func:`kernel_dtypes`).

The kernels (``csrc/wkv7_cuda.cu``, design and gradient formulas in its header; torch glue in ``wkv7_cuda.cpp``)
are built with :func:`torch.utils.cpp_extension.load` on first use, for the current GPU's architecture, into
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); they need nvcc (the CUDA toolkit) and ninja.
Importing this module builds nothing; it registers the operators ``torch.ops.diffrwkv.wkv7_cuda_fwd`` / ``_bwd``
(torch.library custom operators with fake implementations and an autograd formula), so ``torch.compile`` can trace a
call and a CUDA graph can capture one. The model reaches this backend through
:func:`~rwkv_diffusion_rnn.models.wkv7.wkv7`, which sends a call with an initial state to another backend.

The backward needs ``sa_t = S_{t-1}^T a_t`` (fp32 ``[B, T, H, 64]``) and the state after every 16th step (fp32
``[B, H, ceil(T / 16), 64, 64]``, 1 KiB a step per head). By default the forward keeps them; with
``CudaWKVConfig.recompute`` (or a layer's ``keep_states=False``) it keeps neither and the backward runs the forward
again to rebuild them for its own layer.

The kernels stage the step vectors of 8 steps at a time, double-buffered, the next tile's loads in flight while the
current one computes (design in ``csrc/wkv7_cuda.cu``); measured against the designs they replaced, 1.008 / 0.940 ms
fwd + bwd at 16x512x12x64 / 16x512x16x64 against 1.087 / 1.122 for staging 16 steps and waiting for the loads
(H100, 2026-12-06; docs/RESULTS.md, "WKV-7 in the training step"). ``bench/wkv_shootout.py`` times them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.utils.flop_counter import register_flop_formula

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.models.kept import kept

HEAD = 64
CHUNK = 16  # steps between checkpoints (fixed in the kernel)


@dataclass
class CudaWKVConfig:
    """Threads per row (or column) of a head's 64 x 64 state: 1, 2 or 4 (the kernels' ``split``), for the forward
    and the backward. More threads put more warps on each SM; fewer spend fewer shuffles.
    ``bench/wkv_shootout.py`` times the alternatives.

    ``recompute``: the forward keeps nothing for the backward beyond the operands autograd keeps anyway, and the
    backward runs the forward again to rebuild ``sa`` and the checkpoints of its own layer (one more forward launch
    a layer) instead of holding every layer's (fp32: 1 KiB a step per head plus ``sa``, ~3.5 GiB over 24 layers at
    the 0.4B shape, B16 T512). Off by default (``DIFFRWKV_WKV_CUDA_RECOMPUTE=1`` turns it on; per layer:
    :func:`~rwkv_diffusion_rnn.models.rwkv7.set_wkv_keep_states`): in one process on an H100 (2026-12-06) keeping
    them ran the 0.1B / 0.4B step in 44.9 / 99.1 ms of kernels against 48.2 / 105.7 rebuilding, for a peak of
    6.9 / 17.5 GiB against 5.6 / 14.0."""

    fwd_split: int = 2
    bwd_split: int = 2
    recompute: bool = os.environ.get("DIFFRWKV_WKV_CUDA_RECOMPUTE", "0") == "1"


CONFIG = CudaWKVConfig()
SOURCES = tuple(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", f) for f in ("wkv7_cuda.cu", "wkv7_cuda.cpp")
)


def _cuda_home() -> str | None:
    """A CUDA toolkit folder holding bin/nvcc: CUDA_HOME / torch's guess, else /usr/local/cuda, else above nvcc."""
    from torch.utils import cpp_extension as ce

    on_path = shutil.which("nvcc")
    above = os.path.dirname(os.path.dirname(os.path.realpath(on_path))) if on_path else None
    for cand in (os.environ.get("CUDA_HOME"), ce.CUDA_HOME, "/usr/local/cuda", above):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


def build_kwargs() -> dict:
    """The arguments of :func:`torch.utils.cpp_extension.load` for this GPU. Raises DiffRwkvError when the
    toolchain is missing."""
    from torch.utils import cpp_extension as ce

    if not torch.cuda.is_available() or torch.version.cuda is None:
        raise DiffRwkvError("WKV backend 'cuda' needs a CUDA build of torch and a GPU")
    home = _cuda_home()
    if home is None:
        raise DiffRwkvError(
            "WKV backend 'cuda' needs nvcc to build its kernel: install the CUDA toolkit or set CUDA_HOME"
        )
    if not ce.is_ninja_available():
        raise DiffRwkvError("WKV backend 'cuda' needs ninja to build its kernel (pip install ninja)")
    os.environ["CUDA_HOME"] = ce.CUDA_HOME = home
    major, minor = torch.cuda.get_device_capability()
    return {
        "name": f"diffrwkv_wkv7_cuda_sm{major}{minor}",
        "sources": list(SOURCES),
        # --split-compile: the kernels' instantiations optimise in parallel (a build of seconds, not a minute)
        "extra_cuda_cflags": ["-O3", "--use_fast_math", f"-arch=sm_{major}{minor}", "--split-compile=0"],
        "extra_cflags": ["-O3"],
        "is_python_module": False,  # the .cpp registers torch.ops.diffrwkv_wkv7.*
    }


@lru_cache(maxsize=1)
def extension():
    """The compiled operators, ``torch.ops.diffrwkv_wkv7`` (built on the first call, then loaded from the build
    folder)."""
    import sys
    import threading

    from torch.utils import cpp_extension as ce

    kwargs = build_kwargs()
    # a load that takes more than a moment is a build (first use, or new sources): say so instead of going quiet
    msg = f"WKV-7 CUDA kernel: building {kwargs['name']} (first use, under a minute; kept in TORCH_EXTENSIONS_DIR)"
    note = threading.Timer(3.0, lambda: print(msg, file=sys.stderr, flush=True))
    note.daemon = True
    note.start()
    try:
        ce.load(**kwargs, verbose=False)
    finally:
        note.cancel()
    return torch.ops.diffrwkv_wkv7


# The kernels as torch.library custom operators, functional (each allocates its outputs): torch.compile traces them
# through their fake implementations (shapes and dtypes only) and CUDA-graph capture records them like any ATen op
# (no host sync; allocations come from the capture's pool). The launches themselves go through ``extension()``.


@torch.library.custom_op("diffrwkv::wkv7_cuda_fwd", mutates_args=())
def wkv7_cuda_fwd(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, save: bool,
    split: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Forward launch: ``o`` (r's dtype), the fp32 final state ``[B, H, 64, 64]``, and for the backward (``save``)
    ``sa`` (fp32 ``[B, T, H, 64]``) and the chunk checkpoints (fp32 ``[B, H, ceil(T / 16), 64, 64]``); without
    ``save`` an empty ``sa`` and one checkpoint slot."""
    o, sa, ckpt = _fwd_buffers(r, save)
    extension().forward(r, w, k, v, a, b, o, sa, ckpt, save, split)
    # the final state, a copy: an operator's outputs may not alias each other
    return o, ckpt[:, :, -1].clone(memory_format=torch.contiguous_format), sa, ckpt


@wkv7_cuda_fwd.register_fake
def _(r, w, k, v, a, b, save, split):
    o, sa, ckpt = _fwd_buffers(r, save)
    return o, ckpt[:, :, -1].clone(memory_format=torch.contiguous_format), sa, ckpt


def _fwd_buffers(r: torch.Tensor, save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, H, N = r.shape
    nc = (T + CHUNK - 1) // CHUNK if save else 1
    f32 = {"device": r.device, "dtype": torch.float32}
    sa = torch.empty(B, T, H, N, **f32) if save else torch.empty(0, **f32)
    return torch.empty_like(r, memory_format=torch.contiguous_format), sa, torch.empty(B, H, nc, N, N, **f32)


@torch.library.custom_op("diffrwkv::wkv7_cuda_bwd", mutates_args=())
def wkv7_cuda_bwd(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    do: torch.Tensor, sa: torch.Tensor, ckpt: torch.Tensor, dht: torch.Tensor, split: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Backward launch: the gradients of r, w, k, v, a, b (each in its operand's dtype). ``dht``: the fp32 gradient
    of the final state, or an empty tensor for none."""
    grads = tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (r, w, k, v, a, b))
    extension().backward(r, w, k, v, a, b, do, sa, ckpt, dht, *grads, split)
    return grads


@wkv7_cuda_bwd.register_fake
def _(r, w, k, v, a, b, do, sa, ckpt, dht, split):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (r, w, k, v, a, b))


def _setup_context(ctx, inputs, output) -> None:
    r, w, k, v, a, b, _save, _split = inputs
    _o, _ht, sa, ckpt = output
    ctx.save_for_backward(r, w, k, v, a, b, sa, ckpt)
    ctx.mark_non_differentiable(sa, ckpt)
    # outputs without a gradient reach the backward as None, not as zero tensors: autograd would otherwise fill a
    # zero "gradient" for sa and the checkpoints (128 MiB a layer at 0.1B) and for an unused final state every step
    ctx.set_materialize_grads(False)
    ctx.split = CONFIG.bwd_split


def _backward(ctx, do, dht, _dsa, _dckpt):
    r, w, k, v, a, b, sa, ckpt = ctx.saved_tensors
    if sa.numel() == 0:  # a forward that saved nothing (CONFIG.recompute): rebuild this layer's sa and checkpoints
        _, _, sa, ckpt = wkv7_cuda_fwd(r, w, k, v, a, b, True, CONFIG.fwd_split)
    do = torch.zeros_like(r) if do is None else do.to(r.dtype).contiguous()
    dht = dht.float().contiguous() if dht is not None else r.new_empty(0, dtype=torch.float32)
    return (*wkv7_cuda_bwd(r, w, k, v, a, b, do, sa, ckpt, dht, ctx.split), None, None)


wkv7_cuda_fwd.register_autograd(_backward, setup_context=_setup_context)


# FLOPs a launch does (multiply-adds counted as two), for torch's FLOP counter; the partitioner of a compiled block
# also weighs what to recompute by them (an operator without a formula counts as free). The formula alone does not
# keep a traced kernel out of the recomputation under a memory budget (models/kept.py does). Per step and head
# of size N the forward does sa = S a (2 N^2), S' = S diag(w) + sa b^T + v k^T (5 N^2) and o = S' r (2 N^2); the
# backward runs the transposed products of each and the state's own gradient, about twice that.
FWD_FLOPS_PER_STATE_ENTRY = 9
BWD_FLOPS_PER_STATE_ENTRY = 18


@register_flop_formula(torch.ops.diffrwkv.wkv7_cuda_fwd)
def _fwd_flops(r_shape, *_args, **_kwargs) -> int:
    B, T, H, N = r_shape
    return FWD_FLOPS_PER_STATE_ENTRY * B * T * H * N * N


@register_flop_formula(torch.ops.diffrwkv.wkv7_cuda_bwd)
def _bwd_flops(r_shape, *_args, **_kwargs) -> int:
    B, T, H, N = r_shape
    return BWD_FLOPS_PER_STATE_ENTRY * B * T * H * N * N


def keeps_states(keep_states: bool | None) -> bool:
    """Whether a forward saves ``sa`` and the checkpoints for its backward: ``keep_states`` where given (the layer's
    setting, :func:`~rwkv_diffusion_rnn.models.rwkv7.set_wkv_keep_states`), else not ``CONFIG.recompute``."""
    return not CONFIG.recompute if keep_states is None else bool(keep_states)


def kernel_dtypes(r_dtype: torch.dtype, w_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """The kernel's operand dtype and its ``w`` dtype: with ``r`` in bf16 (the model under bf16 autocast, where
    k, v, a, b come out of fp32 elementwise work) the bf16 kernel, k, v, a, b rounded to bf16 as fla rounds them,
    ``w`` kept in fp32 (or bf16 where it is); otherwise everything in fp32."""
    if r_dtype == torch.bfloat16:
        return torch.bfloat16, w_dtype if w_dtype in (torch.bfloat16, torch.float32) else torch.float32
    return torch.float32, torch.float32


#: Run the kernel inside a compiled block, traced like any operator, instead of behind a graph break: the casts
#: before it and the sums of its operands' two gradients (each of k, v, r also feeds the bonus term) then fuse into
#: the block's own kernels, and a block is one graph each way. On by default; ``DIFFRWKV_WKV_IN_GRAPH=0`` puts the
#: graph break back. On an H100 (2026-12-06): 3.7 ms less compiled elementwise work and 1.1 ms fewer eager sums in
#: the 0.4B step (fp32 stream), and, with the bf16 stream and Inductor's mix-order reduction, 95.1 -> 93.7 ms of
#: kernels and a peak of 17.0 -> 12.7 GiB, the forward kernel running once a layer (models/kept.py;
#: docs/RESULTS.md, 12:08 and 17:24 UTC).
IN_GRAPH = os.environ.get("DIFFRWKV_WKV_IN_GRAPH", "1") == "1"


def wkv7_cuda_in_graph(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    keep_states: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`wkv7_cuda` for a call the caller has checked (operands ``[B, T, H, 64]`` on one CUDA device, no
    initial state, T > 0), written so that ``torch.compile`` traces it into the surrounding graph (:data:`IN_GRAPH`).
    The same operator, the same casts and the same saved states as :func:`wkv7_cuda`."""
    kernel_dtype, w_dtype = kernel_dtypes(r.dtype, w.dtype)
    ops = [x.to(kernel_dtype).contiguous() for x in (r, k, v, a, b)]
    # without ``save`` (no gradient wanted, or the backward rebuilds them) the forward writes the output and final
    # state only
    save = torch.is_grad_enabled() and any(x.requires_grad for x in (r, w, k, v, a, b)) and keeps_states(keep_states)
    w = w.to(w_dtype).contiguous()
    if save:
        # traced into a compiled block, the partitioner must keep what the launch returns, or under a memory budget
        # it re-runs the forward kernel in the backward to drop the states kept (models/kept.py)
        o, ht = kept(_launch, ops[0], w, *ops[1:], ops=(torch.ops.diffrwkv.wkv7_cuda_fwd.default,))
    else:
        o, ht = _launch(ops[0], w, *ops[1:], save)
    return o.to(r.dtype), ht


def _launch(r, w, k, v, a, b, save: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    o, ht, _, _ = wkv7_cuda_fwd(r, w, k, v, a, b, save, CONFIG.fwd_split)
    return o, ht


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
    """CUDA WKV-7 (head size 64, no initial state); otherwise the contract of
    :func:`~rwkv_diffusion_rnn.models.wkv7.wkv7_reference`. ``keep_states``: True saves ``sa`` and the checkpoints
    for the backward, False rebuilds them there, None follows ``CONFIG.recompute``."""
    if state is not None:
        raise DiffRwkvError("WKV backend 'cuda' takes no initial state; use backend 'triton' or 'reference'")
    if not r.is_cuda:
        raise DiffRwkvError("WKV backend 'cuda' runs on CUDA tensors only; use backend 'reference' on the CPU")
    if r.dim() != 4 or r.shape[-1] != HEAD:
        raise DiffRwkvError(f"WKV backend 'cuda' needs operands [B, T, H, {HEAD}], got {tuple(r.shape)}")
    B, T, H, N = r.shape
    for name, x in zip("wkvab", (w, k, v, a, b), strict=True):
        if x.shape != r.shape:
            raise DiffRwkvError(f"WKV operand {name} has shape {tuple(x.shape)}, expected {tuple(r.shape)}")
        if x.device != r.device:
            raise DiffRwkvError(f"WKV operand {name} is on {x.device}, r on {r.device}")
    if T == 0:
        return r.new_zeros(B, 0, H, N), r.new_zeros(B, H, N, N, dtype=torch.float32)
    return wkv7_cuda_in_graph(r, w, k, v, a, b, keep_states)
