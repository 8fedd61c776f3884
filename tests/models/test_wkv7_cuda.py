"""Our CUDA WKV-7 kernels (rwkv_diffusion_rnn/models/csrc/wkv7_cuda.cu, wrapper models/wkv7_cuda.py).

Without a GPU: a PyTorch emulation of the kernels' algorithm (the same chunk checkpoints, the backward's step
undoing, its two copies of the state gradient and the same per-step formulas) against autograd of the reference
recurrence, which catches formula mistakes; the kernels' own code compiled as host C++ (wkv7_cuda_host.cpp: threads,
barriers and shuffles stood in for) against the same truth, which catches indexing and synchronisation mistakes;
the wrapper's refusals; the ``.cu`` compiling with nvcc when there is one. With a GPU: the built kernels against the
recurrence in fp64.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.models import wkv7_cuda as wc
from rwkv_diffusion_rnn.models.wkv7 import BACKENDS, stateful_fallback, wkv7, wkv7_reference

DECAY_FLOOR = -0.6065306597126334  # RWKV-7's log decay lies in [-exp(-0.5), 0)
C = wc.CHUNK


def make_inputs(B, T, H, N, seed, floor_decay=False, dtype=torch.float64):
    """RWKV-7-like operands: decays exp(w) in (0.545, 1), kk unit-norm, a = -kk, b = kk * sigmoid(.)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(scale=1.0):
        return torch.randn(B, T, H, N, generator=g, dtype=torch.float64) * scale

    r, k, v = rnd(0.5), rnd(0.5), rnd()
    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    w = torch.full((B, T, H, N), DECAY_FLOOR, dtype=torch.float64) if floor_decay else DECAY_FLOOR * rnd().sigmoid()
    a, b = -kk, kk * rnd().sigmoid()
    return [x.to(dtype) for x in (r, w, k, v, a, b)]


# ---------------------------------------------------------------- the kernels' algorithm in PyTorch


def emulate_forward(r, w, k, v, a, b):
    """Column j of S per thread: sa_t, S_t, o_t; saves sa and the state after each chunk's last step."""
    B, T, H, N = r.shape
    d = torch.exp(w)
    S = r.new_zeros(B, H, N, N)  # S[k, v]
    o, sa, ckpt = torch.empty_like(r), torch.empty_like(r), []
    for t0 in range(0, T, C):
        for t in range(t0, min(T, t0 + C)):
            sa_t = torch.einsum("bhi,bhij->bhj", a[:, t], S)
            S = (
                d[:, t, :, :, None] * S
                + b[:, t, :, :, None] * sa_t[:, :, None, :]
                + k[:, t, :, :, None] * v[:, t, :, None, :]
            )
            o[:, t] = torch.einsum("bhi,bhij->bhj", r[:, t], S)
            sa[:, t] = sa_t
        ckpt.append(S)
    return o, sa, torch.stack(ckpt, dim=2)


def emulate_backward(r, w, k, v, a, b, do, sa, ckpt, dht=None):
    """Thread i holds the row S[i, :], the row G[i, :] and the column G[:, i] (``Gc[i, k] = G[k, i]``); walks the
    chunks backwards from their checkpoints, undoing each step."""
    B, T, H, N = r.shape
    d = torch.exp(w)
    G = dht.clone() if dht is not None else r.new_zeros(B, H, N, N)
    Gc = G.transpose(-1, -2).clone()
    grads = [torch.empty_like(r) for _ in range(6)]  # dr, dw, dk, dv, da, db
    for c in reversed(range(ckpt.shape[2])):
        S = ckpt[:, :, c].clone()
        for t in reversed(range(c * C, min(T, (c + 1) * C))):
            rt, dt, kt, vt, at, bt, dot, sat = (x[:, t] for x in (r, d, k, v, a, b, do, sa))
            col = (lambda x: x[..., :, None]), (lambda x: x[..., None, :])  # per row i, per column j
            G = G + col[0](rt) * col[1](dot)
            dr = (S * col[1](dot)).sum(-1)
            S = (S - col[0](kt) * col[1](vt) - col[0](bt) * col[1](sat)) * col[0](1.0 / dt)  # S_{t-1}
            dk, db, dd = (G * col[1](vt)).sum(-1), (G * col[1](sat)).sum(-1), (G * S).sum(-1)
            Gc = Gc + col[1](rt) * col[0](dot)  # Gc[i, k] += r[k] do[i]
            dv, dsa = (Gc * col[1](kt)).sum(-1), (Gc * col[1](bt)).sum(-1)
            da = (S * col[1](dsa)).sum(-1)
            G = col[0](dt) * G + col[0](at) * col[1](dsa)
            Gc = col[1](dt) * Gc + col[1](at) * col[0](dsa)
            for g, x in zip(grads, (dr, dd * dt, dk, dv, da, db), strict=True):
                g[:, t] = x
    return grads, G, Gc


