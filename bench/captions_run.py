"""Issue #7, step 2 (GPU): train one design per run for a FIXED wall-clock budget on the Flickr30k captions bundle,
then evaluate it on the validation images. Several runs per invocation, one after another in this process; each
run's results are written (and the optional tar rewritten) as soon as it finishes, so a time-out loses only the
run in progress.

    python bench/captions_run.py --variants causal,twice,bidirectional --budget-s 100 \\
        --data .device/captions/bundle --out /tmp/cap --tar $OUT/captions_1.tar --deadline-s 560 --device cuda

Variants (every diffusion variant is the project defaults — ``causal`` context, ``x0`` latent target (``eps``
before 2026-11-27), uniform text weighting (ELBO before session 4 of 2026-11-27), ``mixed`` modes with the default
weights, p_uncond 0.1 — with ONE thing changed; ``causal`` is the defaults themselves):

============== =======================================================================================
causal         defaults (model.context=causal)
twice          model.context=twice (the sequence read twice; 2x cost per step, so fewer steps in the budget)
bidirectional  model.context=bidirectional
sequential     training.loss_type=sequential: l2t for the first third of the budget, t2l the second, mixed last
uniform        diffusion.text_weighting=uniform (plain masked CE; the default since it won this comparison, so today
               the same as ``causal``: kept so the older tables' commands still run)
elbo           diffusion.text_weighting=elbo (the MDLM 1/t weights, the default before session 4 of 2026-11-27)
prefix         diffusion.clean_prefix=0.5: half the text rows clean up to a random boundary (semi-autoregressive
               decoding in-distribution; score it with ``bN`` decoders)
l2t            training.loss_type=l2t: a latent -> text decoder only, like baseline (a) (its T2L is untrained: the
               diagnostic of how much of the gap to the AR decoder the other tasks' share of the batch explains)
eps / v / x0   diffusion.latent_prediction=eps / v / x0 (the default is x0 since 2026-11-27, when it won this
               comparison; the first table in docs/RESULTS.md was run with the eps default, so its ``causal`` row
               is today's ``eps``)
frozen         --backbone FILE.pth (a pretrained RWKV-7, World vocabulary), model.freeze_backbone=true, fresh head
lmhead         the same with model.use_rwkv_lm_head=true
lora           the same with model.lora_rank=--lora-rank (no CUDA graphs: the adapters sit outside the graphed blocks)
unfreeze       the same, every block unfrozen at step --unfreeze-after (embeddings stay frozen)
full           --backbone FILE.pth with model.freeze_backbone=false (docs/pretrained.md)
ar             baseline (a): autoregressive decoder with a latent prefix, greedy + beam search (captions_baselines)
regress        baseline (b): mean-pooled encoder + MLP regressing the latent (captions_baselines)
============== =======================================================================================

Every run: a new RWKV-7 (default L6 D512, compact vocabulary of the training ids), batch 256, peak lr 1e-3 with
100 warm-up steps and a cosine over the budget's wall clock to 0.1 x (captions_common), AdamW (wd 0.01, betas
0.9/0.99), clip 1.0, bf16 autocast with fp32 master weights, rows of 40 tokens (text cut to 39, then end-of-text).
Diffusion runs go through the project's Trainer (``train_step()``; the script only swaps in the time-based schedule
and, for ``sequential``, sets the phase), so they are the code users run.

Evaluation (validation split: 1014 images x 5 captions; "caption-1" of image i is validation row i):

* diffusion: text NELBO in bits/token with the latent given (``evaluate.likelihood_metrics``: fixed noise, ELBO
  weighting, condition dropout off) on all 5 x 1014 rows; L2T with the project's sampler defaults (confidence since
  2026-11-27 session 2, ancestral before; ``--sample-steps`` 32, no guidance) from every caption-1 latent; T2L
  (DDIM, 32 steps) for every caption-1 and every STS-B sentence;
* ar: exact NLL in bits/token on the same rows and positions; greedy and beam-4 decoding from caption-1 latents.
  It overfits within minutes (26 passes over the captions in 300 s on an H200): ``--ar-early-stop X`` validates it
  every X budget seconds on captions 2-5 outside the clock and evaluates its best weights (:class:`EarlyStop`);
* regress: its prediction for the same T2L inputs.

Output (``--out``; ``--tar`` rewrites one tar of it after every run): ``<variant>.json`` (config, steps, times,
loss curve, likelihood, generated ids in World ids per decoder, decoded texts when the tokenizer is installed,
T2L cosine to the true latents and STS-B Spearman as computed here), ``<variant>_t2l.npy`` (float32 [n_val + 2 x
pairs, 32]: caption-1 predictions, then STS-B sentence-1s, then sentence-2s, raw latent space), ``log.txt``,
``summary.json``. Score them on the CPU with ``bench/captions_score.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import tarfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from captions_common import (  # noqa: E402
    TimeCosineLR,
    compact_vocab,
    finite_or_none,
    fixed_rows,
    id_lists,
    make_clock,
    materialize_packs,
    to_world,
    train_for_budget,
    write_json_atomic,
)

DIFFUSION = ("causal", "twice", "bidirectional", "sequential", "uniform", "elbo", "eps", "v", "x0", "l2t", "prefix")
# on a pretrained backbone (--backbone FILE, World vocabulary): how the user adapts it (docs/pretrained.md)
PRETRAINED = ("frozen", "lmhead", "lora", "unfreeze", "full")
BASELINES = ("ar", "regress")
VARIANTS = DIFFUSION + PRETRAINED + BASELINES
_T0 = time.perf_counter()
_LOG: list[Path] = []


class RunError(Exception):
    """A one-line, user-facing problem with the arguments or the data."""


def say(msg: str) -> None:
    line = f"[captions_run {time.perf_counter() - _T0:6.0f}s] {msg}"
    print(line, flush=True)
    for p in _LOG:
        with open(p, "a") as f:
            f.write(line + "\n")


# --------------------------------------------------------------------------------------------- shared settings
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


def budget_of(args: argparse.Namespace) -> float:
    """The training budget in its unit: timed steps with ``--budget-steps``, else seconds."""
    return float(args.budget_steps) if args.budget_steps > 0 else float(args.budget_s)


def budget_text(args: argparse.Namespace) -> str:
    return f"{args.budget_steps} steps" if args.budget_steps > 0 else f"{args.budget_s:.0f} s"


def settings(args: argparse.Namespace) -> dict:
    """The hyperparameters every run shares (recorded in each result)."""
    return {
        "n_layer": args.n_layer,
        "n_embd": args.n_embd,
        "batch": args.batch,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "min_lr_ratio": 0.1,
        "weight_decay": 0.01,
        "betas": [0.9, 0.99],
        "max_grad_norm": 1.0,
        "dtype": args.dtype,
        "fast": args.fast,
        "l2t_decoders": [decoder_name(*d) for d in l2t_decoders(args)],
        "length": args.length,
        "budget_s": args.budget_s,
        "budget_steps": args.budget_steps,
        "untimed_steps": args.untimed_steps,
        "seed": args.seed,
        "sample_steps": args.sample_steps,
        "t2l_steps": args.t2l_steps or args.sample_steps,
        "beams": args.beams,
        "ar_prefix": args.ar_prefix,
        "ar_early_stop": args.ar_early_stop,
        "regress_loss": args.regress_loss,
        "vocab": "data (compact)" if not args.backbone else "data (compact) for new backbones, World for --backbone",
        "backbone": args.backbone,
        "lora_rank": args.lora_rank,
        "unfreeze_after": args.unfreeze_after,
    }


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


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _tokenizer():
    try:
        from rwkv_diffusion_rnn.tokenizer import load_tokenizer

        return load_tokenizer("rwkv-world")
    except Exception as exc:  # decoding here is a convenience: the scorer decodes the World ids itself
        say(f"no tokenizer here ({type(exc).__name__}: {exc}); writing ids only")
        return None


def _texts(tok, world_rows: list[list[int]]) -> list[str] | None:
    return None if tok is None else [tok.decode(r) for r in world_rows]


class Eval:
    """The evaluation inputs, in World ids and raw latents (shared by every run)."""

    def __init__(self, bundle: dict, args: argparse.Namespace) -> None:
        n_img = int(bundle["meta"]["counts"]["val_images"])
        self.n_img = min(n_img, args.eval_limit) if args.eval_limit else n_img
        pairs = int(bundle["meta"]["counts"]["stsb_pairs"])
        self.pairs = min(pairs, args.eval_limit) if args.eval_limit else pairs
        self.val_latents = np.array(bundle["val_latents"][: self.n_img], dtype=np.float32)  # a writable copy
        self.val_tokens, self.val_offsets = np.asarray(bundle["val_tokens"]), np.asarray(bundle["val_offsets"])
        self.sts_tokens, self.sts_offsets = np.asarray(bundle["stsb_tokens"]), np.asarray(bundle["stsb_offsets"])
        self.sts_scores = np.asarray(bundle["stsb_scores"][: self.pairs], dtype=np.float64)
        self.sts_rows = list(range(self.pairs)) + list(range(pairs, pairs + self.pairs))  # s1 ..., then s2 ...

    def t2l_inputs(self, token_map, spell=None) -> list[list[int]]:
        """Model-id lists: caption-1 of each image, then the STS-B sentence-1s, then the sentence-2s (``spell``: the
        World byte table, to spell unseen ids with seen ones, ``TokenMap.spell``)."""
        val = id_lists(self.val_tokens, self.val_offsets, token_map, self.n_img, spell)
        sts_all = id_lists(self.sts_tokens, self.sts_offsets, token_map, spell=spell)
        return val + [sts_all[i] for i in self.sts_rows]

    def t2l_fixed(self, token_map, length: int) -> tuple[np.ndarray, np.ndarray]:
        lists = self.t2l_inputs(token_map)
        flat = np.array([i for r in lists for i in r], dtype=np.int64)
        off = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in lists], out=off[1:])
        return fixed_rows(flat, off, length)  # already model ids

    def t2l_metrics(self, pred: np.ndarray) -> dict:
        from rwkv_diffusion_rnn import metrics as M

        val = pred[: self.n_img]
        s1, s2 = pred[self.n_img : self.n_img + self.pairs], pred[self.n_img + self.pairs :]
        cos, half = M.mean_and_halfwidth(M.cosine_rows(val, self.val_latents))
        rho = M.spearman(M.cosine_rows(s1, s2), self.sts_scores) if self.pairs > 1 else float("nan")
        return {
            "val_cosine": finite_or_none(cos),
            "val_cosine_ci95": finite_or_none(half),
            "stsb_spearman": finite_or_none(rho),
            "rows": {"val": self.n_img, "stsb_pairs": self.pairs},
        }


# ------------------------------------------------------------------------------------------------- diffusion
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


def run_diffusion(variant: str, args, train_pack: Path, ev: Eval, work: Path, tok, vocab) -> tuple[dict, np.ndarray]:
    from rwkv_diffusion_rnn.evaluate import likelihood_metrics
    from rwkv_diffusion_rnn.improved_trainer import Trainer
    from rwkv_diffusion_rnn.sampling import sample_l2t, sample_t2l

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

    den = trainer.model.eval()
    den.sample_banned_ids = (tm.unk,) if tm is not None else ()
    m = SimpleNamespace(
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
    dev = str(trainer.device)
    t1 = time.perf_counter()
    val_rows = trainer.val_set
    if args.eval_limit:
        from torch.utils.data import Subset

        val_rows = Subset(trainer.val_set, range(min(len(trainer.val_set), 5 * ev.n_img)))
    lik = likelihood_metrics(m, val_rows, batch_size=args.eval_batch, device=dev, seed=args.seed)
    wrong = likelihood_metrics(m, OtherLatent(val_rows), batch_size=args.eval_batch, device=dev, seed=args.seed)
    lik["val_text_nelbo_bits_other_latent"] = wrong["val_text_nelbo_bits"]
    lik["latent_info_bits"] = wrong["val_text_nelbo_bits"] - lik["val_text_nelbo_bits"]
    t_lik = time.perf_counter() - t1
    say(
        f"{variant}: val NELBO {lik['val_text_nelbo_bits']:.4f} bits/token (uniform {lik['uniform_bits']:.2f}), "
        f"latent MSE {lik['val_latent_mse']:.4f} (trivial {lik['trivial_latent_mse']:.4f}); with another image's "
        f"latent {wrong['val_text_nelbo_bits']:.4f} bits/token [{t_lik:.0f} s]"
    )
    t1 = time.perf_counter()
    decoded: dict[str, dict] = {}
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
            "texts": _texts(tok, w),
            "seconds": round(time.perf_counter() - t_dec, 1),
        }
        if rec:  # self-reranking: every candidate (World ids), the model's choice and its cosines, for the scorer
            decoded[decoder_name(*dec)]["rerank"] = {
                "candidates": [to_world(tm, c) for c in rec["candidates"]],
                "choice": rec["choice"],
                "self_cosine": [[round(x, 5) for x in row] for row in rec["cosine"]],
            }
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
        f"{variant}: L2T {len(ids)} rows in {t_l2t:.0f} s; T2L {pred.shape[0]} rows in {t_t2l:.0f} s: cosine "
        f"{t2l['val_cosine']}, STS-B Spearman {t2l['stsb_spearman']}"
    )
    spelled = None
    if args.t2l_spell_unseen and tok is not None:  # the same T2L, unseen ids spelled with seen ones
        spelled = t2l_of(ev.t2l_inputs(tm, tok.token_bytes))
        t2l_sp = ev.t2l_metrics(spelled)
        say(
            f"{variant}: T2L with unseen tokens spelled: cosine {t2l_sp['val_cosine']}, STS-B {t2l_sp['stsb_spearman']}"
        )
    texts = _texts(tok, world)
    if texts:
        for i in range(min(3, len(texts))):
            say(f"{variant}:   L2T[{i}] {texts[i]!r}")
    result = {
        "variant": variant,
        "kind": "diffusion",
        "config": {"train_config": dataclasses.asdict(cfg), "shared": settings(args)},
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


# -------------------------------------------------------------------------------------------------- baselines
class TrainData:
    """Fixed-length training / validation rows in model ids, standardised latents, and the normaliser."""

    def __init__(self, bundle: dict, args: argparse.Namespace) -> None:
        from rwkv_diffusion_rnn.data_io import LatentStats

        tok, off = np.asarray(bundle["train_tokens"]), np.asarray(bundle["train_offsets"])
        self.token_map = compact_vocab(tok, off, args.length)
        self.rows, self.text_len = fixed_rows(tok, off, args.length, self.token_map)
        stats = LatentStats.load(Path(bundle["dir"]) / "latent_stats.json")
        self.mean, self.std = np.asarray(stats.mean, np.float64), np.asarray(stats.std, np.float64)
        self.z = ((np.asarray(bundle["train_latents"], np.float64) - self.mean) / self.std).astype(np.float32)
        vt, vo = np.asarray(bundle["val_tokens"]), np.asarray(bundle["val_offsets"])
        self.val_rows, _ = fixed_rows(vt, vo, args.length, self.token_map)
        self.val_z = ((np.asarray(bundle["val_latents"], np.float64) - self.mean) / self.std).astype(np.float32)

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        return ((np.asarray(raw, np.float64) - self.mean) / self.std).astype(np.float32)

    def raw(self, z: np.ndarray) -> np.ndarray:
        return (np.asarray(z, np.float64) * self.std + self.mean).astype(np.float32)


def _baseline_training(model, data: TrainData, loss_fn, args, dev: torch.device, name: str, hook=None) -> dict:
    """``hook(steps_done, clock, final=False)``: called before every step (e.g. a validation pass inside
    ``clock.paused()``) and once after the last with ``final=True``."""
    from captions_baselines import RowSource, make_step

    from rwkv_diffusion_rnn.optimizer import build_optimizer

    opt = build_optimizer(model, args.lr, 0.01, (0.9, 0.99))
    clock, budget = make_clock(args.budget_steps), budget_of(args)
    sched = TimeCosineLR(opt, args.lr, args.warmup_steps, budget, 0.1, clock)
    src = RowSource(data.rows, data.text_len, data.z, args.batch, args.seed, dev)
    step = make_step(model, opt, sched, loss_fn, src, dev, args.dtype, fast=args.fast)
    tr = train_for_budget(
        step,
        budget,
        clock,
        untimed_steps=args.untimed_steps,
        before_step=None if hook is None else (lambda n: hook(n, clock)),
        log=lambda s: say(f"{name}: {s}"),
    )
    if hook is not None:
        hook(tr["steps"], clock, True)  # the last weights are a candidate too
    tr.update(
        budget_s=args.budget_s,
        budget_steps=args.budget_steps,
        rows_seen=tr["steps"] * args.batch,
        epochs=tr["steps"] * args.batch / data.rows.shape[0],
        skipped=tr["last"].get("skipped_total", 0),
    )
    say(
        f"{name}: {tr['steps']} steps ({tr['timed_steps']} in {tr['train_s']:.1f} s, warm-up {tr['warmup_s']:.1f} s); "
        f"last loss {tr['last'].get('loss', float('nan')):.4f}"
    )
    return tr


class EarlyStop:
    """The AR baseline's early stopping (``--ar-early-stop X``): every X budget units (seconds, or timed steps with
    ``--budget-steps``) the validation NLL of captions 2-5 of the validation images, given their own latents, is
    measured OUTSIDE the budget clock (``clock.paused()``: neither the budget nor the lr schedule moves), and the
    weights of the best pass are kept; :meth:`finish` puts them back. Caption-1, the text every L2T decoder is scored
    against, takes no part in the choice. What a user does with a captioner that overfits: the fair baseline."""

    def __init__(self, model, val_ids: torch.Tensor, val_z: torch.Tensor, args) -> None:
        if val_ids.shape[0] == 0:
            raise RunError("--ar-early-stop: no validation rows beyond caption-1 to choose on (check --eval-limit)")
        self.model, self.ids, self.z, self.args = model, val_ids, val_z, args
        self.every, self.next_at = float(args.ar_early_stop), float(args.ar_early_stop)
        self.best, self.best_at, self.best_state, self.curve, self.last_step = math.inf, None, None, [], -1
        self.paused_s = 0.0

    def __call__(self, steps: int, clock, final: bool = False) -> None:
        if not clock.started or steps == self.last_step or (not final and clock.elapsed() < self.next_at):
            return
        from captions_baselines import ar_nll_bits

        self.last_step = steps
        while self.next_at <= clock.elapsed():
            self.next_at += self.every
        t, budget_t = time.perf_counter(), clock.elapsed()  # read before the pass: inside it the wall clock runs on
        with clock.paused():
            nll = ar_nll_bits(self.model, self.ids, self.z, self.args.dtype, self.args.eval_batch)["val_nll_bits"]
            finite = math.isfinite(nll)
            at = {"step": steps, "t": round(budget_t, 2), "val_nll_bits": round(nll, 5) if finite else None}
            self.curve.append(at)
            if finite and nll < self.best:
                self.best, self.best_at = nll, at
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.paused_s += time.perf_counter() - t
        self.model.train()

    def finish(self) -> dict:
        """Load the best weights (the last ones when no pass was finite); what was chosen, the validation curve, and
        the selection rows' NLL measured again after the restore (equal to the chosen pass's: the weights are back)."""
        from captions_baselines import ar_nll_bits

        restored = None
        if self.best_state is not None:
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    v.copy_(self.best_state[k])  # in place: CUDA graphs captured the parameters' addresses
            restored = ar_nll_bits(self.model, self.ids, self.z, self.args.dtype, self.args.eval_batch)["val_nll_bits"]
            say(
                f"ar: early stopping chose step {self.best_at['step']} (t={self.best_at['t']} of the budget; "
                f"validation NLL {self.best:.4f} bits/token on captions 2-5, {restored:.4f} after the restore) of "
                f"{len(self.curve)} passes, {self.paused_s:.1f} s outside the clock"
            )
        else:
            say(f"ar: early stopping: no finite validation NLL in {len(self.curve)} passes; the last weights are kept")
        return {
            "every": self.every,
            "rows": int(self.ids.shape[0]),
            "chosen": self.best_at,
            "restored_val_nll_bits": finite_or_none(restored) if restored is not None else None,
            "passes": len(self.curve),
            "paused_s": round(self.paused_s, 2),
            "curve": self.curve,
        }


def run_ar(args, data: TrainData, ev: Eval, dev: torch.device, tok) -> tuple[dict, None]:
    from captions_baselines import PrefixCaptioner, ar_loss, ar_nll_bits, beam_search

    tm = data.token_map
    model = PrefixCaptioner(args.n_layer, args.n_embd, tm.size, prefix_len=args.ar_prefix, seed=args.seed).to(dev)
    model.banned = (tm.unk,)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"ar: {n_params:,} trainable parameters, compact vocabulary {tm.size}; training for {budget_text(args)}")
    n_val = data.val_rows.shape[0] if not args.eval_limit else min(data.val_rows.shape[0], 5 * ev.n_img)
    val_ids = torch.as_tensor(data.val_rows[:n_val], device=dev)
    val_z = torch.as_tensor(data.val_z[:n_val], device=dev)
    stopper = None
    if args.ar_early_stop > 0:  # captions 2-5 of the evaluated images: rows k x (all images) + i, k = 1..4
        n_all = data.val_rows.shape[0] // 5
        sel = torch.as_tensor([k * n_all + i for k in range(1, 5) for i in range(ev.n_img)], device=dev)
        rows, zs = torch.as_tensor(data.val_rows, device=dev), torch.as_tensor(data.val_z, device=dev)
        stopper = EarlyStop(model, rows[sel], zs[sel], args)
    tr = _baseline_training(model, data, ar_loss, args, dev, "ar", hook=stopper)
    if stopper is not None:
        tr["early_stop"] = stopper.finish()
    t1 = time.perf_counter()
    nll = ar_nll_bits(model, val_ids, val_z, args.dtype, args.eval_batch)
    # the same rows, each with the NEXT row's latent (another image): what the latent is worth to the model
    wrong = ar_nll_bits(model, val_ids, val_z.roll(-1, 0), args.dtype, args.eval_batch)["val_nll_bits"]
    nll.update(val_nll_bits_other_latent=wrong, latent_info_bits=wrong - nll["val_nll_bits"])
    t_lik = time.perf_counter() - t1
    say(
        f"ar: val NLL {nll['val_nll_bits']:.4f} bits/token (uniform {nll['uniform_bits']:.2f}); with another "
        f"image's latent {wrong:.4f} [{t_lik:.0f} s]"
    )
    z = torch.as_tensor(data.standardise(ev.val_latents), device=dev)
    l2t, secs = {}, {}
    for name, k in (("greedy", 1), (f"beam{args.beams}", args.beams)):
        t1 = time.perf_counter()
        ids, logp = beam_search(model, z, args.length, beams=k, batch_size=args.eval_batch)
        secs[name] = round(time.perf_counter() - t1, 1)
        world = to_world(tm, ids)
        l2t[name] = {"world_ids": world, "texts": _texts(tok, world), "mean_logprob": float(np.mean(logp))}
        say(
            f"ar: {name}: {len(ids)} rows in {secs[name]:.0f} s, mean sequence log-prob {np.mean(logp):.3f}"
            + (f"; [0] {l2t[name]['texts'][0]!r}" if l2t[name]["texts"] else "")
        )
    result = {
        "variant": "ar",
        "kind": "ar",
        "config": {"shared": settings(args), "prefix_len": args.ar_prefix},
        "model": {"trainable_params": n_params, "vocab_size": tm.size},
        "train": tr,
        "eval": {
            "likelihood": nll,
            "nelbo_bits": finite_or_none(nll["val_nll_bits"]),
            "latent_info_bits": finite_or_none(nll["latent_info_bits"]),
            "likelihood_s": round(t_lik, 1),
            "decode_s": secs,
        },
        "l2t": l2t,
        "t2l": None,
    }
    return result, None


def run_regress(args, data: TrainData, ev: Eval, dev: torch.device) -> tuple[dict, np.ndarray]:
    from captions_baselines import MeanPoolRegressor, regress_loss_fn, regress_predict

    tm = data.token_map
    model = MeanPoolRegressor(args.n_layer, args.n_embd, tm.size, seed=args.seed).to(dev)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"regress: {n_params:,} trainable parameters ({args.regress_loss}); training for {budget_text(args)}")
    mean = torch.as_tensor(data.mean, dtype=torch.float32, device=dev)
    std = torch.as_tensor(data.std, dtype=torch.float32, device=dev)
    tr = _baseline_training(model, data, regress_loss_fn(args.regress_loss, mean, std), args, dev, "regress")
    t1 = time.perf_counter()
    rows, lens = ev.t2l_fixed(tm, args.length)
    z = regress_predict(
        model, torch.as_tensor(rows, device=dev), torch.as_tensor(lens, device=dev), args.dtype, args.eval_batch
    )
    pred = data.raw(z.cpu().numpy())
    t2l = ev.t2l_metrics(pred)
    say(
        f"regress: T2L {pred.shape[0]} rows in {time.perf_counter() - t1:.0f} s: cosine {t2l['val_cosine']}, "
        f"STS-B Spearman {t2l['stsb_spearman']}"
    )
    result = {
        "variant": "regress",
        "kind": "regress",
        "config": {"shared": settings(args), "loss": args.regress_loss},
        "model": {"trainable_params": n_params, "vocab_size": tm.size},
        "train": tr,
        "eval": {"nelbo_bits": None},
        "l2t": None,
        "t2l": t2l,
    }
    return result, pred


# ------------------------------------------------------------------------------------------------------ driver
def _tar(out: Path, tar_path: Path) -> None:
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    with tarfile.open(tmp, "w") as tf:
        for f in sorted(out.iterdir()):
            if f.is_file() and not f.name.endswith(".tmp"):
                tf.add(f, arcname=f"{out.name}/{f.name}")
    os.replace(tmp, tar_path)


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if not names or bad:
        raise RunError(
            f"--variants: unknown {bad[0]!r}; expected a comma list of {', '.join(VARIANTS)}"
            if bad
            else "--variants is empty; expected e.g. causal,ar"
        )
    if len(set(names)) != len(names):
        raise RunError("--variants names a variant twice")
    return names


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--variant", help="one variant (same as --variants NAME)")
    ap.add_argument("--budget-s", type=float, default=100.0, help="timed training seconds per run (default 100)")
    ap.add_argument(
        "--budget-steps",
        type=int,
        default=0,
        help="train each run for this many timed steps instead of --budget-s seconds (studies on a shared CPU, "
        "where the wall clock also measures the neighbours); the lr cosine then follows steps",
    )
    ap.add_argument("--data", required=True, help="bundle folder from bench/captions_prepare.py")
    ap.add_argument("--out", required=True, help="folder for <variant>.json, <variant>_t2l.npy, log.txt")
    ap.add_argument("--tar", help="rewrite this tar of --out after every run (one file to carry back)")
    ap.add_argument("--work", help="scratch folder for the packs (default: <out>/../<out name>_work)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument(
        "--fast",
        action="store_true",
        help="every run (diffusion and baselines) with compiled RWKV-7 blocks replayed as CUDA graphs (GPU only)",
    )
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--length", type=int, default=40, help="row length: text cut to LENGTH - 1, then end-of-text")
    ap.add_argument("--untimed-steps", type=int, default=2, help="first steps before the clock starts (warm-up)")
    ap.add_argument("--sample-steps", type=int, default=32)
    ap.add_argument(
        "--t2l-steps",
        type=int,
        default=0,
        help="DDIM steps for the diffusion runs' T2L (default: --sample-steps); 1 = the x0 model's single prediction "
        "from pure noise, i.e. its posterior mean E[z0 | text]",
    )
    ap.add_argument(
        "--l2t-decoders",
        default="",
        help="comma list of STRATEGY:STEPS[:gW][:bN][:tX] for the diffusion runs' L2T (strategies: ancestral, "
        "confidence, threshold; gW: classifier-free guidance W; bN: semi-autoregressive blocks of N tokens; tX: "
        "temperature, t0 = argmax); default: the project's (confidence):<--sample-steps>. Each is scored as its own "
        "row",
    )
    ap.add_argument(
        "--t2l-spell-unseen",
        action="store_true",
        help="diffusion runs also run T2L with every token the model never saw spelled with tokens it did "
        "(vocab.TokenMap.spell; <variant>_t2l_spelled.npy, 't2l_spelled' in the JSON) instead of the unknown id",
    )
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--ar-prefix", type=int, default=4, help="latent prefix embeddings of the AR baseline")
    ap.add_argument(
        "--ar-early-stop",
        type=float,
        default=0.0,
        metavar="X",
        help="the AR baseline validates every X budget units (seconds; steps with --budget-steps) on captions 2-5 of "
        "the validation images, outside the clock, and is scored with its best weights (default 0: the last weights)",
    )
    ap.add_argument("--regress-loss", default="mse", choices=["mse", "cosine"])
    ap.add_argument("--eval-batch", type=int, default=256)
    ap.add_argument("--eval-limit", type=int, default=0, help="evaluate only this many images / STS-B pairs (tests)")
    ap.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override a TrainConfig key in every diffusion run, after the variant's own change (repeatable), e.g. "
        "--set model.latent_prefix_len=4; name such runs apart with --tag",
    )
    ap.add_argument("--backbone", help="pretrained RWKV-7 .pth for the variants " + ", ".join(PRETRAINED))
    ap.add_argument("--lora-rank", type=int, default=16, help="model.lora_rank of the lora variant")
    ap.add_argument(
        "--unfreeze-after",
        type=int,
        default=500,
        help="model.unfreeze_after_steps of the unfreeze variant (all blocks)",
    )
    ap.add_argument("--tag", default="", help="suffix of every run's name in the outputs: --tag p4 -> causal-p4.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=0.0,
        help="skip a run that would end after this many seconds since start (0: no deadline)",
    )
    ap.add_argument("--eval-reserve-s", type=float, default=60.0, help="seconds a run needs beyond its budget")
    return ap


def check_args(args: argparse.Namespace) -> list[str]:
    if bool(args.variants) == bool(args.variant):
        raise RunError("give exactly one of --variants LIST or --variant NAME")
    names = parse_variants(args.variants or args.variant)
    for key in ("budget_s", "n_layer", "n_embd", "batch", "lr", "sample_steps", "beams", "ar_prefix", "eval_batch"):
        if not getattr(args, key) > 0:
            raise RunError(f"--{key.replace('_', '-')} must be > 0; got {getattr(args, key)}")
    if not args.ar_early_stop >= 0:
        raise RunError(f"--ar-early-stop must be >= 0 (0: off); got {args.ar_early_stop}")
    parse_overrides(args.set)
    if args.tag and not all(ch.isalnum() or ch in "-_." for ch in args.tag):
        raise RunError(f"--tag {args.tag!r}: letters, digits, '-', '_' and '.' only (it names files)")
    if args.tag.startswith("-"):
        raise RunError(f"--tag {args.tag!r}: give the suffix without its leading '-' (--tag p4 names causal-p4)")
    if args.budget_steps < 0:
        raise RunError(f"--budget-steps must be >= 0 (0: the --budget-s clock); got {args.budget_steps}")
    if args.t2l_steps < 0:
        raise RunError(f"--t2l-steps must be >= 1 (0: --sample-steps); got {args.t2l_steps}")
    if args.length < 2:
        raise RunError(f"--length must be >= 2; got {args.length}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.fast and not args.device.startswith("cuda"):
        raise RunError(f"--fast replays CUDA graphs: it needs --device cuda (got {args.device})")
    return names


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rwkv_diffusion_rnn.errors import DiffRwkvError

    try:
        names = check_args(args)
        from captions_prepare import BundleError, load_bundle

        try:
            bundle = load_bundle(args.data, verify=True)
        except BundleError as exc:
            raise RunError(str(exc)) from None
    except (RunError, DiffRwkvError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _LOG[:] = [out / "log.txt"]
    work = Path(args.work) if args.work else out.parent / f"{out.name}_work"
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    say(
        f"variants {names}; budget {budget_text(args)} each; device {_device_name(dev)}; torch {torch.__version__}; "
        f"bundle {args.data} ({bundle['meta']['counts']})"
    )
    train_pack = materialize_packs(bundle, work)
    ev = Eval(bundle, args)
    tok = _tokenizer()
    data = vocab = None
    summary = {
        "variants": names,
        "device": _device_name(dev),
        "torch": torch.__version__,
        "settings": settings(args),
        "runs": {},
    }
    for variant in names:
        name = f"{variant}-{args.tag}" if args.tag else variant  # the run's name in every output
        elapsed = time.perf_counter() - _T0
        expected = elapsed + (0.0 if args.budget_steps > 0 else args.budget_s) + args.eval_reserve_s
        if variant == "ar" and args.ar_early_stop > 0 and args.budget_steps == 0:
            # its validation passes run outside the budget clock: ~1 s each plus ~20 s of first compilation on an
            # H200 (session 5: 20 passes, 22.9 s)
            expected += 20.0 + args.budget_s / args.ar_early_stop
        if args.deadline_s and expected > args.deadline_s:
            say(f"{name}: SKIPPED (would end after the {args.deadline_s:.0f} s deadline; {elapsed:.0f} s used)")
            summary["runs"][name] = {"status": "skipped (deadline)"}
            continue
        t_run = time.perf_counter()
        try:
            if variant in DIFFUSION or variant in PRETRAINED:
                if vocab is None:
                    vocab = compact_vocab(bundle["train_tokens"], bundle["train_offsets"], args.length)
                result, pred = run_diffusion(variant, args, train_pack, ev, work, tok, vocab)
            else:
                if data is None:
                    data = TrainData(bundle, args)
                if variant == "ar":
                    result, pred = run_ar(args, data, ev, dev, tok)
                else:
                    result, pred = run_regress(args, data, ev, dev)
            result.update(
                variant=name,
                overrides=args.set or [],
                device=_device_name(dev),
                torch=torch.__version__,
                seconds_total=round(time.perf_counter() - t_run, 1),
                bundle={"path": str(args.data), "files_sha256": bundle["meta"]["files"]},
            )
            if pred is not None:
                np.save(out / f"{name}_t2l.npy", np.asarray(pred, dtype=np.float32))
                result["t2l"]["file"] = f"{name}_t2l.npy"
            spelled = result.pop("_t2l_spelled_pred", None)
            if spelled is not None:
                np.save(out / f"{name}_t2l_spelled.npy", np.asarray(spelled, dtype=np.float32))
                result["t2l_spelled"]["file"] = f"{name}_t2l_spelled.npy"
            write_json_atomic(out / f"{name}.json", result)
            summary["runs"][name] = {
                "status": "ok",
                "steps": result["train"]["steps"],
                "train_s": result["train"]["train_s"],
                "seconds_total": result["seconds_total"],
            }
            say(f"{name}: done in {result['seconds_total']:.0f} s -> {out / (name + '.json')}")
        except Exception as exc:  # one failed design must not cost the others
            say(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            summary["runs"][name] = {"status": f"failed: {type(exc).__name__}: {exc}"}
        finally:
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        write_json_atomic(out / "summary.json", summary)
        if args.tar:
            _tar(out, Path(args.tar))
    failed = [n for n, r in summary["runs"].items() if r["status"] != "ok"]
    say(f"finished: {len(names) - len(failed)} ok, {len(failed)} not ({', '.join(failed) or '-'})")
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); the log file is this call's only (a later call in the same
    process, e.g. a test, does not write into an earlier run's folder)."""
    try:
        return _main(argv)
    finally:
        _LOG.clear()


if __name__ == "__main__":
    sys.exit(main())
