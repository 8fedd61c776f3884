"""``diffrwkv serve``: the JSON API through Flask's test client, the command's errors, and the page itself in a real
headless Chromium (Playwright driving the system's browser): load, type a sentence, decode, walk between two."""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from rwkv_diffusion_rnn import DiffRwkv, cli
from rwkv_diffusion_rnn.serve import create_app, start_server
from tests.api_helpers import tiny_run

SENTENCE = "The old fisherman sings on the bridge."


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    return tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def model(run):
    return DiffRwkv.from_pretrained(run["save_dir"])


@pytest.fixture(scope="module")
def client(model):
    return create_app(model, steps=3).test_client()


def _error(resp, *fragments: str) -> None:
    assert resp.status_code == 400
    msg = resp.get_json()["error"]
    assert "\n" not in msg and all(f in msg for f in fragments), msg


# ------------------------------------------------------------------------------------------------- JSON API


def test_api_answers_as_the_python_api(client, model):
    info = client.get("/api/info").get_json()
    assert info["latent_dim"] == 32 and info["has_encoder"] and info["has_data"]
    r = client.post("/api/encode", json={"text": SENTENCE}).get_json()
    z, e = model.encode(SENTENCE, steps=3), model.embed(SENTENCE)
    np.testing.assert_allclose(r["latent"], z, atol=1e-6)
    np.testing.assert_allclose(r["encoder_latent"], e, atol=1e-6)
    assert r["cosine"] == pytest.approx(float(z @ e / np.linalg.norm(z) / np.linalg.norm(e)), abs=1e-5)
    assert [n["text"] for n in r["neighbours"]] == [t for t, _ in model.nearest(e, k=5)]
    d = client.post("/api/decode", json={"text": SENTENCE, "source": "encoder"}).get_json()
    assert d["text"] == model.decode(e, steps=3) and d["source"] == "encoder"
    if d["text"].strip():
        back = model.embed(d["text"])
        assert d["roundtrip_cosine"] == pytest.approx(float(back @ e / np.linalg.norm(back)), abs=1e-5)
    d = client.post("/api/decode", json={"text": SENTENCE, "source": "model"}).get_json()
    assert d["text"] == model.decode(z, steps=3)
    d = client.post("/api/decode", json={"latent": e.tolist()}).get_json()
    assert d["text"] == model.decode(e, steps=3)
    w = client.post("/api/interpolate", json={"a": SENTENCE, "b": "Two cats sleep.", "n": 3}).get_json()
    assert w["texts"] == model.interpolate(SENTENCE, "Two cats sleep.", 3, steps=3).texts
    near = client.post("/api/nearest", json={"latent": e.tolist(), "k": 2}).get_json()["neighbours"]
    assert len(near) == 2 and near[0]["cosine"] >= near[1]["cosine"]


def test_bad_requests_are_one_line_400s(client):
    _error(client.post("/api/encode", data="not json", content_type="application/json"), "not a JSON object")
    _error(client.post("/api/encode", json={}), "request field 'text' is missing")
    _error(client.post("/api/encode", json={"text": 3}), "'text' is a int; expected a str")
    _error(client.post("/api/encode", json={"text": " "}), "texts[0] is empty")
    _error(client.post("/api/decode", json={"latent": [0.1] * 5}), "'latent'", "expected [N, 32]")
    _error(client.post("/api/decode", json={"latent": [float("nan")] * 32}), "NaN")
    _error(client.post("/api/decode", json={"text": "x", "source": "both"}), "'source' is 'both'")
    _error(client.post("/api/interpolate", json={"a": "x", "b": "y", "n": 500}), "'n' is 500")


