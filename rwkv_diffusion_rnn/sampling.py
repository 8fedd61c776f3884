"""Generation loops around a trained denoiser (the ``diffrwkv sample`` command is :mod:`sample_cli`; how inputs
are read and outputs cut clean, :mod:`sampling_inputs`).

    from rwkv_diffusion_rnn.pipeline import load_trained
    from rwkv_diffusion_rnn.sampling import sample_joint, sample_l2t, sample_t2l
    m = load_trained("outputs/rwkv_mmdit", device="cuda")
    ids = sample_l2t(m, latents)                        # RAW latents [N, D] -> N lists of token ids (clean)
    text = m.tokenizer.decode_batch(ids, skip_special_tokens=True)
    z = sample_t2l(m, [m.tokenizer.encode(s) for s in texts])   # -> RAW latents [N, D]
    ids, z = sample_joint(m, 16, length=32)              # both from noise

Default decoders, chosen by the measurements in docs/RESULTS.md. Latent -> text decodes ``"faithful"``
(:data:`L2T_PRESETS`): left to right, one token a block and one step a block (the committed prefix kept as RWKV
state), argmax, classifier-free guidance 0.5 -- the best measured way to decode a latent into its sentence (the
captions study: round-trip cosine 0.925-0.929, top-1 0.994-0.996 with guidance 0.5; on the offline demo's model left
to right with argmax scored 0.884 against 0.813 for confidence-ordered sampling at temperature 1). ``"varied"`` --
the whole row unmasked most-confident-first in 32 steps at temperature 1, no guidance -- samples different text on
every seed. Text -> latent takes one DDIM step
on an x0-prediction model (the network's posterior mean, which beat 16-32 steps on cosine and STS-B), 32 otherwise.
``candidates=K`` (self-reranking, below) is opt-in: it costs K decodes and pays only where the model's own text ->
latent is strong.

Conditions are fed as training fed them (objectives.py): the clean condition at t = 0, and for classifier-free
guidance the unconditional pass feeds the condition fully noised, t = 1 (L2T: a pure-noise latent; T2L: every text
position ``<mask>``). The schedulers are in :mod:`rwkv_diffusion_rnn.samplers`.

Text length: with ``data.pad_to_length`` the model was trained on rows of exactly that many tokens (text, then
end-of-text), so L2T/joint generate that many and cut at the first end-of-text; otherwise the caller gives
``length`` (one int, or one per row). T2L formats its condition the same way (pad_to_length, else data.max_length).

Reproducibility: each row draws from its own generators, seeded by ``(seed, stream, global row index)``
(:class:`~rwkv_diffusion_rnn.samplers.RowGenerators`); a loop never stops early on a batch-wide condition, so a
row's draws do not depend on the other rows or on ``batch_size``. (The network's floating-point results can differ
in the last bits between batch shapes; with continuous noise that almost never changes a draw.)

The no-change cache (``no_change_cache``): MDLM (Sahoo et al. 2024) skips the network when a step changed nothing.
Our denoiser is conditioned on t_text, so MDLM's reuse of an output computed at an earlier time is an approximation
here. Instead, the default ``"exact"`` decides each step's random choices first
(:meth:`MaskedDiffusionScheduler.plan`: which positions unmask) and calls the network only for rows where the step
changes something, at the current time. A step that changes nothing reads no model output, so skipping it is
exact -- bit-identical to ``"off"``, which calls the network for every unfinished row at every step -- and it needs
no more calls than MDLM's rule: every call is followed by a change, so an output is never reusable. ``"mdlm"``
reproduces MDLM's rule (call when the row changed at the previous step, else reuse the last output, computed at an
earlier t) for comparison; it is not exact.
Measured (2026-11-26, CPU, a 2x128 RWKV-7 trained 1,500 steps on 3,000 corpus sentences, 20-token rows, 256
sentences, ancestral): model rows per sentence at 32 / 64 steps: off 30.9 / 61.3, exact 15.1 / 17.4 (same tokens
as off), mdlm 15.1 / 17.4 with 6.6% / 7.4% of sentences differing from the exact sampler (round-trip cosine of
the texts to their latents 0.524 / 0.525 vs 0.524): MDLM's reuse saves nothing here and is not exact.

Semi-autoregressive decoding (``block_size``): blocks left to right, each diffused with ``num_steps`` steps; the
model reads committed text at t = 0, the block at its t and (uncached) the rest at t = 1, all ``<mask>``. With
``use_cache`` (causal context only) the committed text is kept as RWKV state, each committed block read once
(``RWKVDenoiser.prefill`` continuing its own state), and each step runs only the block; otherwise every step re-reads
the whole row. The two give the
same tokens (tests/test_sampling.py). For ``twice``/``bidirectional`` contexts no state can be carried, so
``use_cache`` is ignored and the uncached path runs. Throughput (bench/bench_sampling.py, H200, fp32, fla WKV,
random L12 D768 V65536, 256 sentences of 32 tokens in one batch): 32 steps 158 sentences/s (no-change cache off:
120); blocks of 8 tokens x 8 steps with the state cache 237/s, re-reading the prefix 160/s (both with the no-change
cache off: 215 vs 121). At L6 D512 the state cache gains nothing (356 vs 363/s): the sampler's per-row generators
and float64 Gumbel noise, ~10 ms a step at batch 256, dominate there. The default decoder (one-token blocks, one
step each, guidance 0.5; H100, bf16, L12 D768, 2026-12-06): 87.5 sentences/s with the state cache, 101.8 without: at
32 tokens a one-token call costs what a whole-row call does on that GPU.

Self-reranking (``sample_l2t(candidates=K)``, :func:`rerank_l2t`): the model is also a text -> latent embedder, so
it can check its own decodes: K candidates per latent, kept is the one whose own T2L lands closest to the latent.
On the captions study (H200, 300 s of training) it lifted the argmax decode's round-trip cosine 0.927 -> 0.948 at 8
candidates; on a model whose T2L is weak it helps sampled decodes only (docs/RESULTS.md, 2026-11-27).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.metrics import cosine_rows
from rwkv_diffusion_rnn.models.rwkv_denoiser import PrefixCache
from rwkv_diffusion_rnn.samplers import (
    GaussianScheduler,
    MaskedDiffusionScheduler,
    RowGenerators,
    guided_log_probs,
    time_for_mask_fraction,
)
from rwkv_diffusion_rnn.sampling_inputs import (
    clean_ids,
    condition_text,
    eot_id,
    progress_bar,
    resolve_lengths,
    row_batches,
    run_device,
    standardised_latents,
)

__all__ = ["L2T_PRESET", "L2T_PRESETS", "NO_CHANGE_CACHE", "clean_ids", "condition_text", "rerank_l2t",
           "resolve_lengths", "sample_joint", "sample_l2t", "sample_t2l", "t2l_default_steps"]  # fmt: skip

NO_CHANGE_CACHE = ("exact", "off", "mdlm")
STREAM_TEXT, STREAM_UNCOND, STREAM_LATENT = 0, 1, 2

#: latent -> text unmasking rule by default: commit the most confident drawn tokens first. On the offline demo's
#: checkpoint (200 held-out rows, docs/RESULTS.md 2026-11-27) it lifted the round-trip cosine from 0.668 (ancestral)
#: to 0.792 and retrieval top-1 from 0.69 to 0.85 at 16-64 steps. Joint samples keep "ancestral" (not measured).
L2T_STRATEGY = "confidence"

#: Named latent -> text decoders (keyword arguments of :func:`sample_l2t`). "faithful" is sample_l2t's own
#: defaults: the decode closest to the latent (module docstring). "varied": sampled text, different per seed.
L2T_PRESETS: dict[str, dict] = {
    "faithful": dict(num_steps=1, strategy=L2T_STRATEGY, temperature=0.0, guidance_scale=0.5, block_size=1),
    "varied": dict(num_steps=32, strategy=L2T_STRATEGY, temperature=1.0, guidance_scale=0.0, block_size=None),
}
L2T_PRESET = "faithful"


# ------------------------------------------------------------------------------------------- text (L2T)
@dataclass
class _Cond:
    z: torch.Tensor  # [B, D] standardised latent fed to the denoiser
    t_latent: torch.Tensor  # [B]


def _text_scheduler(m, strategy, temperature, top_p, threshold, num_steps) -> MaskedDiffusionScheduler:
    sched = MaskedDiffusionScheduler(m.text.schedule, m.denoiser.mask_id, strategy, temperature, top_p, threshold)
    sched.set_timesteps(num_steps)
    return sched


def _model_time(sched: MaskedDiffusionScheduler, t, masked: torch.Tensor, n_gen: torch.Tensor) -> torch.Tensor:
    """t_text fed to the denoiser, ``[B]``: the grid time; for ``threshold`` (whose masked share leaves the
    schedule) the time whose expected masked share equals the row's actual one, as training paired them."""
    if sched.strategy != "threshold":
        return torch.full((masked.shape[0],), float(t), device=masked.device)
    frac = masked.sum(1).double() / n_gen.clamp_min(1).double()
    return time_for_mask_fraction(sched.schedule, frac).float()


