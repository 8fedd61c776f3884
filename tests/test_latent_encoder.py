"""Loading a sentence encoder that is neither local nor cached fails fast and in one line when the hub is down."""

from __future__ import annotations

import socket
import time

import pytest

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.hub import hub_unreachable
from rwkv_diffusion_rnn.latent_encoder import load_embedder


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connecting is refused at once
    return port


def test_uncached_encoder_with_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    name = f"no-such-org/encoder-{time.time_ns()}"
    t0 = time.perf_counter()
    with pytest.raises(DiffRwkvError) as info:
        load_embedder(name, cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 20
    msg = str(info.value)
    assert "\n" not in msg and name in msg and "unreachable" in msg


def test_hub_offline_flag_is_honoured(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in hub_unreachable()


def test_reachable_endpoint_is_reported_reachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
        assert hub_unreachable() is None
    finally:
        srv.close()


def test_a_proxy_is_not_probed_directly(monkeypatch):
    """Behind a proxy a direct connection says nothing about the hub: the probe steps aside (NO_PROXY honoured)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for k in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.close()  # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert hub_unreachable() is not None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    assert hub_unreachable() is None
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert hub_unreachable() is not None
