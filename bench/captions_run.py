"""The captions harness's driver (GPU): train one design per run for a FIXED budget (wall clock, or steps) on the
Flickr30k captions bundle, then evaluate it on the validation images. Several runs per invocation, one after another
in this process; each run's results are written (and the optional tar rewritten) as soon as it finishes, so a
time-out loses only the run in progress.

    python bench/captions_run.py --variants causal,twice,bidirectional --budget-s 100 \\
        --data .device/captions/bundle --out /tmp/cap --tar $OUT/captions_1.tar --deadline-s 560 --device cuda

Where things are: this file parses the arguments, loops over the variants and writes the summary and the tar;
``captions_diffusion.py`` trains and evaluates the diffusion variants (and the pretrained-backbone ones);
``captions_ar.py`` and ``captions_regress.py`` are the two baselines, over ``captions_baselines.py`` (their rows,
batches, optimizer step and budgeted loop); ``captions_common.py`` holds what all share (the budget clock and
schedule, the evaluation inputs, the log); ``captions_score.py`` scores the outputs on the CPU.

Variants (every diffusion variant is the project defaults — ``causal`` context, ``x0`` latent target (``eps``
before 2026-11-27), uniform text weighting (ELBO until a comparison later on 2026-11-27), ``mixed`` modes with the
default weights, p_uncond 0.1 — with ONE thing changed; ``causal`` is the defaults themselves):

============== =======================================================================================
causal         defaults (model.context=causal)
twice          model.context=twice (the sequence read twice; 2x cost per step, so fewer steps in the budget)
bidirectional  model.context=bidirectional
sequential     training.loss_type=sequential: l2t for the first third of the budget, t2l the second, mixed last
uniform        diffusion.text_weighting=uniform (plain masked CE; the default since it won this comparison, so today
               the same as ``causal``: kept so the older tables' commands still run)
elbo           diffusion.text_weighting=elbo (the MDLM 1/t weights, the default until that comparison)
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
ar             baseline (a): autoregressive decoder with a latent prefix, greedy + beam search (captions_ar)
regress        baseline (b): mean-pooled encoder + MLP regressing the latent (captions_regress)
============== =======================================================================================

Every run: a new RWKV-7 (default L6 D512, compact vocabulary of the training ids), batch 256, peak lr 1e-3 with
100 warm-up steps and a cosine over the budget's wall clock to 0.1 x (captions_common), AdamW (wd 0.01, betas
0.9/0.99), clip 1.0, bf16 autocast with fp32 master weights, rows of 40 tokens (text cut to 39, then end-of-text).
Evaluation uses the validation split (1014 images x 5 captions; "caption-1" of image i is validation row i); what
each kind of run measures is in its module's docstring.

Output (``--out``; ``--tar`` rewrites one tar of it after every run): ``<variant>.json`` (config, steps, times,
loss curve, likelihood, generated ids in World ids per decoder, decoded texts when the tokenizer is installed,
T2L cosine to the true latents and STS-B Spearman as computed here), ``<variant>_t2l.npy`` (float32 [n_val + 2 x
pairs, 32]: caption-1 predictions, then STS-B sentence-1s, then sentence-2s, raw latent space), ``log.txt``,
``summary.json``. Score them on the CPU with ``bench/captions_score.py``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tarfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from captions_ar import run_ar  # noqa: E402
from captions_baselines import TrainData  # noqa: E402
from captions_common import (  # noqa: E402
    Eval,
    RunError,
    budget_text,
    compact_vocab,
    log_to,
    materialize_packs,
    say,
    since_start,
    write_json_atomic,
)
from captions_diffusion import (  # noqa: E402
    DIFFUSION,
    PRETRAINED,
    decoder_name,
    l2t_decoders,
    parse_overrides,
    run_diffusion,
)
from captions_regress import run_regress  # noqa: E402

BASELINES = ("ar", "regress")
VARIANTS = DIFFUSION + PRETRAINED + BASELINES


# ------------------------------------------------------------------------------------------------------ settings
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


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _tokenizer():
    try:
        from rwkv_diffusion_rnn.tokenizer import load_tokenizer

        return load_tokenizer("rwkv-world")
    except Exception as exc:  # decoding here is a convenience: the scorer decodes the World ids itself
        say(f"no tokenizer here ({type(exc).__name__}: {exc}); writing ids only")
        return None


# ----------------------------------------------------------------------------------------------------- arguments
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


# -------------------------------------------------------------------------------------- the loop over variants
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
    log_to(out / "log.txt")
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
    ev = Eval(bundle, args.eval_limit)
    tok = _tokenizer()
    data = vocab = None
    shared = settings(args)
    summary = {
        "variants": names,
        "device": _device_name(dev),
        "torch": torch.__version__,
        "settings": shared,
        "runs": {},
    }
    for variant in names:
        name = f"{variant}-{args.tag}" if args.tag else variant  # the run's name in every output
        elapsed = since_start()
        expected = elapsed + (0.0 if args.budget_steps > 0 else args.budget_s) + args.eval_reserve_s
        if variant == "ar" and args.ar_early_stop > 0 and args.budget_steps == 0:
            # its validation passes run outside the budget clock: ~1 s each plus ~20 s of first compilation on an
            # H200 (2026-11-27: 20 passes, 22.9 s)
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
                result, pred = run_diffusion(variant, args, train_pack, ev, work, tok, vocab, shared)
            else:
                if data is None:
                    data = TrainData(bundle, args)
                if variant == "ar":
                    result, pred = run_ar(args, data, ev, dev, tok, shared)
                else:
                    result, pred = run_regress(args, data, ev, dev, shared)
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
        log_to(None)


if __name__ == "__main__":
    sys.exit(main())
