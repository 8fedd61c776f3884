"""Backend choice of the WKV-7 dispatch (models/wkv7.py): what ``auto`` picks, and where ``cuda`` hands a call on."""

from __future__ import annotations

import warnings

import pytest
import torch

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.models import wkv7 as wkv7_mod
from rwkv_diffusion_rnn.models import wkv7_cuda


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    probe = wkv7_mod.cuda_kernel_builds  # the cached probe itself (a test may monkeypatch the name)
    monkeypatch.delenv("DIFFRWKV_WKV_BACKEND", raising=False)
    probe.cache_clear()
    yield
    probe.cache_clear()


def test_auto_prefers_our_cuda_kernel_where_it_builds(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(wkv7_mod, "cuda_kernel_builds", lambda: True)
    assert wkv7_mod.resolve_backend("auto", cuda) == "cuda"
    assert wkv7_mod.resolve_backend(None, cuda) == "cuda"
    assert wkv7_mod.resolve_backend("fla", cuda) == "fla"  # an explicit name wins
    assert wkv7_mod.resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setattr(wkv7_mod, "cuda_kernel_builds", lambda: False)
    monkeypatch.setattr(wkv7_mod, "_fla_chunk", lambda: object())
    assert wkv7_mod.resolve_backend("auto", cuda) == "fla"
    monkeypatch.setattr(wkv7_mod, "_fla_chunk", lambda: None)
    assert wkv7_mod.resolve_backend("auto", cuda) == "reference"


def test_no_cuda_torch_means_no_build_and_no_warning():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine builds the kernel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert wkv7_mod.cuda_kernel_builds() is False


def test_a_failed_build_warns_once_and_auto_falls_back(monkeypatch):
    calls = []

    def no_nvcc():
        calls.append(1)
        raise DiffRwkvError("WKV backend 'cuda' needs nvcc to build its kernel: install the CUDA toolkit\nmore")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(wkv7_cuda, "extension", no_nvcc)
    monkeypatch.setattr(wkv7_mod, "_fla_chunk", lambda: None)
    with pytest.warns(UserWarning, match=r"unavailable here \(WKV backend 'cuda' needs nvcc.*toolkit\)"):
        assert wkv7_mod.resolve_backend("auto", torch.device("cuda")) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # probed once per process: no second build, no second warning
        assert wkv7_mod.resolve_backend("auto", torch.device("cuda")) == "reference"
    assert calls == [1]


def test_cuda_hands_other_head_sizes_on():
    """Head size 32 is not our kernel's: the call runs on the fallback (here the reference) with the same result."""
    g = torch.Generator().manual_seed(0)
    B, T, H, N = 1, 6, 2, 32
    r, k, v, a = (torch.randn(B, T, H, N, generator=g) for _ in range(4))
    w = -torch.rand(B, T, H, N, generator=g) * 0.6
    b = -a * torch.rand(B, T, H, N, generator=g)
    o, S = wkv7_mod.wkv7(r, w, k, v, a, b, backend="cuda")
    o_ref, S_ref = wkv7_mod.wkv7_reference(r, w, k, v, a, b)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)


