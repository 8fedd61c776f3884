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