def _window_hidden(den, c: _Cond, seq, attn, r, a: int, b: int, t_r, cache, blocked: bool) -> torch.Tensor:
    """Hidden states ``[len(r), b - a, C]`` of window ``[a, b)`` for rows ``r``."""
    if cache is not None:  # semi-AR with the committed prefix kept as RWKV state
        state = cache.state.index_select(r) if cache.state is not None else None
        last = cache.last_hidden[r] if cache.last_hidden is not None else None
        return den.forward_cached(PrefixCache(state, last), seq[r, a:b], c.z[r], t_r, c.t_latent[r]).text_hidden
    if blocked:  # committed text at t = 0, the block at t, the rest (all <mask>) at t = 1
        pos = torch.arange(seq.shape[1], device=seq.device)[None]
        t_text = torch.where(pos < a, 0.0, torch.where(pos < b, t_r[:, None], 1.0))
    else:
        t_text = t_r
    return den(seq[r], attn[r], c.z[r], t_text, c.t_latent[r]).text_hidden[:, a:b]


def _denoise_text(den, sched, seq, attn, conds, scale, gens, block_size, use_cache, no_change_cache, bar) -> None:
    """Generate the ``<mask>`` positions of ``seq`` ``[B, L]`` in place (pad and given tokens stay)."""
    if no_change_cache not in NO_CHANGE_CACHE:
        raise DiffRwkvError(f"no_change_cache must be one of {NO_CHANGE_CACHE}; got {no_change_cache!r}")
    B, L = seq.shape
    mask_id = sched.mask_id
    blocked = block_size is not None
    cached = blocked and use_cache and den.cfg.context == "causal"
    if blocked and block_size < 1:
        raise DiffRwkvError(f"block_size must be >= 1, got {block_size}")
    windows = [(a, min(a + block_size, L)) for a in range(0, L, block_size)] if blocked else [(0, L)]
    caches, read = [None] * len(conds), 0  # the state cache, and how much of the row it has read
    for a, b in windows:
        n_gen = (seq[:, a:b] == mask_id).sum(1)
        if cached:  # the text committed since the last block, read once, continuing the state
            caches = [den.prefill(c.z, seq[:, read:a], c.t_latent, k) for c, k in zip(conds, caches, strict=True)]
            read = a
        store, dirty = None, torch.ones(B, dtype=torch.bool, device=seq.device)
        for t in sched.timesteps:
            win = seq[:, a:b]
            masked = win == mask_id
            plan = sched.plan(t, win, gens)
            if no_change_cache == "exact":
                call, where = plan.rows, plan.need
            elif no_change_cache == "off":
                call, where = masked.any(1), plan.need
            else:
                call, where = masked.any(1) & dirty, masked
            t_model = _model_time(sched, t, masked, n_gen)
            log_probs = None
            if bool(call.any()):
                r = call.nonzero()[:, 0]
                logits = [
                    den.sampling_logits(_window_hidden(den, c, seq, attn, r, a, b, t_model[r], k, blocked)[where[r]])
                    for c, k in zip(conds, caches, strict=True)
                ]
                log_probs = guided_log_probs(logits[0], logits[1] if len(logits) > 1 else None, scale)
            if no_change_cache == "mdlm":
                if store is None:
                    store = torch.zeros(B, b - a, mask_id, device=seq.device)
                if log_probs is not None:
                    sel = torch.zeros_like(masked)
                    sel[r] = where[r]
                    store[sel] = log_probs
                log_probs = store[plan.need]
            if log_probs is None:
                log_probs = torch.zeros(0, mask_id, device=seq.device)
            out = sched.step(log_probs, t, win, gens, plan)
            dirty = (out.prev_sample != win).any(1)
            seq[:, a:b] = out.prev_sample
            if bar is not None:
                bar.update(1)