def test_time_mix_hands_the_cuda_kernel_its_operands_in_the_kernels_dtypes(monkeypatch):
    """Under bf16 autocast the time mix casts k, v, a, b to bf16 itself (inside a compiled block these casts fuse
    into the kernels that make them) and keeps w in fp32: what backend ``cuda`` would do with fp32 operands, so the
    model's output is unchanged. A stand-in for the CUDA kernel records the dtypes and runs the reference on what the
    kernel would compute with."""
    from rwkv_diffusion_rnn.models import wkv7_cuda as wc
    from tests.conftest import random_rwkv7

    seen = []

    def stand_in(r, w, k, v, a, b, state=None):
        seen.append(tuple(x.dtype for x in (r, w, k, v, a, b)))
        kernel_dtype, w_dtype = wc.kernel_dtypes(r.dtype, w.dtype)
        rk, kk, vk, ak, bk = (x.to(kernel_dtype).float() for x in (r, k, v, a, b))
        o, s = wkv7_mod.wkv7_reference(rk, w.to(w_dtype).float(), kk, vk, ak, bk, state)
        return o.to(r.dtype), s

    monkeypatch.setitem(wkv7_mod.BACKENDS, "cuda", stand_in)
    monkeypatch.setattr(wc, "IN_GRAPH", False)  # the call behind the graph break, where the stand-in sits
    model = random_rwkv7(2, 64, vocab_size=120, seed=7).train()
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(8))
    outs = {}
    for cast_in_model in (True, False):
        seen.clear()
        for block in model.blocks:
            block.att.head_size = 64 if cast_in_model else 63  # 63: the model leaves the operands to the kernel
        model.wkv_backend = "cuda"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[cast_in_model] = model(ids).float()
        if cast_in_model:
            assert seen == [(torch.bfloat16, torch.float32, *(torch.bfloat16,) * 4)] * 2, seen
        else:  # as they come out of the time mix: k, a, b in fp32 (elementwise work on fp32 parameters)
            assert all(s[2] == s[4] == s[5] == torch.float32 for s in seen) and len(seen) == 2, seen
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0)


def test_cuda_backward_takes_missing_gradients_as_none(monkeypatch):
    """The forward's outputs without a gradient (sa, the checkpoints, an unused final state) must not be filled with
    zeros every step: materialisation is off, and the backward reads a missing final-state gradient as none."""
    from types import SimpleNamespace

    from rwkv_diffusion_rnn.models import wkv7_cuda as wc

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, 4, 1, 64, generator=g) for _ in range(6)]
    sa, ckpt = torch.randn(1, 4, 1, 64, generator=g), torch.randn(1, 1, 1, 64, 64, generator=g)
    calls = {}

    class Ctx(SimpleNamespace):
        def save_for_backward(self, *t):
            self.saved_tensors = t

        def mark_non_differentiable(self, *t):
            calls["non_diff"] = len(t)

        def set_materialize_grads(self, value):
            calls["materialize"] = value

    ctx = Ctx()
    wc._setup_context(ctx, (*xs, True, 2), (xs[0], ckpt[:, :, -1], sa, ckpt))
    assert calls == {"non_diff": 2, "materialize": False}

    def bwd(r, w, k, v, a, b, do, sa_, ckpt_, dht, split):
        calls["dht"], calls["do"] = dht, do
        return tuple(torch.zeros_like(x) for x in (r, w, k, v, a, b))

    monkeypatch.setattr(wc, "wkv7_cuda_bwd", bwd)
    do = torch.randn(1, 4, 1, 64, generator=g)
    grads = wc._backward(ctx, do, None, None, None)
    assert calls["dht"].numel() == 0 and torch.equal(calls["do"], do) and len(grads) == 8


def test_cuda_recompute_rebuilds_the_saved_tensors_in_the_backward(monkeypatch):
    """With ``recompute`` the forward saves an empty ``sa``; the backward runs the forward again with ``save`` and
    hands the backward kernel what that returns."""
    from types import SimpleNamespace

    from rwkv_diffusion_rnn.models import wkv7_cuda as wc

    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, 4, 1, 64, generator=g) for _ in range(6)]
    sa, ckpt = torch.randn(1, 4, 1, 64, generator=g), torch.randn(1, 1, 1, 64, 64, generator=g)
    seen = {}

    def fwd(r, w, k, v, a, b, save, split):
        seen["save"] = save
        return r, ckpt[:, :, -1], sa, ckpt

    def bwd(r, w, k, v, a, b, do, sa_, ckpt_, dht, split):
        seen["sa"], seen["ckpt"] = sa_, ckpt_
        return tuple(torch.zeros_like(x) for x in (r, w, k, v, a, b))

    monkeypatch.setattr(wc, "wkv7_cuda_fwd", fwd)
    monkeypatch.setattr(wc, "wkv7_cuda_bwd", bwd)
    ctx = SimpleNamespace(saved_tensors=(*xs, torch.empty(0), torch.empty(1, 1, 1, 64, 64)), split=2)
    wc._backward(ctx, torch.randn(1, 4, 1, 64, generator=g), None, None, None)
    assert seen["save"] is True and seen["sa"] is sa and seen["ckpt"] is ckpt


