"""``diffrwkv evaluate``: measure a trained checkpoint on held-out rows, against a floor, and write a report.

The command-line front (flags, the ``--checklist`` mode, printing) of :mod:`rwkv_diffusion_rnn.evaluate`. Commands::

    diffrwkv evaluate --checkpoint outputs/rwkv_mmdit --data preprocessed_data --out outputs/eval
    diffrwkv evaluate --checkpoint CKPT --data DATA --l2t-preset varied --steps 8,16,32 --num-samples 1000 \\
        --stsb sts-dev.csv --device cuda --batch-size 256
    diffrwkv evaluate --checklist CKPT --data DATA          # the regression checklist: PASS/FAIL per check

The decoders are ``diffrwkv sample``'s defaults: latent -> text ``faithful`` (left to right, argmax, guidance 0.5;
:data:`~rwkv_diffusion_rnn.sampling.L2T_PRESETS`), text -> latent DDIM, both with ``--steps`` (default: the L2T
preset's, 1; for ``varied`` 32). ``--l2t-preset varied`` scores sampled text; ``--l2t-option KEY=VALUE`` /
``--t2l-option`` override single settings.

``--checkpoint`` is a ``step_*`` folder or a save_dir (newest checkpoint). ``--data`` is the folder written by
``diffrwkv prepare-latents`` (holding ``latent_encoder.json``) or its parent, with the tokens in a sibling
``rwkv_tokens/``; without it the paths recorded in the checkpoint are used. The split evaluated is the one training
held out: the ``validation`` split beside the data, or the hash split when the run used
``data.validation_fraction``.

What is measured: :mod:`rwkv_diffusion_rnn.evaluate`; the report: :mod:`rwkv_diffusion_rnn.eval_report`; the
checks: :mod:`rwkv_diffusion_rnn.checklist`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rwkv_diffusion_rnn.checklist import CHECKLIST_ELBO_ROWS, CHECKLIST_SAMPLES, CheckContext, run_checklist
from rwkv_diffusion_rnn.data_io import atomic_write_json
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.eval_data import resolve_data
from rwkv_diffusion_rnn.evaluate import EvalOptions, Sampler, evaluate, pick_device
from rwkv_diffusion_rnn.sampling import L2T_PRESET, L2T_PRESETS


def _steps(value: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in value.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}': expected comma-separated integers, e.g. 8,16,32") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"'{value}': expected step counts >= 1")
    return steps


def _option(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"'{value}': expected KEY=VALUE, e.g. temperature=0.8")
    try:
        return key, json.loads(raw)  # numbers, true/false, null
    except ValueError:
        return key, raw  # a plain string, e.g. strategy=confidence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffrwkv evaluate",
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (rwkv_diffusion_rnn/evaluate.py) for what is "
        "measured; the checklist is rwkv_diffusion_rnn/eval_checklist.md.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT", help="a step_* folder, or a save_dir (its newest checkpoint)")
    src.add_argument("--checklist", metavar="CKPT", help="run the regression checklist on CKPT: PASS/FAIL per check")
    p.add_argument("--data", metavar="DIR", help="prepare-latents folder or its parent (default: the checkpoint's)")
    p.add_argument("--split", default="validation", choices=["validation", "train"])
    p.add_argument("--num-samples", type=int, help="rows for L2T / T2L (default 256; checklist 64)")
    p.add_argument("--steps", type=_steps, help="sampling steps, e.g. 16 or 8,16,32 (default: the L2T preset's: "
                   "faithful 1, varied 32)")  # fmt: skip
    p.add_argument("--stsb", metavar="PATH", help="STS-B csv, tab-separated (e.g. the STS benchmark's sts-dev.csv)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <save_dir>/eval/step_XXXXXXXX)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward pass / sampler batch")
    p.add_argument("--seed", type=int, default=0, help="sampling seed and floor draw")
    p.add_argument("--elbo-rows", type=int, help="rows for NELBO / latent MSE (default: the whole split)")
    p.add_argument("--l2t-preset", choices=tuple(L2T_PRESETS), default=L2T_PRESET,
                   help="latent -> text decoder, as diffrwkv sample --preset (faithful: left to right, argmax, "
                   "guidance 0.5; varied: sampled text)")  # fmt: skip
    p.add_argument(
        "--l2t-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra sample_l2t argument, e.g. strategy=ancestral, guidance_scale=1.0 (repeatable)",
    )
    p.add_argument(
        "--t2l-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra sample_t2l argument, e.g. method=ddpm (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars or stage messages")
    return p


def options_from_args(args: argparse.Namespace, default_samples: int) -> EvalOptions:
    n = default_samples if args.num_samples is None else args.num_samples
    if n < 2 or args.batch_size < 1 or (args.elbo_rows is not None and args.elbo_rows < 1):
        raise DiffRwkvError("--num-samples must be >= 2, --batch-size and --elbo-rows >= 1")
    preset = dict(L2T_PRESETS[getattr(args, "l2t_preset", None) or L2T_PRESET])
    steps = args.steps or (preset.pop("num_steps"),)
    preset.pop("num_steps", None)
    return EvalOptions(
        split=args.split,
        num_samples=n,
        steps=steps,
        stsb=args.stsb,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        elbo_rows=args.elbo_rows,
        l2t_options={**preset, **dict(args.l2t_option)},
        t2l_options=dict(args.t2l_option),
        progress=not args.no_progress,
    )


def check_paths(checkpoint: str, data: str | None, stsb: str | None) -> None:
    """Fail in one line, before anything loads, when a named input does not exist."""
    if not Path(checkpoint).exists():
        raise DiffRwkvError(f"{checkpoint}: checkpoint not found; expected a step_* folder or a save_dir")
    if data is not None and not Path(data).is_dir():
        raise DiffRwkvError(f"{data}: data folder not found; expected the prepare-latents output or its parent")
    if stsb is not None and not Path(stsb).is_file():
        raise DiffRwkvError(f"{stsb}: STS-B file not found; expected the tab-separated sts-dev.csv")


def main(argv: list[str] | None = None, sampler: Sampler | None = None) -> int:
    """``diffrwkv evaluate``; ``sampler`` replaces :mod:`sampling` (tests)."""
    args = build_parser().parse_args(argv)
    if args.checklist:
        return main_checklist(args, sampler)
    from rwkv_diffusion_rnn.eval_report import summary_line, write_outputs
    from rwkv_diffusion_rnn.pipeline import load_trained

    check_paths(args.checkpoint, args.data, args.stsb)
    opts = options_from_args(args, 256)
    m = load_trained(args.checkpoint, device=pick_device(opts.device))
    data = resolve_data(m, args.data, opts.split, encoder_device=pick_device(opts.device))
    result = evaluate(m, data, opts, sampler)
    out = Path(args.out) if args.out else m.path.parent / "eval" / m.path.name
    paths = write_outputs(result.metrics, out, run_dir=m.path.parent)
    print(summary_line(result.metrics))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def main_checklist(args: argparse.Namespace, sampler: Sampler | None = None) -> int:
    """``diffrwkv evaluate --checklist CKPT ...``: print PASS/FAIL per check; exit 1 if any is not PASS."""
    check_paths(args.checklist, args.data, args.stsb)
    opts = options_from_args(args, CHECKLIST_SAMPLES)
    if args.elbo_rows is None:
        opts.elbo_rows = CHECKLIST_ELBO_ROWS
    results = run_checklist(CheckContext(args.checklist, args.data, opts, sampler))
    width = max(len(r.id) for r in results)
    for r in results:
        print(f"{r.status}  {r.id:<{width}}  {r.detail}")
    failed = [r.id for r in results if r.status != "PASS"]
    print(
        f"{len(results) - len(failed)} of {len(results)} checks passed"
        + (f"; not passed: {', '.join(failed)}" if failed else "")
    )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.out) / "checklist.json", [r.__dict__ for r in results])
    return 1 if failed else 0


if __name__ == "__main__":
    from rwkv_diffusion_rnn.entry import run_main

    sys.exit(run_main(main, None))