def _blank(lengths: Sequence[int], mask_id: int, pad_id: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """All-``<mask>`` rows of the given lengths, right-padded: ``(seq [B, L], attention_mask [B, L])``."""
    lens = torch.tensor(list(lengths), device=dev, dtype=torch.long)
    attn = (torch.arange(int(lens.max()) if len(lens) else 0, device=dev)[None] < lens[:, None]).long()
    seq = torch.where(attn.bool(), mask_id, pad_id)
    return seq, attn


@torch.no_grad()
def sample_l2t(
    m,
    latents: np.ndarray | torch.Tensor,
    *,
    length: int | Sequence[int] | None = None,
    num_steps: int = 1,
    strategy: str = L2T_STRATEGY,
    temperature: float = 0.0,
    top_p: float = 1.0,
    threshold: float = 0.9,
    guidance_scale: float = 0.5,
    block_size: int | None = 1,
    use_cache: bool = True,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    no_change_cache: str = "exact",
    progress: bool = False,
    candidates: int = 1,
    rerank_temperature: float | None = None,
    rerank_steps: int = 1,
    rerank_record: dict | None = None,
) -> list[list[int]]:
    """Latent -> text. ``latents``: RAW latents ``[N, D]`` (standardised here with ``m.normalizer``), fed clean
    (t_latent = 0). Returns N lists of token ids in the model's vocabulary, cut at the first end-of-text, with no
    pad / end-of-text / ``<mask>``. The defaults are the ``"faithful"`` decoder of :data:`L2T_PRESETS` (left to
    right, argmax, guidance 0.5); ``sample_l2t(m, z, **L2T_PRESETS["varied"])`` samples varied text instead.
    ``guidance_scale`` w: log-probs ``c + w (c - u)`` where the unconditional pass feeds a pure-noise latent at
    t_latent = 1 (0 = no guidance, no second pass; a model trained without condition dropout or unconditional rows
    wants 0). ``num_steps`` counts per block with ``block_size``. See the module docstring for ``block_size`` /
    ``use_cache`` / ``no_change_cache``; ``strategy``, ``temperature`` (0 = argmax), ``top_p``, ``threshold`` are
    :class:`~rwkv_diffusion_rnn.samplers.MaskedDiffusionScheduler`'s.

    ``candidates`` K > 1: self-reranking. Candidate 0 is this call's own text; candidates 1..K-1 are drawn with the
    same settings at ``rerank_temperature`` (default: ``temperature``, or 0.7 when that is 0 = argmax) and seeds
    ``seed + c`` (so a run with seed s and one with seed s + 1 share K - 2 candidates). Each row keeps the candidate
    whose text the model itself embeds (T2L, ``rerank_steps`` steps) closest in cosine to the row's latent
    (:func:`rerank_l2t`). Costs K decodes and K x ``rerank_steps`` T2L passes over the N rows; uses nothing but the
    model. ``rerank_record`` (a dict) receives ``candidates`` (K lists of N id lists), ``choice`` [N] and ``cosine``
    [K][N], for analysis."""
    if candidates < 1 or rerank_steps < 1:
        raise DiffRwkvError(f"candidates and rerank_steps must be >= 1; got {candidates} and {rerank_steps}")
    if candidates > 1:
        kw = dict(length=length, num_steps=num_steps, strategy=strategy, top_p=top_p, threshold=threshold,
                  guidance_scale=guidance_scale, block_size=block_size, use_cache=use_cache, batch_size=batch_size,
                  device=device, no_change_cache=no_change_cache, progress=progress)  # fmt: skip
        rt = rerank_temperature_for(temperature, rerank_temperature)
        cands = [sample_l2t(m, latents, temperature=temperature, seed=seed, **kw)]
        cands += [sample_l2t(m, latents, temperature=rt, seed=seed + c, **kw) for c in range(1, candidates)]
        choice, cos = rerank_l2t(m, latents, cands, num_steps=rerank_steps, batch_size=batch_size, seed=seed,
                                 device=device, progress=progress)  # fmt: skip
        if rerank_record is not None:
            rerank_record.update(candidates=cands, choice=choice.tolist(), cosine=cos.tolist())
        return [cands[int(c)][i] for i, c in enumerate(choice)]
    den = m.denoiser
    dev = run_device(m, device)
    z_all = standardised_latents(m, latents, dev)
    N, D = z_all.shape
    lengths = resolve_lengths(m, length, N)
    sched = _text_scheduler(m, strategy, temperature, top_p, threshold, num_steps)
    eot, mask_id = eot_id(m), int(den.mask_id)
    results: list[list[int]] = []
    per_batch = [
        1 if block_size is None else -(-max(lengths[i] for i in r) // block_size) for r in row_batches(N, batch_size)
    ]
    with progress_bar(progress, sum(per_batch) * num_steps, "latent->text") as bar:
        for rows in row_batches(N, batch_size):
            B = len(rows)
            seq, attn = _blank([lengths[i] for i in rows], mask_id, eot, dev)
            conds = [_Cond(z_all[rows], torch.zeros(B, device=dev))]
            if guidance_scale != 0:
                noise = RowGenerators(seed, rows, dev, STREAM_UNCOND).randn(D).float()
                conds.append(_Cond(noise, torch.ones(B, device=dev)))
            gens = RowGenerators(seed, rows, dev, STREAM_TEXT)
            _denoise_text(den, sched, seq, attn, conds, guidance_scale, gens, block_size, use_cache,
                          no_change_cache, bar)  # fmt: skip
            results += [clean_ids(seq[k, : lengths[i]].tolist(), eot, mask_id) for k, i in enumerate(rows)]
    return results


def rerank_temperature_for(temperature: float, rerank_temperature: float | None) -> float:
    """The temperature of candidates 2..K: ``rerank_temperature``, else ``temperature``, or 0.7 after argmax (0)."""
    rt = rerank_temperature if rerank_temperature is not None else (temperature if temperature > 0 else 0.7)
    if not (math.isfinite(rt) and rt > 0):
        raise DiffRwkvError(f"rerank temperature must be a finite number > 0 (argmax gives one candidate); got {rt}")
    return float(rt)


def rerank_l2t(
    m,
    latents: np.ndarray | torch.Tensor,
    candidates: Sequence[Sequence[Sequence[int]]],
    *,
    num_steps: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Pick, for each latent, the candidate text the model itself maps closest to it.

    ``latents`` RAW ``[N, D]``; ``candidates[c][i]``: candidate c's token ids (model vocabulary) for row i. Every
    candidate is embedded by :func:`sample_t2l` (``num_steps`` steps; 1 = the model's x0 prediction; row i starts
    from the same noise for every candidate), and compared with its row's latent by cosine in the raw latent space
    (where round-trip cosine is measured). Returns ``(choice [N] int, cosine [C, N] float32)``; ties go to the lower
    candidate index."""
    if isinstance(latents, torch.Tensor):
        z = latents.detach().to("cpu", torch.float32).numpy()
    else:
        z = np.asarray(latents, dtype=np.float32)
    if z.ndim != 2 or z.shape[1] != m.normalizer.dim:
        raise DiffRwkvError(f"latents must be [N, {m.normalizer.dim}]; got shape {list(z.shape)}")
    N = z.shape[0]
    if not candidates or any(len(c) != N for c in candidates):
        raise DiffRwkvError(
            f"rerank_l2t: expected candidate lists of {N} rows each; got {[len(c) for c in candidates]}"
        )
    # one call per candidate: row i of every candidate starts from the same noise, so only the text differs
    pred = np.stack([sample_t2l(m, cand, num_steps=num_steps, batch_size=batch_size, seed=seed, device=device,
                                progress=progress) for cand in candidates])  # fmt: skip
    cos = np.stack([cosine_rows(p, z) for p in pred]).astype(np.float32)
    return cos.argmax(0), cos


# ----------------------------------------------------------------------------------------- latent (T2L)
@torch.no_grad()
def sample_t2l(
    m,
    token_ids: Sequence[Sequence[int]],
    *,
    num_steps: int | None = None,
    method: str = "ddim",
    eta: float = 0.0,
    guidance_scale: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    clip_x0: float | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Text -> latent. ``token_ids``: N clean token-id lists (model vocabulary), fed at t_text = 0 in the training
    format (:func:`condition_text`). Returns RAW latents ``[N, D]`` float32. ``guidance_scale`` w combines the
    network outputs as ``c + w (c - u)``, u from all-``<mask>`` text at t_text = 1 (the eps / x0 / v conversions
    are affine with the same coefficients for both passes, so this is the same combination in every
    parameterisation). ``method``, ``eta``, ``clip_x0``: :class:`~rwkv_diffusion_rnn.samplers.GaussianScheduler`.
    ``num_steps`` None: :func:`t2l_default_steps`."""
    num_steps = t2l_default_steps(m) if num_steps is None else num_steps
    den = m.denoiser
    dev = run_device(m, device)
    ids_all, attn_all = condition_text(m, token_ids)
    N, D = ids_all.shape[0], m.normalizer.dim
    sched = GaussianScheduler(m.latent, method, eta, clip_x0)
    sched.set_timesteps(num_steps)
    out = np.zeros((N, D), dtype=np.float32)
    with progress_bar(progress, -(-N // batch_size) * num_steps, "text->latent") as bar:
        for rows in row_batches(N, batch_size):
            B = len(rows)
            attn = attn_all[rows].to(dev)
            T = max(int(attn.sum(1).max()), 1)
            ids, attn = ids_all[rows, :T].to(dev), attn[:, :T]
            uncond_ids = torch.where(attn.bool(), den.mask_id, ids)
            gens = RowGenerators(seed, rows, dev, STREAM_LATENT)
            z = gens.randn(D)  # float64 z_1: pure noise
            zeros, ones = torch.zeros(B, device=dev), torch.ones(B, device=dev)
            for t in sched.timesteps:
                t_lat = torch.full((B,), float(t), device=dev)
                pred = den(ids, attn, z.float(), zeros, t_lat).latent
                if guidance_scale != 0:
                    pred_u = den(uncond_ids, attn, z.float(), ones, t_lat).latent
                    pred = pred + guidance_scale * (pred - pred_u)
                z = sched.step(pred, t, z, gens).prev_sample
                if bar is not None:
                    bar.update(1)
            out[rows] = m.normalizer.denormalize(z).float().cpu().numpy()
    return out


def t2l_default_steps(m) -> int:
    """Text -> latent steps by default: 1 for a model that predicts x0 (one DDIM step from pure noise returns the
    network's posterior mean E[z0 | text], which beat 16-32 steps on cosine and STS-B: docs/RESULTS.md), else 32."""
    return 1 if getattr(getattr(m, "latent", None), "prediction", None) == "x0" else 32


# ---------------------------------------------------------------------------------------------- joint
@torch.no_grad()
def sample_joint(
    m,
    n: int,
    *,
    length: int | Sequence[int] | None = None,
    num_steps: int = 32,
    strategy: str = "ancestral",
    temperature: float = 1.0,
    top_p: float = 1.0,
    threshold: float = 0.9,
    method: str = "ddim",
    eta: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    clip_x0: float | None = None,
    progress: bool = False,
) -> tuple[list[list[int]], np.ndarray]:
    """Text and latent together from noise: both clocks run 1 -> 0 on one grid and one network call per step feeds
    both schedulers. Returns (N clean id lists, RAW latents ``[N, D]`` float32)."""
    den = m.denoiser
    dev = run_device(m, device)
    lengths = resolve_lengths(m, length, n)
    tsched = _text_scheduler(m, strategy, temperature, top_p, threshold, num_steps)
    lsched = GaussianScheduler(m.latent, method, eta, clip_x0)
    lsched.set_timesteps(num_steps)
    eot, mask_id, D = eot_id(m), int(den.mask_id), m.normalizer.dim
    texts: list[list[int]] = []
    latents = np.zeros((n, D), dtype=np.float32)
    with progress_bar(progress, -(-n // batch_size) * num_steps, "joint") as bar:
        for rows in row_batches(n, batch_size):
            B = len(rows)
            seq, attn = _blank([lengths[i] for i in rows], mask_id, eot, dev)
            n_gen = (seq == mask_id).sum(1)
            tg, lg = RowGenerators(seed, rows, dev, STREAM_TEXT), RowGenerators(seed, rows, dev, STREAM_LATENT)
            z = lg.randn(D)
            for t in tsched.timesteps:
                plan = tsched.plan(t, seq, tg)
                t_text = _model_time(tsched, t, seq == mask_id, n_gen)
                out = den(seq, attn, z.float(), t_text, torch.full((B,), float(t), device=dev))
                log_probs = torch.log_softmax(den.sampling_logits(out.text_hidden[plan.need]).float(), dim=-1)
                seq = tsched.step(log_probs, t, seq, tg, plan).prev_sample
                z = lsched.step(out.latent, t, z, lg).prev_sample
                if bar is not None:
                    bar.update(1)
            texts += [clean_ids(seq[k, : lengths[i]].tolist(), eot, mask_id) for k, i in enumerate(rows)]
            latents[rows] = m.normalizer.denormalize(z).float().cpu().numpy()
    return texts, latents