def test_a_slow_kernel_load_says_it_is_building(monkeypatch, capsys):
    """A load that takes more than a moment is a build: one line on stderr instead of silence (the load itself is
    stood in for here: no GPU, no nvcc)."""
    import time

    from torch.utils import cpp_extension

    from rwkv_diffusion_rnn.models import wkv7_cuda as wc

    monkeypatch.setattr(wc, "build_kwargs", lambda: {"name": "diffrwkv_wkv7_cuda_sm90"})
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: time.sleep(3.3))
    monkeypatch.setattr(torch.ops, "diffrwkv_wkv7", object(), raising=False)
    wc.extension.cache_clear()
    try:
        wc.extension()
    finally:
        wc.extension.cache_clear()
    assert "WKV-7 CUDA kernel: building diffrwkv_wkv7_cuda_sm90" in capsys.readouterr().err


def test_auto_leaves_gpus_before_ampere_to_fla(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(wkv7_cuda, "extension", lambda: pytest.fail("no build below compute capability 8.0"))
    monkeypatch.setattr(wkv7_mod, "_fla_chunk", lambda: object())
    assert wkv7_mod.resolve_backend("auto", torch.device("cuda")) == "fla"


def test_wkv_keep_states_reaches_the_cuda_backend_layer_by_layer(monkeypatch):
    """set_wkv_keep_states: the first round(f * L) layers keep their WKV states, the rest rebuild them; the setting
    reaches backend ``cuda`` with every call (None: no setting passed, the kernel's default decides)."""
    from rwkv_diffusion_rnn.errors import DiffRwkvError
    from rwkv_diffusion_rnn.models import wkv7_cuda as wc
    from rwkv_diffusion_rnn.models.rwkv7 import set_wkv_keep_states
    from tests.conftest import random_rwkv7

    seen = []

    def stand_in(r, w, k, v, a, b, state=None, **kw):
        seen.append(kw.get("keep_states", "unset"))
        return wkv7_mod.wkv7_reference(r, w, k, v, a, b, state)

    monkeypatch.setitem(wkv7_mod.BACKENDS, "cuda", stand_in)
    monkeypatch.setattr(wc, "IN_GRAPH", False)  # the call behind the graph break, where the stand-in sits
    model = random_rwkv7(4, 64, vocab_size=50, seed=2).train()
    model.wkv_backend = "cuda"
    ids = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(1))
    for fraction, want in ((0.5, [True, True, False, False]), (1.0, [True] * 4), (0.0, [False] * 4),
                           (0.3, [True, False, False, False]), (None, ["unset"] * 4)):  # fmt: skip
        seen.clear()
        n = set_wkv_keep_states(model, fraction)
        model(ids)
        assert seen == want, (fraction, seen)
        assert n == (0 if fraction is None else sum(want))
    with pytest.raises(DiffRwkvError, match=r"wkv_keep_states must be in \[0, 1\]; got 1.5"):
        set_wkv_keep_states(model, 1.5)


def test_cuda_forward_saves_states_as_the_layer_or_the_default_says(monkeypatch):
    from rwkv_diffusion_rnn.models import wkv7_cuda as wc

    for recompute in (True, False):
        monkeypatch.setattr(wc.CONFIG, "recompute", recompute)
        assert wc.keeps_states(None) is (not recompute)
        assert wc.keeps_states(True) is True and wc.keeps_states(False) is False
