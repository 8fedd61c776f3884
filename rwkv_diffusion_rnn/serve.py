"""``diffrwkv serve``: a local playground page over :class:`~rwkv_diffusion_rnn.api.DiffRwkv`.

    diffrwkv serve --checkpoint outputs/demo/run            # then open http://127.0.0.1:7860/

The page (``static/playground.html``, plain JavaScript and an SVG bar chart, no external URL: it works offline)
embeds a sentence with the model (text -> latent) beside the data's own encoder, draws both latents and their
cosine, decodes the latent back into text, lists the nearest training sentences, and walks between two sentences
with a slider over the decoded text at each step.

Web framework: Flask, a small, long-maintained WSGI framework whose synchronous requests suit a model that runs one
call at a time (a lock serialises them); it serves the page and a JSON API from 127.0.0.1 only, by default.

JSON API (POST bodies and answers are JSON; a bad request answers 400 with ``{"error": one line}``):
``GET /api/info``; ``POST /api/encode {"text"}`` -> the model's latent, the encoder's, their cosine, neighbours;
``POST /api/decode {"text" | "latent", "source": "encoder" | "model"}`` -> the decoded text and its round-trip
cosine (re-embedded by the data's encoder, against the latent);
``POST /api/interpolate {"a", "b", "n"}`` -> texts along the way; ``POST /api/nearest {"latent", "k"}``.
"""

from __future__ import annotations

import argparse
import threading
from typing import Any

import numpy as np

from rwkv_diffusion_rnn.errors import DiffRwkvError

DEFAULT_PORT = 7860
MAX_STEPS = 33  # interpolation points the page may ask for
MAX_TEXT = 2000  # characters of one sentence