def rel(x, ref):
    """Relative norm error; absolute where the truth is zero (dw and da of a single step from a zero state)."""
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-6)).item()


@pytest.mark.parametrize(
    ("T", "floor", "dtype", "with_dht", "bound"),
    [
        (37, False, torch.float64, True, 1e-10),  # partial last chunk, loss on the output and the final state
        (16, False, torch.float64, False, 1e-10),  # one whole chunk
        (1, False, torch.float64, True, 1e-10),  # a single step
        (48, False, torch.float32, True, 1e-4),  # fp32, as the kernels compute
        (40, True, torch.float32, True, 2e-3),  # every decay at the floor: the largest amplification of the undoing
    ],
)
def test_emulated_algorithm_matches_autograd(T, floor, dtype, with_dht, bound):
    B, H, N = 2, 2, 16
    xs = make_inputs(B, T, H, N, seed=T, floor_decay=floor)
    g = torch.Generator().manual_seed(100 + T)
    go = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    gs = torch.randn(B, H, N, N, generator=g, dtype=torch.float64) if with_dht else None

    leaves = [x.clone().requires_grad_() for x in xs]
    o_ref, S_ref = wkv7_reference(*leaves, compute_dtype=torch.float64)
    loss = (o_ref * go).sum() + ((S_ref * gs).sum() if with_dht else 0.0)
    loss.backward()

    ops = [x.to(dtype) for x in xs]
    o, sa, ckpt = emulate_forward(*ops)
    assert ckpt.shape[2] == -(-T // C)
    assert rel(o, o_ref) < bound and rel(ckpt[:, :, -1], S_ref) < bound
    grads, G0, Gc0 = emulate_backward(*ops, go.to(dtype), sa, ckpt, gs.to(dtype) if with_dht else None)
    assert rel(Gc0.transpose(-1, -2), G0) < bound  # the two copies of the state gradient agree
    for name, got, leaf in zip(("dr", "dw", "dk", "dv", "da", "db"), grads, leaves, strict=True):
        assert rel(got, leaf.grad) < bound, (name, rel(got, leaf.grad))


# ---------------------------------------------------------------- the kernels' code on the host


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++ (C++20) to compile the kernels for the host")
    out = tmp_path_factory.mktemp("wkv7_host") / "wkv7_host.so"
    src = Path(__file__).with_name("wkv7_cuda_host.cpp")
    cmd = [cxx, "-std=c++20", "-O0", "-fno-strict-aliasing", "-shared", "-fPIC", "-pthread"]
    res = subprocess.run([*cmd, f"-I{Path(wc.SOURCES[0]).parent}", str(src), "-o", str(out)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return ctypes.CDLL(str(out))


def host_run(lib, xs, do, dht, split, save=True):
    """Forward and backward through the host build, allocated as wkv7_cuda.py does; returns o, ht, grads and what
    the forward saved (sa, the checkpoints). Without ``save`` the forward keeps only the final state (slot 0); without
    ``save`` or ``do`` no backward runs (grads None)."""
    r, w, k, v, a, b = xs
    B, T, H, N = r.shape
    nc = -(-T // C) if save else 1
    codes = {torch.float32: 0, torch.bfloat16: 1}
    o = torch.empty_like(r)
    sa = torch.full((B, T, H, N), float("nan"), dtype=torch.float32)
    ckpt = torch.empty(B, H, nc, N, N, dtype=torch.float32)
    ptr = ctypes.c_void_p

    def p(x):
        return ptr(x.data_ptr()) if x is not None else ptr(0)

    dims = (codes[r.dtype], codes[w.dtype], split, B, T, H)
    assert lib.host_forward(*dims, *map(p, xs), p(o), p(sa) if save else p(None), p(ckpt), int(save)) == 0
    if not save or do is None:
        return o, ckpt[:, :, -1], None, (sa, ckpt)
    grads = [torch.empty_like(x) for x in xs]
    assert lib.host_backward(*dims, *map(p, xs), p(do), p(sa), p(ckpt), p(dht), *map(p, grads)) == 0
    return o, ckpt[:, :, -1], grads, (sa, ckpt)


@pytest.mark.parametrize(
    ("T", "dtype", "w_dtype", "split", "with_dht"),
    [
        (37, torch.float32, torch.float32, 1, True),  # partial last chunk (and tile), a final-state gradient
        (37, torch.float32, torch.float32, 2, False),
        (21, torch.float32, torch.float32, 4, True),
        (20, torch.bfloat16, torch.float32, 2, False),  # the model's mix: bf16 activations, fp32 log decay
        (17, torch.bfloat16, torch.bfloat16, 1, True),  # the shoot-out's timing inputs: all bf16
        (8, torch.float32, torch.float32, 2, True),  # one tile, part of a chunk
    ],
)
def test_kernel_code_on_host_matches_autograd(host_lib, T, dtype, w_dtype, split, with_dht):
    B, H, N = 1, 2, 64
    xs = make_inputs(B, T, H, N, seed=50 + T)
    xs = [x.to(w_dtype if i == 1 else dtype) for i, x in enumerate(xs)]  # the kernel's inputs, rounded
    g = torch.Generator().manual_seed(200 + T)
    go = torch.randn(B, T, H, N, generator=g).to(dtype)
    gs = torch.randn(B, H, N, N, generator=g) if with_dht else None

    leaves = [x.double().requires_grad_() for x in xs]
    o_ref, S_ref = wkv7_reference(*leaves, compute_dtype=torch.float64)
    ((o_ref * go.double()).sum() + ((S_ref * gs.double()).sum() if with_dht else 0.0)).backward()

    o, ht, grads, _ = host_run(host_lib, xs, go, gs, split)
    bound = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert rel(o, o_ref) < bound and rel(ht, S_ref) < 1e-4
    for name, got, x, leaf in zip(("dr", "dw", "dk", "dv", "da", "db"), grads, xs, leaves, strict=True):
        assert got.dtype == x.dtype
        assert rel(got, leaf.grad) < bound, (name, rel(got, leaf.grad))


@pytest.mark.parametrize("split", [1, 2, 4])
def test_kernel_saves_what_the_algorithm_saves(host_lib, split):
    """The forward's saved sa_t and chunk-end states are the emulation's (which the backward's formulas assume), over
    a partial last tile and chunk; without ``save`` it writes the same output, nothing into sa, and only the final
    state."""
    B, T, H, N = 2, 35, 2, 64
    xs = make_inputs(B, T, H, N, seed=70, dtype=torch.float32)
    o_em, sa_em, ckpt_em = emulate_forward(*(x.double() for x in xs))
    o, ht, _, (sa, ckpt) = host_run(host_lib, xs, None, None, split)
    assert ckpt.shape == ckpt_em.shape
    assert rel(o, o_em) < 1e-5 and rel(sa, sa_em) < 1e-5 and rel(ckpt, ckpt_em) < 1e-5
    o2, ht2, _, (sa2, ckpt2) = host_run(host_lib, xs, None, None, split, save=False)
    assert ckpt2.shape[2] == 1 and torch.equal(o2, o) and torch.equal(ht2, ht) and sa2.isnan().all()


# ---------------------------------------------------------------- the wrapper, without a GPU


def test_registered_and_importable_without_building():
    assert "cuda" in BACKENDS
    assert wc.extension.cache_info().currsize == 0  # importing built nothing
    assert all(p.endswith((".cu", ".cpp")) for p in wc.SOURCES)


def test_refusals_are_one_line():
    xs = make_inputs(1, 4, 1, 64, seed=0, dtype=torch.float32)
    with pytest.raises(DiffRwkvError, match="no initial state"):
        wc.wkv7_cuda(*xs, torch.zeros(1, 1, 64, 64))
    with pytest.raises(DiffRwkvError, match="CUDA tensors only"):
        wkv7(*xs, backend="cuda")


def test_a_call_with_a_state_goes_to_another_backend():
    """The samplers' recurrent cache hands an initial state: through the dispatch, backend ``cuda`` runs it on the
    fallback (here on the CPU: the reference) instead of refusing."""
    xs = make_inputs(1, 5, 2, 64, seed=3, dtype=torch.float32)
    state = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(4))
    assert stateful_fallback(torch.device("cpu")) == "reference"
    o, S = wkv7(*xs, state, backend="cuda")
    o_ref, S_ref = wkv7_reference(*xs, state)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)


def test_kernel_dtypes_follow_r():
    """Under bf16 autocast the model hands r (and sometimes v) in bf16, w/k/a/b in fp32: the bf16 kernel runs, w
    stays fp32; an fp32 (or fp16) r runs the fp32 kernel."""
    bf16, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    assert wc.kernel_dtypes(bf16, f32) == (bf16, f32)
    assert wc.kernel_dtypes(bf16, bf16) == (bf16, bf16)
    assert wc.kernel_dtypes(bf16, f16) == (bf16, f32)
    assert wc.kernel_dtypes(f32, bf16) == (f32, f32)
    assert wc.kernel_dtypes(f16, f16) == (f32, f32)


# ---------------------------------------------------------------- the custom operators, kernels emulated on the CPU


class EmulatedKernels:
    """Stands in for ``extension()``: the compiled operators' calls, filled in by the PyTorch emulation above."""

    @staticmethod
    def forward(r, w, k, v, a, b, o, sa, ckpt, save, split):
        o_, sa_, ckpt_ = emulate_forward(*(x.double() for x in (r, w, k, v, a, b)))
        o.copy_(o_)
        ckpt.copy_(ckpt_ if save else ckpt_[:, :, -1:])
        if save:
            sa.copy_(sa_)

    @staticmethod
    def backward(r, w, k, v, a, b, do, sa, ckpt, dht, dr, dw, dk, dv, da, db, split):
        xs = (x.double() for x in (r, w, k, v, a, b, do, sa, ckpt))
        grads, _, _ = emulate_backward(*xs, dht.double() if dht.numel() else None)
        for out, g in zip((dr, dw, dk, dv, da, db), grads, strict=True):
            out.copy_(g)


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(wc, "extension", lambda: EmulatedKernels)


@pytest.mark.parametrize(("T", "save", "dtype"), [(37, True, torch.bfloat16), (16, False, torch.float32)])
def test_fake_implementation_gives_the_kernels_shapes_and_dtypes(T, save, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, H, N = 2, 3, 64
    with FakeTensorMode():
        xs = [torch.empty(B, T, H, N, dtype=torch.float32 if i == 1 else dtype) for i in range(6)]
        o, ht, sa, ckpt = torch.ops.diffrwkv.wkv7_cuda_fwd(*xs, save, 2)
        grads = torch.ops.diffrwkv.wkv7_cuda_bwd(*xs, o, sa, ckpt, ht, 2)
    assert (o.shape, o.dtype) == ((B, T, H, N), dtype)
    assert (ht.shape, ht.dtype) == ((B, H, N, N), torch.float32)
    assert sa.shape == ((B, T, H, N) if save else (0,)) and sa.dtype == torch.float32
    assert (ckpt.shape, ckpt.dtype) == ((B, H, -(-T // C) if save else 1, N, N), torch.float32)
    assert [(g.shape, g.dtype) for g in grads] == [(x.shape, x.dtype) for x in xs]


def test_operators_pass_opcheck(emulated):
    """Schema (nothing mutated), fake against real, the autograd registration and AOT dispatch with dynamic shapes."""
    xs = [x.requires_grad_() for x in make_inputs(1, 18, 1, 64, seed=8, dtype=torch.float32)]
    torch.library.opcheck(torch.ops.diffrwkv.wkv7_cuda_fwd.default, (*xs, True, 2))
    with torch.no_grad():
        o, ht, sa, ckpt = torch.ops.diffrwkv.wkv7_cuda_fwd(*xs, True, 2)
    args = (*(x.detach() for x in xs), torch.ones_like(o), sa, ckpt, torch.zeros_like(ht), 2)
    torch.library.opcheck(torch.ops.diffrwkv.wkv7_cuda_bwd.default, args)


def test_operators_compile_in_one_graph_with_the_reference_gradients(emulated):
    """torch.compile traces a function around the forward operator without a graph break (fullgraph), and the
    compiled forward and backward give the reference recurrence's output, final state and gradients."""
    B, T, H, N = 1, 21, 2, 64
    xs = make_inputs(B, T, H, N, seed=11, dtype=torch.float32)
    g = torch.Generator().manual_seed(12)
    go, gs = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)

    def step(r, w, k, v, a, b):
        o, ht, _, _ = torch.ops.diffrwkv.wkv7_cuda_fwd(r * 1.0, w, k, v, a, b, True, 2)
        return (o * go).sum() + (ht * gs).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in xs]
    compiled(*leaves).backward()
    ref_leaves = [x.double().requires_grad_() for x in xs]
    o_ref, S_ref = wkv7_reference(*ref_leaves, compute_dtype=torch.float64)
    ((o_ref * go.double()).sum() + (S_ref * gs.double()).sum()).backward()
    for name, leaf, ref in zip("rwkvab", leaves, ref_leaves, strict=True):
        assert rel(leaf.grad, ref.grad) < 1e-4, (name, rel(leaf.grad, ref.grad))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_kernel_source_compiles(tmp_path):
    cmd = ["nvcc", "-c", "-arch=sm_90", "-O3", "--use_fast_math", "-o", str(tmp_path / "wkv7.o"), wc.SOURCES[0]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


# ---------------------------------------------------------------- the kernels, on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("T", "dtype", "w_dtype"), [(37, torch.bfloat16, torch.float32), (48, torch.float32, torch.float32)]
)
def test_kernels_match_reference(T, dtype, w_dtype):
    B, H, N = 2, 3, 64
    xs = [x.cuda() for x in make_inputs(B, T, H, N, seed=T)]
    g = torch.Generator().manual_seed(7)
    go = torch.randn(B, T, H, N, generator=g, dtype=torch.float64).cuda()
    gs = torch.randn(B, H, N, N, generator=g, dtype=torch.float64).cuda()

    ops = [x.to(w_dtype if i == 1 else dtype) for i, x in enumerate(xs)]  # the kernel's inputs

    def run(fn, cast):
        leaves = [x.detach().to(cast or x.dtype).requires_grad_() for x in ops]
        o, S = fn(*leaves)
        ((o.double() * go).sum() + (S.double() * gs).sum()).backward()
        return [o, S, *(x.grad for x in leaves)]

    ref = run(lambda *x: wkv7_reference(*x, compute_dtype=torch.float64), torch.float64)  # same rounded inputs
    got = run(BACKENDS["cuda"], None)
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for name, x, y in zip(("o", "state", "dr", "dw", "dk", "dv", "da", "db"), got, ref, strict=True):
        assert rel(x, y) < bound, (name, rel(x, y))


def test_the_kernel_traced_into_a_compiled_block_trains_like_the_graph_break(emulated, monkeypatch):
    """With IN_GRAPH the time mix calls the kernel (emulated) inside its compiled block (one graph where the graph
    break made two), and the model's loss and gradients, eager or compiled, equal those of the uncompiled model with
    the reference recurrence behind the break."""
    from torch._dynamo.utils import counters

    from rwkv_diffusion_rnn.models import wkv7 as wkv7_mod
    from rwkv_diffusion_rnn.models.rwkv7_compile import compile_blocks
    from tests.conftest import random_rwkv7

    # behind the break (whose entry checks for CUDA tensors) the reference recurrence runs: the ground truth
    monkeypatch.setitem(wkv7_mod.BACKENDS, "cuda", lambda r, w, k, v, a, b, state=None, **kw: wkv7_reference(
        r, w, k, v, a, b, state))  # fmt: skip
    ids = torch.randint(0, 40, (1, 7), generator=torch.Generator().manual_seed(4))
    results, graphs = {}, {}
    for in_graph, compiled in ((False, False), (True, False), (True, True), (False, True)):
        monkeypatch.setattr(wc, "IN_GRAPH", in_graph)
        model = random_rwkv7(2, 128, vocab_size=40, seed=9).train()
        model.wkv_backend = "cuda"
        torch._dynamo.reset()
        counters.clear()
        if compiled:
            compile_blocks(model)
        loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        graphs[in_graph, compiled] = counters["stats"]["unique_graphs"]
        results[in_graph, compiled] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch._dynamo.reset()
    ref_loss, ref_grads = results[False, False]
    for key in ((True, False), (True, True), (False, True)):
        loss, grads = results[key]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=f"{key} {n}")
    assert graphs[True, True] < graphs[False, True], graphs  # the break's second graph per block is gone


def test_the_flop_counter_sees_the_kernels(emulated):
    from torch.utils.flop_counter import FlopCounterMode

    B, T, H, N = 2, 5, 3, wc.HEAD
    ops = [torch.randn(B, T, H, N, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with FlopCounterMode(display=False) as fwd:
        _, _, sa, ckpt = wc.wkv7_cuda_fwd(*ops, True, 1)
    with FlopCounterMode(display=False) as bwd:
        wc.wkv7_cuda_bwd(*ops, torch.randn(B, T, H, N), sa, ckpt, torch.empty(0), 1)
    assert fwd.get_total_flops() == 9 * B * T * H * N * N
    assert bwd.get_total_flops() == 18 * B * T * H * N * N


def test_a_memory_budget_keeps_the_traced_kernel_out_of_the_recomputation(emulated, monkeypatch):
    """Under a memory budget below 1 the partitioner may recompute any unmarked node in the backward; with the kernel
    traced into the block it re-ran the forward kernel of every layer there to drop the states the layer keeps. The
    launch is marked MUST_SAVE: one forward launch per layer, none in the backward, at any budget."""
    import torch._functorch.config as functorch_config

    from rwkv_diffusion_rnn.models.rwkv7_compile import compile_blocks
    from tests.conftest import random_rwkv7

    monkeypatch.setattr(wc, "IN_GRAPH", True)
    launches = []
    forward = EmulatedKernels.forward
    monkeypatch.setattr(EmulatedKernels, "forward", staticmethod(lambda *a: (launches.append(a[9]), forward(*a))))
    ids = torch.randint(0, 40, (2, 64), generator=torch.Generator().manual_seed(4))
    budget = functorch_config.activation_memory_budget
    try:
        for b in (0.5, 0.3):
            launches.clear()
            model = random_rwkv7(2, 128, vocab_size=40, seed=9).train()
            model.wkv_backend = "cuda"
            torch._dynamo.reset()
            compile_blocks(model, memory_budget=b)
            model(ids).float().logsumexp(-1).mean().backward()
            assert launches == [True, True], (b, launches)  # saving the states, once per layer
    finally:
        functorch_config.activation_memory_budget = budget
        torch._dynamo.reset()


def test_padded_grid_rule_and_its_padding_blocks_change_nothing(host_lib):
    """The backward's grid: padded to every resident slot only between one block a SM and one wave (an H100: 132
    SMs, two blocks each); and a launch with padding blocks gives the same gradients, bit for bit, as one without."""
    assert [host_lib.host_padded_grid(bh, 132, 2) for bh in (100, 132, 133, 192, 256, 263, 264, 300, 528)] == [
        100, 132, 264, 264, 264, 264, 264, 300, 528]  # fmt: skip
    assert host_lib.host_padded_grid(192, 132, 1) == 192 and host_lib.host_padded_grid(20, 8, 4) == 32
    B, T, H, N = 1, 19, 2, 64
    xs = [x.float() for x in make_inputs(B, T, H, N, seed=77)]
    go = torch.randn(B, T, H, N, generator=torch.Generator().manual_seed(78))
    _, _, plain, _ = host_run(host_lib, xs, go, None, 2)
    host_lib.host_set_bwd_blocks(5)  # 2 real blocks, 3 that must return at once
    try:
        _, _, padded, _ = host_run(host_lib, xs, go, None, 2)
    finally:
        host_lib.host_set_bwd_blocks(0)
    assert all(torch.equal(a, b) for a, b in zip(padded, plain, strict=True))
