"""Sampling throughput on a GPU (outside CI): sentences/s for latent -> text at 32 tokens and batch 256.

    python bench/bench_sampling.py [--layers 12 --width 768 --n 256 --out results.json]

A random RWKV-7 denoiser of the given shape (default: the g1 0.1B shape, L12 D768, World vocabulary) with every
zero-initialised layer filled, so its output depends on t. Each row of the table is one ``sample_l2t`` call over
``--n`` latents in one batch (after a warm-up call), timed with CUDA synchronisation; "model s" is the time
inside the denoiser (forward / forward_cached / prefill) in a second pass synchronised around each call; the rest
of a pass is the sampler (scheduler, per-row float64 RNG, Gumbel-max). Rows: plain 32-step sampling with the
no-change cache exact / off; semi-AR blocks of 8 tokens (8 steps each, 32 in all) with and without the RWKV state
cache; confidence unmasking; bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import numpy as np
import torch

from rwkv_diffusion_rnn.continuous_diffusion import CosineVPSchedule, GaussianDiffusion, LatentNormalizer
from rwkv_diffusion_rnn.diffusion_process import LogLinearSchedule, MaskedDiffusion
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, RWKVDenoiser
from rwkv_diffusion_rnn.sampling import sample_l2t, sample_t2l


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timed:
    """The denoiser, with the time spent inside its calls summed (synchronised before and after each)."""

    def __init__(self, den) -> None:
        self.den, self.seconds, self.rows = den, 0.0, 0

    def __getattr__(self, name):
        return getattr(self.den, name)

    def _time(self, fn, rows, *args):
        sync()
        t0 = time.perf_counter()
        out = fn(*args)
        sync()
        self.seconds += time.perf_counter() - t0
        self.rows += rows
        return out

    def __call__(self, ids, *args, **kw):
        return self._time(lambda *a: self.den(*a, **kw), ids.shape[0], ids, *args)

    def forward_cached(self, cache, block_ids, *args):
        return self._time(self.den.forward_cached, block_ids.shape[0], cache, block_ids, *args)

    def prefill(self, *args):
        return self._time(self.den.prefill, 0, *args)


def build_sampling_model(layers: int, width: int, vocab: int, dev: torch.device, length: int = 32) -> SimpleNamespace:
    """The sampling-side model namespace around a random denoiser of the given shape (every zero-initialised output
    layer filled, so the output depends on t), as ``sample_l2t`` / ``sample_t2l`` read it."""
    den = RWKVDenoiser(random_rwkv7(RWKV7Config.for_shape(layers, width, vocab), seed=0), DenoiserConfig())
    with torch.no_grad():
        for w in (den.time.out.weight, den.time.out.bias, den.latent_head[2].weight):
            w.normal_(0.0, 0.02)
    den = den.to(dev).eval()
    return SimpleNamespace(
        denoiser=den,
        text=MaskedDiffusion(LogLinearSchedule(), den.mask_id),
        latent=GaussianDiffusion(CosineVPSchedule(), "eps"),
        normalizer=LatentNormalizer(np.zeros(32), np.ones(32)),
        tokenizer=SimpleNamespace(eot_id=0),
        config=SimpleNamespace(data=SimpleNamespace(pad_to_length=length, max_length=None)),
    )


def time_l2t(m: SimpleNamespace, latents: np.ndarray, kw: dict, bf16: bool = False) -> tuple[dict, list]:
    """One timed ``sample_l2t`` call over all ``latents`` in one batch (after a warm-up call on 8 rows), then a
    second pass with the time inside the denoiser summed. Returns the result row and the sampled ids."""
    n, den = len(latents), m.denoiser
    dev_type = next(den.parameters()).device.type
    with torch.autocast(dev_type, torch.bfloat16, enabled=bf16):
        sample_l2t(m, latents[:8], batch_size=8, seed=1, **kw)  # warm-up (kernels, allocator)
        sync()
        t0 = time.perf_counter()
        ids = sample_l2t(m, latents, batch_size=n, seed=0, **kw)
        sync()
        total = time.perf_counter() - t0
        m.denoiser = timed = Timed(den)  # a second pass, synchronised around every model call
        try:
            sample_l2t(m, latents, batch_size=n, seed=0, **kw)
        finally:
            m.denoiser = den
    row = {"sentences_per_s": n / total, "total_s": total, "model_s": timed.seconds,
           "model_rows_per_sentence": timed.rows / n}  # fmt: skip
    return row, ids


def time_t2l(m: SimpleNamespace, token_ids: list[list[int]], num_steps: int = 32, bf16: bool = False) -> dict:
    """One timed ``sample_t2l`` call (DDIM, ``num_steps``) over all ``token_ids`` in one batch, after a warm-up.
    T2L has no state cache: the noisy latent sits in the prefix and every position is FiLM-conditioned on
    t_latent, so no part of the sequence is the same from one step to the next."""
    n, den = len(token_ids), m.denoiser
    dev_type = next(den.parameters()).device.type
    with torch.autocast(dev_type, torch.bfloat16, enabled=bf16):
        sample_t2l(m, token_ids[:8], num_steps=num_steps, batch_size=8, seed=1)
        sync()
        t0 = time.perf_counter()
        sample_t2l(m, token_ids, num_steps=num_steps, batch_size=n, seed=0)
        sync()
        total = time.perf_counter() - t0
    return {"latents_per_s": n / total, "total_s": total}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--out")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    dev = torch.device(a.device)
    m = build_sampling_model(a.layers, a.width, a.vocab, dev, a.length)
    latents = np.random.default_rng(0).standard_normal((a.n, 32)).astype(np.float32)
    runs = {
        "32 steps, no-change cache exact": dict(num_steps=32),
        "32 steps, no-change cache off": dict(num_steps=32, no_change_cache="off"),
        "blocks of 8 x 8 steps, state cache": dict(num_steps=8, block_size=8, use_cache=True),
        "blocks of 8 x 8 steps, no state cache": dict(num_steps=8, block_size=8, use_cache=False),
        "blocks of 8 x 8 steps, state cache, off": dict(num_steps=8, block_size=8, no_change_cache="off"),
        "blocks of 8 x 8 steps, no state cache, off": dict(num_steps=8, block_size=8, use_cache=False,
                                                           no_change_cache="off"),
        "32 steps, confidence": dict(num_steps=32, strategy="confidence"),
        "32 steps, exact, bf16 autocast": dict(num_steps=32, bf16=True),
        "blocks of 8 x 8, state cache, bf16": dict(num_steps=8, block_size=8, bf16=True),
        "blocks of 8 x 8, no state cache, bf16": dict(num_steps=8, block_size=8, use_cache=False, bf16=True),
    }  # fmt: skip
    name_ = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{name_}  L{a.layers} D{a.width} V{a.vocab}  n={a.n}  length={a.length}")
    print(f"{'run':<46} {'sent/s':>8} {'total s':>8} {'model s':>8} {'rows/sent':>9}")
    results, outputs = [], {}
    for name, kw in runs.items():
        kw = dict(kw)
        bf16 = kw.pop("bf16", False)
        row, outputs[name] = time_l2t(m, latents, kw, bf16)
        row = {"run": name, **row}
        results.append(row)
        print(f"{name:<46} {row['sentences_per_s']:>8.1f} {row['total_s']:>8.2f} {row['model_s']:>8.2f} "
              f"{row['model_rows_per_sentence']:>9.1f}", flush=True)  # fmt: skip
    pairs = [("blocks of 8 x 8 steps, state cache", "blocks of 8 x 8 steps, no state cache"),
             ("32 steps, no-change cache exact", "32 steps, no-change cache off")]  # fmt: skip
    agree = {f"{x} == {y}": float(np.mean([u == v for u, v in zip(outputs[x], outputs[y], strict=True)]))
             for x, y in pairs}  # fmt: skip
    for k, v in agree.items():
        print(f"rows identical, {k}: {v:.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": name_, "shape": vars(a), "results": results,
                       "agreement": agree}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