def _flask():
    try:
        import flask
    except ImportError:
        raise DiffRwkvError("diffrwkv serve needs Flask: pip install 'flask>=3.1,<4'") from None
    return flask


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def _field(body: dict, key: str, kind: type, default: Any = ...) -> Any:
    if key not in body or body[key] is None:
        if default is ...:
            raise DiffRwkvError(f"request field '{key}' is missing; expected a {kind.__name__}")
        return default
    value = body[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DiffRwkvError(f"request field '{key}' is a {type(value).__name__}; expected a {kind.__name__}")
    if kind is str and len(value) > MAX_TEXT:
        raise DiffRwkvError(f"request field '{key}' has {len(value)} characters; expected at most {MAX_TEXT}")
    return value


class Playground:
    """The request handlers, apart from Flask so they can be read and tested as plain functions."""

    def __init__(self, model, *, steps: int | None = None, seed: int = 0, k: int = 5) -> None:
        self.model = model
        self.steps = steps
        self.seed = seed
        self.k = k
        self.lock = threading.Lock()  # one model call at a time (the threaded server answers requests in parallel)

    def info(self) -> dict:
        m = self.model
        return {"source": str(m.record.source), "step": m.record.step, "latent_dim": m.latent_dim,
                "has_encoder": m.has_encoder, "has_data": m.has_data, "steps": self.steps,
                "seed": self.seed}  # fmt: skip

    def _neighbours(self, z: np.ndarray) -> list[dict] | None:
        if not self.model.has_data:
            return None
        return [{"text": t, "cosine": c} for t, c in self.model.nearest(z, k=self.k)]

    def _latent_of(self, text: str, source: str) -> np.ndarray:
        if source == "encoder" or (source == "auto" and self.model.has_encoder):
            return self.model.embed(text)
        if source in ("model", "auto"):
            return self.model.encode(text, steps=self.steps, seed=self.seed)
        raise DiffRwkvError(f"request field 'source' is {source!r}; expected 'encoder', 'model' or 'auto'")

    def encode(self, body: dict) -> dict:
        text = _field(body, "text", str)
        with self.lock:
            z = self.model.encode(text, steps=self.steps, seed=self.seed)
            e = self.model.embed(text) if self.model.has_encoder else None
            near = self._neighbours(e if e is not None else z)
        return {"latent": z.tolist(), "encoder_latent": None if e is None else e.tolist(),
                "cosine": None if e is None else _cosine(z, e), "neighbours": near}  # fmt: skip

    def decode(self, body: dict) -> dict:
        with self.lock:
            if body.get("latent") is not None:
                z, source = self.model.as_latents(body["latent"], "request field 'latent'")[0][0], "latent"
            else:
                source = _field(body, "source", str, "auto")
                z = self._latent_of(_field(body, "text", str), source)
            text = self.model.decode(z, steps=self.steps, seed=self.seed)
            # the round trip: the decoded text re-embedded by the data's encoder, against the latent decoded
            back = _cosine(self.model.embed(text), z) if self.model.has_encoder and text.strip() else None
        return {"text": text, "latent": z.tolist(), "source": source, "roundtrip_cosine": back}

    def interpolate(self, body: dict) -> dict:
        a, b = _field(body, "a", str), _field(body, "b", str)
        n = _field(body, "n", int, 9)
        if not 2 <= n <= MAX_STEPS:
            raise DiffRwkvError(f"request field 'n' is {n}; expected 2 to {MAX_STEPS} points")
        with self.lock:
            path = self.model.interpolate(a, b, n, seed=self.seed, **({"steps": self.steps} if self.steps else {}))
        return {"alphas": path.alphas.tolist(), "texts": path.texts, "latents": path.latents.tolist()}

    def nearest(self, body: dict) -> dict:
        k = _field(body, "k", int, self.k)
        with self.lock:
            z = self.model.as_latents(_field(body, "latent", list), "request field 'latent'")[0][0]
            near = self.model.nearest(z, k=max(1, min(k, 50)))
        return {"neighbours": [{"text": t, "cosine": c} for t, c in near]}


def create_app(model, *, steps: int | None = None, seed: int = 0, k: int = 5):
    """The Flask app of the playground over ``model`` (a :class:`~rwkv_diffusion_rnn.api.DiffRwkv`)."""
    flask = _flask()
    app = flask.Flask(__name__, static_folder="static", static_url_path="/static")
    pg = Playground(model, steps=steps, seed=seed, k=k)
    app.config["playground"] = pg

    @app.get("/")
    def index():
        return app.send_static_file("playground.html")

    @app.get("/api/info")
    def info():
        return flask.jsonify(pg.info())

    def post(handler):
        def view():
            body = flask.request.get_json(silent=True)
            if not isinstance(body, dict):
                return flask.jsonify(error="the request body is not a JSON object"), 400
            try:
                return flask.jsonify(handler(body))
            except DiffRwkvError as exc:
                return flask.jsonify(error=str(exc)), 400

        view.__name__ = handler.__name__
        return view

    for name in ("encode", "decode", "interpolate", "nearest"):
        app.post(f"/api/{name}")(post(getattr(pg, name)))
    return app


def start_server(app, host: str = "127.0.0.1", port: int = DEFAULT_PORT):
    """A threaded WSGI server bound to ``host:port`` (0: any free port), not yet serving; ``.port`` is the port."""
    import socket

    from werkzeug.serving import make_server

    # werkzeug answers a busy port by printing two lines and exiting: ask the socket first, for a one-line error
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
            probe.bind((host, port))
    except OSError as exc:
        raise DiffRwkvError(f"{host}:{port}: cannot listen ({exc.strerror or exc}); pass another --port") from exc
    try:
        return make_server(host, port, app, threaded=True)
    except SystemExit:  # taken between the probe and the server
        raise DiffRwkvError(f"{host}:{port}: cannot listen (address in use); pass another --port") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="diffrwkv serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a step_* folder, a save_dir, or a save_pretrained folder")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on 127.0.0.1 (default {DEFAULT_PORT})")
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    ap.add_argument("--data-dir", help="prepare-latents folder of the training data, if not where the config says")
    ap.add_argument("--steps", type=int, help="diffusion steps (default: the samplers' own)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.steps is not None and a.steps < 1:
        raise DiffRwkvError(f"--steps must be >= 1, got {a.steps}")
    if not 0 <= a.port <= 65535:
        raise DiffRwkvError(f"--port must be 0 to 65535, got {a.port}")
    _flask()  # before loading the model: a missing framework is said at once
    from rwkv_diffusion_rnn.api import DiffRwkv

    print(f"[serve] loading {a.checkpoint} ...", flush=True)
    model = DiffRwkv.from_pretrained(a.checkpoint, device=a.device, data_dir=a.data_dir)
    server = start_server(create_app(model, steps=a.steps, seed=a.seed), a.host, a.port)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[serve] listening on {a.host}: anyone who can reach this machine can use the model")
    if not model.has_encoder:
        print("[serve] the data's encoder was not found: the page shows the model's latents only (--data-dir)")
    print(f"[serve] playground: http://{a.host}:{server.port}/   (Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    import sys

    from rwkv_diffusion_rnn.entry import run_main

    sys.exit(run_main(main, None))
