"""Sampling throughput on a GPU (outside CI): sentences/s and tokens/s for latent -> text at 32 tokens and batch 256.

    python bench/bench_sampling.py [--layers 12 --width 768 --n 256 --rows decoders,study --autocast bf16
                                    --out results.json]

A random RWKV-7 denoiser of the given shape (default: the g1 0.1B shape, L12 D768, World vocabulary) with every
zero-initialised layer filled, so its output depends on t. Each diffusion row is one ``sample_l2t`` call over ``--n``
latents in one batch (after a warm-up call), timed with CUDA synchronisation; "model s" is the time inside the
denoiser (forward / forward_cached / prefill) in a second pass synchronised around each call; the rest of a pass is
the sampler (scheduler, per-row float64 RNG, Gumbel-max). Every row decodes all ``--length`` positions of every
sentence, so tokens/s = sentences/s x length.

Rows ``decoders`` (under ``--autocast``): the latent -> text decoders as a user gets them by default
(``L2T_PRESETS``): "faithful" (the default: left to right, one token a block, one step a block, argmax, guidance 0.5)
with the RWKV state cache on (each committed block read once, ``prefill`` continuing its state; the default) and off
(every step re-reads the whole row), and "varied" (the whole row, 32 steps, no state cache: none applies to a
whole-row decoder). Beside them the AR decoder of the captions study (bench/captions_ar.py ``PrefixCaptioner``: the
same backbone shape as a causal LM, the latent as 4 prefix embeddings, the same random backbone weights), greedy:
carried as RWKV state, one token a step (``greedy_stateful``), and re-reading the padded row every step as the
captions harness decodes (``beam_search`` with one beam).

Rows ``study``: plain 32-step sampling with the no-change cache exact / off; semi-AR blocks of 8 tokens (8 steps
each, 32 in all) with and without the RWKV state cache; confidence unmasking; bf16 autocast.

Measured (2026-12-06, H100, L12 D768 V65536, 256 sentences of 32 tokens, ``--rows decoders``, bf16 autocast;
sentences/s): at 07:30 UTC (fla for every WKV call; the state cache then re-read the committed prefix at every
block) faithful with the state cache 64, without 117; varied 154; AR greedy carried as state 438, re-reading the
row 250 (fp32: 64 / 61 / 90 / 347 / 130). At 07:58 UTC on another H100 (our CUDA kernel for stateless calls, the
triton kernel for calls with a state; the state cache now carries its state from block to block, each committed
token read once) faithful with the cache 87.5, without 101.8; varied 155.0; AR greedy 244.2 / 254.9. At 32 tokens a
one-token call costs about what a whole-row call does on this GPU, so the cache does not pay at this length. In fp32
the state cache on / off (and the two AR decodes) give the same tokens in every row; under bf16 the two paths round
differently (with random weights near-ties are everywhere: 21-56 % / 50 % of rows identical).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from rwkv_diffusion_rnn.continuous_diffusion import CosineVPSchedule, GaussianDiffusion, LatentNormalizer
from rwkv_diffusion_rnn.diffusion_process import LogLinearSchedule, MaskedDiffusion
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, RWKVDenoiser
from rwkv_diffusion_rnn.sampling import L2T_PRESETS, sample_l2t, sample_t2l

sys.path.insert(0, str(Path(__file__).resolve().parent))
from captions_ar import PrefixCaptioner, beam_search, cut_at_eot, greedy_stateful  # noqa: E402

ROW_SETS = ("decoders", "study")
AR_PREFIX = 4  # the captions harness's --ar-prefix default


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


def decoder_runs() -> dict[str, tuple[dict, str]]:
    """The default latent -> text decoders: name -> (sample_l2t keywords, RWKV state cache on / off / n/a)."""
    faithful, varied = L2T_PRESETS["faithful"], L2T_PRESETS["varied"]
    return {
        "faithful (default), state cache on": (dict(faithful, use_cache=True), "on"),
        "faithful (default), state cache off": (dict(faithful, use_cache=False), "off"),
        "varied, whole row (no state cache applies)": (dict(varied), "n/a"),
    }


def build_ar_model(layers: int, width: int, vocab: int, dev: torch.device) -> PrefixCaptioner:
    """The captions study's AR decoder at the given shape, its backbone the same random weights as the denoiser's
    (every tensor noised, so no output projection is zero), its latent prefix seeded."""
    ar = PrefixCaptioner(layers, width, vocab, prefix_len=AR_PREFIX, wkv_backend=None, seed=0)
    ar.backbone.load_state_dict(random_rwkv7(RWKV7Config.for_shape(layers, width, vocab), seed=0).state_dict())
    return ar.to(dev).eval()


def time_ar(ar: PrefixCaptioner, z: torch.Tensor, length: int, stateful: bool, bf16: bool = False) -> tuple[dict, list]:
    """One timed greedy decode of ``length`` tokens for every row of standardised ``z`` in one batch (after a
    warm-up on 8 rows): carried as RWKV state (``stateful``), else re-reading the padded row every step. Returns the
    result row and the ids cut at end-of-text."""
    n = z.shape[0]

    def decode(zz):
        if stateful:
            return cut_at_eot(greedy_stateful(ar, zz, length, batch_size=zz.shape[0]))
        return beam_search(ar, zz, length, beams=1, batch_size=zz.shape[0])[0]

    with torch.autocast(z.device.type, torch.bfloat16, enabled=bf16):
        decode(z[:8])
        sync()
        t0 = time.perf_counter()
        ids = decode(z)
        sync()
        total = time.perf_counter() - t0
    return {"sentences_per_s": n / total, "total_s": total, "model_s": total, "model_rows_per_sentence": None}, ids


def decoder_rows(m, ar, latents: np.ndarray, length: int, bf16: bool) -> tuple[list[dict], dict]:
    """The ``decoders`` rows: the default L2T decoders (state cache on / off where it applies), then the AR decoder's
    greedy decode of the same size (carried as state; re-reading the row). Returns (rows, name -> ids)."""
    n, dtype = len(latents), "bf16 autocast" if bf16 else "fp32"
    rows, outputs = [], {}
    for name, (kw, cache) in decoder_runs().items():
        row, outputs[name] = time_l2t(m, latents, kw, bf16)
        rows.append({"run": name, "decoder": kw, "state_cache": cache, "dtype": dtype, **row})
    z = torch.as_tensor(latents, device=next(ar.parameters()).device)  # standardised: the normaliser is 0 / 1
    for name, stateful, cache in (("AR greedy, RWKV state (one token a step)", True, "on"),
                                  ("AR greedy, re-reading the row", False, "off")):  # fmt: skip
        row, outputs[name] = time_ar(ar, z, length, stateful, bf16)
        rows.append({"run": name, "decoder": {"ar_prefix": AR_PREFIX, "greedy": True}, "state_cache": cache,
                     "dtype": dtype, **row})  # fmt: skip
    for r in rows:
        r.update(batch=n, length=length, sentences=n, tokens=n * length, tokens_per_s=r["sentences_per_s"] * length)
    return rows, outputs


STUDY_RUNS = {
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

#: pairs of runs whose tokens the design says are the same (the state cache and the exact no-change cache are exact)
PAIRS = [
    ("faithful (default), state cache on", "faithful (default), state cache off"),
    ("AR greedy, RWKV state (one token a step)", "AR greedy, re-reading the row"),
    ("blocks of 8 x 8 steps, state cache", "blocks of 8 x 8 steps, no state cache"),
    ("32 steps, no-change cache exact", "32 steps, no-change cache off"),
]


def study_rows(m, latents: np.ndarray) -> tuple[list[dict], dict]:
    """The ``study`` rows (sample_l2t variants, each with its own dtype). Returns (rows, name -> ids)."""
    n, length = len(latents), m.config.data.pad_to_length
    rows, outputs = [], {}
    for name, kw in STUDY_RUNS.items():
        kw = dict(kw)
        bf16 = kw.pop("bf16", False)
        row, outputs[name] = time_l2t(m, latents, kw, bf16)
        rows.append({"run": name, "decoder": kw, "dtype": "bf16 autocast" if bf16 else "fp32", **row,
                     "batch": n, "length": length, "sentences": n, "tokens": n * length,
                     "tokens_per_s": n * length / row["total_s"]})  # fmt: skip
    return rows, outputs


def run_bench(a: argparse.Namespace) -> dict:
    """Every selected row at the shape ``a`` gives; the JSON the script writes (also what the tests read)."""
    sets = [x for x in a.rows.split(",") if x]
    if not sets or any(x not in ROW_SETS for x in sets):
        raise SystemExit(f"--rows: a comma list of {', '.join(ROW_SETS)}; got {a.rows!r}")
    dev = torch.device(a.device)
    m = build_sampling_model(a.layers, a.width, a.vocab, dev, a.length)
    latents = np.random.default_rng(0).standard_normal((a.n, 32)).astype(np.float32)
    name_ = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{name_}  L{a.layers} D{a.width} V{a.vocab}  n={a.n}  length={a.length}  rows={a.rows}  "
          f"decoders under {a.autocast}")  # fmt: skip
    print(f"{'run':<46} {'cache':>5} {'sent/s':>8} {'tok/s':>9} {'total s':>8} {'model s':>8} {'rows/sent':>9}")
    results, outputs = [], {}
    for which in sets:
        if which == "decoders":
            ar = build_ar_model(a.layers, a.width, a.vocab, dev)
            rows, outs = decoder_rows(m, ar, latents, a.length, a.autocast == "bf16")
        else:
            rows, outs = study_rows(m, latents)
        outputs.update(outs)
        for row in rows:
            per = row["model_rows_per_sentence"]
            print(f"{row['run']:<46} {row.get('state_cache', '-'):>5} {row['sentences_per_s']:>8.1f} "
                  f"{row['tokens_per_s']:>9.0f} {row['total_s']:>8.2f} {row['model_s']:>8.2f} "
                  f"{'-' if per is None else format(per, '.1f'):>9}", flush=True)  # fmt: skip
        results += rows
    agree = {f"{x} == {y}": float(np.mean([u == v for u, v in zip(outputs[x], outputs[y], strict=True)]))
             for x, y in PAIRS if x in outputs and y in outputs}  # fmt: skip
    for k, v in agree.items():
        print(f"rows identical, {k}: {v:.3f}")
    return {"device": name_, "shape": vars(a), "results": results, "agreement": agree}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--rows", default="decoders,study", help=f"comma list of {', '.join(ROW_SETS)}")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none",
                   help="the decoders rows' dtype (the study rows name their own)")  # fmt: skip
    p.add_argument("--out")
    p.add_argument("--device", default="cuda")
    return p.parse_args(argv)


def main() -> None:
    a = parse_args()
    res = run_bench(a)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