def test_page_loads_nothing_from_outside():
    static = resources.files("rwkv_diffusion_rnn") / "static"
    html = (static / "playground.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert links and all(u.startswith("/static/") for u in links), links
    for name in ("playground.js", "playground.css"):
        text = (static / name).read_text()
        urls = set(re.findall(r"[a-z]+://[^\s\"'`)]+", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, urls  # the SVG namespace name is never fetched
        assert "import " not in text and "@import" not in text


# ------------------------------------------------------------------------------------------------- command


def test_serve_command_errors_are_one_line(run, capsys):
    assert cli.main(["serve", "--checkpoint", str(run["root"] / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing" in err and "\n" not in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--checkpoint", str(run["save_dir"]), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and f"127.0.0.1:{port}" in err and "--port" in err


# ------------------------------------------------------------------------------------------------- browser


def _chromium() -> str:
    """The system's Chromium, or skip (fail under CI, which installs it) with a one-line reason."""
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install 'diffrwkv[test]')"
    path = os.environ.get("DIFFRWKV_CHROMIUM") or next(
        (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    if reason is None and path is None:
        reason = "no Chromium found (Debian: apt-get install chromium; or set DIFFRWKV_CHROMIUM)"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    return path


#: Chromium as root on a closed network: no sandbox, no background connections (they are refused, many at a time)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


def test_page_in_a_real_browser(model, tmp_path):
    """Type a sentence, click Decode, read the decoded text; walk between two sentences with the slider. Set
    ``DIFFRWKV_PLAYGROUND_CHECKPOINT`` to run it on another model and ``DIFFRWKV_SCREENSHOT`` to keep the picture."""
    from playwright.sync_api import sync_playwright

    exe = _chromium()
    other = os.environ.get("DIFFRWKV_PLAYGROUND_CHECKPOINT")
    m = DiffRwkv.from_pretrained(other) if other else model
    server = start_server(create_app(m), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.port}/"
    a, b = "A dog runs on the beach.", "Two children read a book in the kitchen."
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 860})
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(url) else outside.append(r.url))
            page.goto(url)
            page.wait_for_function("document.getElementById('info').textContent.includes('latents')")
            page.fill("#text", SENTENCE)
            page.select_option("#source", "encoder")
            page.click("#decode")
            page.wait_for_selector("#decoded[data-done='1']", timeout=120_000)
            decoded = page.text_content("#decoded")
            assert decoded == (m.decode(m.embed(SENTENCE)) or "(empty)")
            assert page.locator("#chart rect.model").count() == 32
            assert page.locator("#chart rect.encoder").count() == 32
            assert page.locator("#neighbours li").count() == 5
            assert not page.is_visible("#error")
            ids = page.eval_on_selector_all("[id]", "els => els.map(e => e.id)")
            assert len(ids) == len(set(ids)), ids  # every id once
            page.fill("#a", a)
            page.fill("#b", b)
            page.fill("#points", "5")
            page.click("#interpolate")
            page.wait_for_selector("#slider:not([disabled])", timeout=120_000)
            page.eval_on_selector("#slider", "s => { s.value = '2'; s.dispatchEvent(new Event('input')); }")
            path = m.interpolate(a, b, 5)
            assert page.text_content("#walked") == (path.texts[2] or "(empty)")
            assert page.locator("#path li").count() == 5
            page.wait_for_function("document.body.dataset.busy === '0'")
            page.fill("#text", "   ")
            page.click("#decode")
            page.wait_for_selector("#error:not([hidden])")
            assert "texts[0] is empty" in page.text_content("#error")  # the server's one line, shown
            page.fill("#text", SENTENCE)
            page.click("#decode")
            page.wait_for_selector("#decoded[data-done='1']", timeout=120_000)
            assert page.is_hidden("#error") and page.text_content("#decoded") == decoded
            page.wait_for_function("document.body.dataset.busy === '0'")
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000 and not outside, outside
        if os.environ.get("DIFFRWKV_SCREENSHOT"):
            shutil.copyfile(shot, Path(os.environ["DIFFRWKV_SCREENSHOT"]))
    finally:
        server.shutdown()
        thread.join(timeout=10)
