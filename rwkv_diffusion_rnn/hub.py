"""Whether the Hugging Face hub can be reached, asked before the hub client is (its retries take a minute offline)."""

from __future__ import annotations

import os


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (``HF_HUB_OFFLINE`` set, or no TCP connection to ``HF_ENDPOINT``
    within ``timeout`` seconds), or None when it answers or is reached through a proxy (``HTTPS_PROXY`` etc.)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    import urllib.request

    if urllib.request.getproxies().get(url.scheme or "https") and not urllib.request.proxy_bypass(host):
        return None  # reached through a proxy: a direct connection says nothing; let the hub client try
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or type(exc).__name__}"
    return None
