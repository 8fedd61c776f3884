"""The diffusion variants of the captions harness (``bench/captions_run.py``): each run is the project defaults with
ONE change (``diffusion_config``), trained through the project's Trainer (``train_step()``; only the scheduler is
swapped for the budget's time-based one and, for ``sequential``, the phase is set before each step), so it is the
code users run; then evaluated on the validation split (:func:`run_diffusion`).

Evaluation ("caption-1" of image i is validation row i):

* text NELBO in bits/token with the latent given (``evaluate.likelihood_metrics``: fixed noise, ELBO weighting,
  condition dropout off) on all 5 captions of every image, and again with each row given the next image's latent
  (the difference is what the model reads from the latent);
* L2T from every caption-1 latent with each ``--l2t-decoders`` item (default: the project's sampler, i.e.
  confidence decoding, ``--sample-steps`` 32, no guidance);
* T2L (DDIM, ``--t2l-steps``, default ``--sample-steps``) for every caption-1 and every STS-B sentence, and with
  ``--t2l-spell-unseen`` again with unseen tokens spelled with seen ones.

The pretrained variants (``frozen``, ``lmhead``, ``lora``, ``unfreeze``, ``full``) run the same way on
``--backbone FILE.pth`` with the World vocabulary (docs/pretrained.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from captions_common import (
    Eval,
    RunError,
    TimeCosineLR,
    budget_of,
    budget_text,
    finite_or_none,
    make_clock,
    say,
    texts,
    to_world,
    train_for_budget,
)

DIFFUSION = ("causal", "twice", "bidirectional", "sequential", "uniform", "elbo", "eps", "v", "x0", "l2t", "prefix")
# on a pretrained backbone (--backbone FILE, World vocabulary): how the user adapts it (docs/pretrained.md)
PRETRAINED = ("frozen", "lmhead", "lora", "unfreeze", "full")


# --------------------------------------------------------------------------------- the decoders and the config
def l2t_decoders(args) -> list[tuple[str, int, float, int | None, float, int, float | None]]:
    """``--l2t-decoders`` as (strategy, steps, guidance, block size, temperature, candidates, rerank temperature)
    tuples; the default is the project sampler at ``--sample-steps`` without guidance, all positions at once,
    temperature 1, one candidate. An item is ``STRATEGY:STEPS`` followed, in any order, by optional ``gW``
    (classifier-free guidance scale W), ``bN`` (semi-autoregressive blocks of N tokens, STEPS steps each, the
    committed prefix kept as RWKV state in causal context), ``tX`` (sampling temperature X; t0 = argmax), ``rK``
    (self-reranking among K candidates by the model's own text -> latent, ``sample_l2t(candidates=K)``) and ``sX``
    (temperature of candidates 2..K; default the sampler's): ``confidence:16:g1``, ``confidence:1:b1:t0``
    (strictly left to right, greedy, one token per model call), ``confidence:1:b1:t0:g1:r8:s0.7``."""
    from rwkv_diffusion_rnn.sampling import L2T_STRATEGY

    spec = (args.l2t_decoders or "").strip()
    if not spec:
        return [(L2T_STRATEGY, args.sample_steps, 0.0, None, 1.0, 1, None)]
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        strategy, steps = parts[0], parts[1] if len(parts) > 1 else ""
        opts = {p[:1]: p[1:] for p in parts[2:]}
        ok = strategy in ("ancestral", "confidence", "threshold") and steps.isdigit() and int(steps) >= 1
        ok = ok and len(opts) == len(parts) - 2 and set(opts) <= {"g", "b", "t", "r", "s"}
        w, block, temp, k, rtemp = 0.0, None, 1.0, 1, None
        try:
            w, temp = float(opts.get("g", "0")), float(opts.get("t", "1"))
            block = int(opts["b"]) if "b" in opts else None
            k = int(opts.get("r", "1"))
            rtemp = float(opts["s"]) if "s" in opts else None
        except ValueError:
            ok = False
        bad_rerank = k < 1 or (rtemp is not None and (not rtemp > 0 or k < 2))
        finite = all(math.isfinite(x) for x in (w, temp, 1.0 if rtemp is None else rtemp))
        if not ok or not finite or w < 0 or temp < 0 or (block is not None and block < 1) or bad_rerank:
            raise SystemExit(
                f"--l2t-decoders: bad item {item!r}; expected STRATEGY:STEPS[:gW][:bN][:tX][:rK][:sX], e.g. "
                "confidence:16:g1 (K >= 1; sX > 0 only with K >= 2)"
            )
        out.append((strategy, int(steps), w, block, temp, k, rtemp))
    return out


def decoder_name(
    strategy: str,
    steps: int,
    guidance: float,
    block: int | None = None,
    temperature: float = 1.0,
    candidates: int = 1,
    rerank_temperature: float | None = None,
) -> str:
    name = f"{strategy}{steps}" + (f"-g{guidance:g}" if guidance else "") + (f"-b{block}" if block else "")
    name += f"-t{temperature:g}" if temperature != 1.0 else ""
    name += f"-r{candidates}" if candidates > 1 else ""
    return name + (f"-s{rerank_temperature:g}" if rerank_temperature is not None else "")


def parse_overrides(items: list[str] | None) -> list[tuple[str, str, object]]:
    """``--set SECTION.KEY=VALUE`` items as (section, key, value), checked against TrainConfig's fields; VALUE is
    read as JSON when it parses (numbers, true/false, lists), else kept as a string."""
    from rwkv_diffusion_rnn.config import TrainConfig

    cfg, out = TrainConfig(), []
    for item in items or []:
        key, eq, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not hasattr(cfg, section) or not hasattr(getattr(cfg, section), name):
            raise RunError(
                f"--set {item!r}: expected SECTION.KEY=VALUE with a TrainConfig key, e.g. model.latent_prefix_len=4"
            )
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out.append((section, name, value))
    return out


def diffusion_config(variant: str, args: argparse.Namespace, train_pack: Path, save_dir: Path):
    from rwkv_diffusion_rnn.config import TrainConfig

    cfg = TrainConfig()
    m, d, t, lg, dc = cfg.model, cfg.data, cfg.training, cfg.logging, cfg.diffusion
    m.rwkv_name, m.n_layer, m.n_embd, m.vocab, m.freeze_backbone = "scratch", args.n_layer, args.n_embd, "data", False
    d.json_path, d.token_dir, d.latent_dir = None, str(train_pack), ""
    d.pad_to_length, d.max_length = args.length, args.length
    t.dtype, t.train_batch_size, t.eval_batch_size = args.dtype, args.batch, args.eval_batch
    t.lr, t.warmup_steps, t.min_lr_ratio, t.seed, t.device = args.lr, args.warmup_steps, 0.1, args.seed, args.device
    t.max_steps = 10**9  # the budget decides; the Trainer's own step-based schedule is replaced
    t.compile_blocks = t.cuda_graphs = args.fast
    d.device_cache = args.fast  # batches indexed on the GPU, as the baselines' are (no host collation per step)
    lg.save_dir, lg.progress, lg.tensorboard = str(save_dir), False, False
    if variant in ("twice", "bidirectional"):
        m.context = variant
    elif variant == "sequential":
        t.loss_type, t.sequential_schedule = "sequential", ["l2t:0"]
    elif variant in ("uniform", "elbo"):
        dc.text_weighting = variant
    elif variant == "l2t":
        t.loss_type = "l2t"
    elif variant == "prefix":
        dc.clean_prefix = 0.5
    elif variant in ("eps", "v", "x0"):
        dc.latent_prediction = variant
    elif variant in PRETRAINED:
        if not args.backbone:
            raise RunError(f"variant {variant!r} adapts a pretrained backbone: give --backbone FILE.pth")
        m.rwkv_name, m.vocab, m.freeze_backbone = args.backbone, "full", variant != "full"
        t.chunked_ce = args.fast  # the 65,536-way head: no [N, V] logits kept
        if variant == "lmhead":
            m.use_rwkv_lm_head = True
        elif variant == "lora":
            m.lora_rank = args.lora_rank
            t.cuda_graphs = False  # LoRA's adapters sit outside the graphed blocks (config.validate refuses both)
        elif variant == "unfreeze":
            m.unfreeze_patterns, m.unfreeze_after_steps = ["blocks.*"], args.unfreeze_after
    elif variant != "causal":
        raise RunError(f"unknown diffusion variant {variant!r}")
    for section, name, value in parse_overrides(args.set):
        setattr(getattr(cfg, section), name, value)
    return cfg


def vocab_text(tm) -> str:
    return f"compact vocabulary {tm.size}" if tm is not None else "World vocabulary (65,536)"


# ---------------------------------------------------------------------------------------- training and evaluation
class OtherLatent(torch.utils.data.Dataset):
    """The rows of ``base``, each with the next row's latent (the last with the first's): validation rows list the
    images in order, so the neighbour is another image. The likelihood with the wrong latent minus the likelihood with
    the right one is the information the model reads from the latent, in bits per token."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        row = dict(self.base[i])
        row["latent"] = self.base[(i + 1) % len(self.base)]["latent"]
        return row


def _as_loaded(trainer):
    """The trained denoiser in eval mode, shaped like ``pipeline.load_trained``'s result for the samplers and the
    evaluation (the unknown id banned from generation)."""
    tm = trainer.token_map
    den = trainer.model.eval()
    den.sample_banned_ids = (tm.unk,) if tm is not None else ()
    return SimpleNamespace(
        denoiser=den,
        text=trainer.objective.text,
        latent=trainer.objective.latent,
        normalizer=trainer.normalizer,
        tokenizer=SimpleNamespace(eot_id=0, pad_id=0),
        config=trainer.cfg,
        step=trainer.step,
        path=None,
        token_map=tm,
    )


def _likelihood(m, trainer, ev: Eval, args, dev: str) -> dict:
    """``evaluate.likelihood_metrics`` on the validation rows (5 per evaluated image), and the text NELBO again with
    each row given another image's latent (:class:`OtherLatent`): ``latent_info_bits`` is the difference."""
    from rwkv_diffusion_rnn.evaluate import likelihood_metrics

    val_rows = trainer.val_set
    if args.eval_limit:
        from torch.utils.data import Subset

        val_rows = Subset(trainer.val_set, range(min(len(trainer.val_set), 5 * ev.n_img)))
    lik = likelihood_metrics(m, val_rows, batch_size=args.eval_batch, device=dev, seed=args.seed)
    wrong = likelihood_metrics(m, OtherLatent(val_rows), batch_size=args.eval_batch, device=dev, seed=args.seed)
    lik["val_text_nelbo_bits_other_latent"] = wrong["val_text_nelbo_bits"]
    lik["latent_info_bits"] = wrong["val_text_nelbo_bits"] - lik["val_text_nelbo_bits"]
    return lik


def _decode_l2t(m, ev: Eval, args, tok, dev: str) -> dict[str, dict]:
    """Every ``--l2t-decoders`` item from the caption-1 latents: ``{decoder name: {world_ids, texts, seconds}}``,
    plus ``rerank`` (every candidate in World ids, the model's choice and its cosines) for a reranking decoder."""
    from rwkv_diffusion_rnn.sampling import sample_l2t

    tm, decoded = m.token_map, {}
    for dec in l2t_decoders(args):
        strategy, steps, guidance, block, temperature, k, rtemp = dec
        t_dec = time.perf_counter()
        rec: dict = {}
        ids = sample_l2t(
            m,
            ev.val_latents,
            num_steps=steps,
            strategy=strategy,
            guidance_scale=guidance,
            block_size=block,
            temperature=temperature,
            batch_size=args.eval_batch,
            seed=args.seed,
            device=dev,
            candidates=k,
            rerank_temperature=rtemp,
            rerank_record=rec,
        )  # reranking uses sample_l2t's 1 T2L step
        w = to_world(tm, ids)
        decoded[decoder_name(*dec)] = {
            "world_ids": w,
            "texts": texts(tok, w),
            "seconds": round(time.perf_counter() - t_dec, 1),
        }
        if rec:  # self-reranking: every candidate (World ids), the model's choice and its cosines, for the scorer
            decoded[decoder_name(*dec)]["rerank"] = {
                "candidates": [to_world(tm, c) for c in rec["candidates"]],
                "choice": rec["choice"],
                "self_cosine": [[round(x, 5) for x in row] for row in rec["cosine"]],
            }
    return decoded


def run_diffusion(
    variant: str, args, train_pack: Path, ev: Eval, work: Path, tok, vocab, shared: dict
) -> tuple[dict, np.ndarray]:
    """Train and evaluate one diffusion variant; ``vocab``: the bundle's compact vocabulary (the Trainer's must
    agree), ``shared``: the settings every run records. Returns (the run's JSON, its T2L predictions)."""
    from rwkv_diffusion_rnn.improved_trainer import Trainer
    from rwkv_diffusion_rnn.sampling import sample_t2l

    cfg = diffusion_config(variant, args, train_pack, work / f"trainer_{variant}")
    trainer = Trainer(cfg)
    tm = trainer.token_map
    if tm is not None and tm.vocab_ids != vocab.vocab_ids:  # the baselines build theirs from the bundle: agree
        raise RunError(f"the Trainer's compact vocabulary ({tm.size} ids) differs from the bundle's ({vocab.size})")
    clock, budget = make_clock(args.budget_steps), budget_of(args)
    trainer.scheduler = TimeCosineLR(trainer.optimizer, args.lr, args.warmup_steps, budget, 0.1, clock)
    phases: list[dict] = []

    def before_step(step: int) -> None:  # sequential: the phase follows the budget's elapsed share
        if variant != "sequential":
            return
        frac = clock.elapsed() / budget
        mode = "l2t" if frac < 1 / 3 else "t2l" if frac < 2 / 3 else "mixed"
        if not phases or phases[-1]["mode"] != mode:
            phases.append({"mode": mode, "from_step": step, "t": round(clock.elapsed(), 2)})
            trainer.cfg.training.sequential_schedule = [f"{mode}:0"]

    n_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    say(
        f"{variant}: {n_params:,} trainable parameters, {vocab_text(tm)}, {len(trainer.train_set):,} "
        f"rows; training for {budget_text(args)}"
    )
    tr = train_for_budget(
        trainer.train_step,
        budget,
        clock,
        untimed_steps=args.untimed_steps,
        before_step=before_step,
        log=lambda s: say(f"{variant}: {s}"),
    )
    say(
        f"{variant}: {tr['steps']} steps ({tr['timed_steps']} in {tr['train_s']:.1f} s, "
        f"warm-up {tr['warmup_s']:.1f} s); last loss {tr['last'].get('loss', float('nan')):.4f}"
    )

    m, dev = _as_loaded(trainer), str(trainer.device)
    t1 = time.perf_counter()
    lik = _likelihood(m, trainer, ev, args, dev)
    t_lik = time.perf_counter() - t1
    say(
        f"{variant}: val NELBO {lik['val_text_nelbo_bits']:.4f} bits/token (uniform {lik['uniform_bits']:.2f}), "
        f"latent MSE {lik['val_latent_mse']:.4f} (trivial {lik['trivial_latent_mse']:.4f}); with another image's "
        f"latent {lik['val_text_nelbo_bits_other_latent']:.4f} bits/token [{t_lik:.0f} s]"
    )
    t1 = time.perf_counter()
    decoded = _decode_l2t(m, ev, args, tok, dev)
    t_l2t = time.perf_counter() - t1
    world = next(iter(decoded.values()))["world_ids"]

    def t2l_of(inputs: list[list[int]]) -> np.ndarray:
        return sample_t2l(m, inputs, num_steps=args.t2l_steps or args.sample_steps, batch_size=args.eval_batch,
                          seed=args.seed, device=dev)  # fmt: skip

    t1 = time.perf_counter()
    pred = t2l_of(ev.t2l_inputs(tm))
    t_t2l = time.perf_counter() - t1
    t2l = ev.t2l_metrics(pred)
    say(
        f"{variant}: L2T {len(world)} rows in {t_l2t:.0f} s; T2L {pred.shape[0]} rows in {t_t2l:.0f} s: cosine "
        f"{t2l['val_cosine']}, STS-B Spearman {t2l['stsb_spearman']}"
    )
    spelled = None
    if args.t2l_spell_unseen and tok is not None:  # the same T2L, unseen ids spelled with seen ones
        spelled = t2l_of(ev.t2l_inputs(tm, tok.token_bytes))
        t2l_sp = ev.t2l_metrics(spelled)
        say(
            f"{variant}: T2L with unseen tokens spelled: cosine {t2l_sp['val_cosine']}, STS-B {t2l_sp['stsb_spearman']}"
        )
    shown = texts(tok, world)
    if shown:
        for i in range(min(3, len(shown))):
            say(f"{variant}:   L2T[{i}] {shown[i]!r}")
    result = {
        "variant": variant,
        "kind": "diffusion",
        "config": {"train_config": dataclasses.asdict(cfg), "shared": shared},
        "model": {
            "trainable_params": n_params,
            "vocab_size": tm.size if tm is not None else 65536,
            "backbone": trainer.backbone_ref,
        },  # fmt: skip
        "train": {
            **tr,
            "budget_s": args.budget_s,
            "budget_steps": args.budget_steps,
            "phases": phases,
            "rows_seen": tr["steps"] * args.batch,
            "epochs": tr["steps"] * args.batch / len(trainer.train_set),
            "skipped": trainer.skipped,
        },
        "eval": {
            "likelihood": lik,
            "nelbo_bits": finite_or_none(lik["val_text_nelbo_bits"]),
            "latent_info_bits": finite_or_none(lik["latent_info_bits"]),
            "likelihood_s": round(t_lik, 1),
            "l2t_s": round(t_l2t, 1),
            "t2l_s": round(t_t2l, 1),
        },
        "l2t": decoded,
        "t2l": t2l,
    }
    if spelled is not None:  # main() saves the array beside the plain T2L's
        result["t2l_spelled"], result["_t2l_spelled_pred"] = t2l_sp, spelled
    return result, pred
