"""``diffrwkv sample``: latent -> text, text -> latent, or both from noise, from the command line.

    diffrwkv sample --checkpoint RUN --data DATA --limit 8                       # held-out latents -> text
    diffrwkv sample --checkpoint RUN --text "A dog runs on the beach." --out z.jsonl   # text -> latent
    diffrwkv sample --checkpoint RUN --latents z.jsonl                           # ... and back to text
    diffrwkv sample --checkpoint RUN --data DATA --preset varied --seed 3        # sampled, varied text

Latents travel the same way in both directions: ``--latents`` reads a ``.npy`` array ``[N, D]`` or JSON lines with
a ``"latent"`` list each (what ``--text`` and ``--unconditional`` write), and ``--out`` writes JSON lines or, for
latents, a ``.npy``. ``--text-file`` reads plain lines or JSON lines with a ``"text"`` each (what latent -> text
writes). Text -> latent prints the cosine of its latents to the data's own encoder (the one that made the training
latents, found from the checkpoint or ``--encoder``) when that encoder is available.

The decoders themselves and their defaults are :mod:`rwkv_diffusion_rnn.sampling`'s (``--preset`` names
:data:`~rwkv_diffusion_rnn.sampling.L2T_PRESETS`; any flag given overrides its preset's value).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.latent_files import read_data_latents, read_latents_file, read_texts_file
from rwkv_diffusion_rnn.samplers import LATENT_METHODS, TEXT_STRATEGIES
from rwkv_diffusion_rnn.sampling import (
    L2T_PRESET,
    L2T_PRESETS,
    rerank_temperature_for,
    sample_joint,
    sample_l2t,
    sample_t2l,
    t2l_default_steps,
)

#: joint samples (``--unconditional``): the whole row from noise, drawn ancestrally (not measured against others)
JOINT_DEFAULTS = {"num_steps": 32, "strategy": "ancestral", "temperature": 1.0}


# ------------------------------------------------------------------------------------------------------ inputs
def find_encoder_dir(m, explicit: str | None) -> Path | None:
    """The prepare-latents folder (holding the encoder's ``latent_encoder.json``) of ``--encoder``, else the one the
    checkpoint's training data came from, when it is still there; None when there is none."""
    from rwkv_diffusion_rnn.latent_encoder import ENCODER_META

    if explicit is not None:
        root = Path(explicit)
        for d in (root, root / "qwen_32d"):
            if (d / ENCODER_META).is_file():
                return d
        raise DiffRwkvError(f"{root / ENCODER_META}: not found; expected a folder written by diffrwkv prepare-latents")
    data = getattr(getattr(m, "config", None), "data", None)
    json_path = getattr(data, "json_path", None)
    latent_dir = getattr(data, "latent_dir", None)
    src = Path(json_path).parent if json_path else (Path(latent_dir).parent.parent if latent_dir else None)
    return src if src is not None and (src / ENCODER_META).is_file() else None


def encoder_cosine(m, texts: list[str], latents: np.ndarray, explicit: str | None, device: str) -> np.ndarray | None:
    """Cosine of each T2L latent to the data's own encoding of its text, or None when no encoder is available.
    Prints one line either way (stderr)."""
    from rwkv_diffusion_rnn.latent_encoder import LatentEncoder
    from rwkv_diffusion_rnn.metrics import cosine_rows

    enc_dir = find_encoder_dir(m, explicit)
    if enc_dir is None:
        print("no data encoder found beside the checkpoint's training data (pass --encoder DIR to compare)",
              file=sys.stderr)  # fmt: skip
        return None
    try:
        target = LatentEncoder.from_dir(enc_dir, device=device).encode(texts)
    except DiffRwkvError as exc:
        if explicit is not None:
            raise
        print(f"data encoder {enc_dir} not usable here ({exc}); no comparison", file=sys.stderr)
        return None
    if target.shape != latents.shape:
        raise DiffRwkvError(f"{enc_dir}: the encoder gives {target.shape[1]}-d latents, the model {latents.shape[1]}-d")
    cos = np.asarray(cosine_rows(latents, target), dtype=np.float64)
    print(f"cosine to the data's encoder ({enc_dir}): mean {cos.mean():.3f}, min {cos.min():.3f} over {len(cos)} "
          "texts", file=sys.stderr)  # fmt: skip
    return cos


# ---------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    faithful, varied = L2T_PRESETS["faithful"], L2T_PRESETS["varied"]
    p = argparse.ArgumentParser(
        prog="diffrwkv sample",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate text from latents (L2T), latents from text (T2L), or both from noise (joint).",
        epilog=f"""latent -> text decoders (--preset; a flag given overrides its preset's value):
  faithful (default)  the decode closest to the latent, the best measured (docs/RESULTS.md): left to right
                      (--block-size {faithful["block_size"]} --steps {faithful["num_steps"]}), argmax (--temperature \
{faithful["temperature"]:g}), --guidance {faithful["guidance_scale"]:g}
  varied              sampled text, different per --seed: the whole row, most confident first, --steps \
{varied["num_steps"]},
                      --temperature {varied["temperature"]:g}, no guidance
  --candidates K      (either preset) K decodes per latent, kept: the one the model's own text -> latent maps
                      closest to it (~K x the time; worth it where that text -> latent is strong)

examples:
  diffrwkv sample --checkpoint outputs/rwkv_mmdit --data preprocessed_data/qwen_32d --limit 8
  diffrwkv sample --checkpoint outputs/rwkv_mmdit --text "A dog runs on the beach." --out z.jsonl
  diffrwkv sample --checkpoint outputs/rwkv_mmdit --latents z.jsonl --out text.jsonl
  diffrwkv sample --checkpoint outputs/rwkv_mmdit --text-file text.jsonl --out z.npy
  diffrwkv sample --checkpoint outputs/rwkv_mmdit --data preprocessed_data/qwen_32d --preset varied --seed 3
  diffrwkv sample --checkpoint outputs/rwkv_mmdit --unconditional 16 --length 24""",
    )
    p.add_argument("--checkpoint", required=True, help="a step_* folder, or a save_dir (its newest checkpoint)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--latents", metavar="FILE", help='L2T from RAW latents: .npy [N, D], or .jsonl with "latent"')
    src.add_argument("--data", metavar="DIR", help="L2T from a prepared data folder's latents (see --split)")
    src.add_argument("--text", action="append", help="T2L from this text (repeatable)")
    src.add_argument("--text-file", help='T2L from each non-empty line of this UTF-8 file, or .jsonl with "text"')
    src.add_argument("--unconditional", type=int, metavar="N", help="N joint samples (text and latent) from noise")
    p.add_argument("--split", choices=("validation", "train"), help="--data split (default: validation, else train)")
    p.add_argument("--limit", type=int, help="use the first N input rows")
    p.add_argument("--out", metavar="FILE", help="write here (atomically): .jsonl, or .npy of latents; default: stdout")
    p.add_argument("--preset", choices=tuple(L2T_PRESETS), default=L2T_PRESET, help="latent -> text decoder (below)")
    p.add_argument("--steps", type=int, help="diffusion steps (per block with --block-size); default: the preset's; "
                   "text -> latent: 1 on an x0 model, else 32; joint: 32")  # fmt: skip
    p.add_argument("--strategy", choices=TEXT_STRATEGIES, help="text unmasking rule (default: the preset's; joint: "
                   "ancestral)")  # fmt: skip
    p.add_argument("--temperature", type=float, help="text sampling temperature, 0 = argmax (default: the preset's)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass for text draws")
    p.add_argument("--threshold", type=float, default=0.9, help="probability threshold of --strategy threshold")
    p.add_argument("--guidance", type=float, help="classifier-free guidance w, 0 = none (default: the preset's; "
                   "text -> latent: 0)")  # fmt: skip
    p.add_argument("--block-size", type=int, help="semi-autoregressive blocks of this many tokens, 0 = the whole row "
                   "at once (default: the preset's)")  # fmt: skip
    p.add_argument("--no-cache", action="store_true", help="re-read committed blocks every step (no RWKV state)")
    p.add_argument(
        "--candidates",
        type=int,
        default=1,
        help="L2T: decode K candidates per latent and keep the one the model's own text->latent maps closest to it",
    )
    p.add_argument(
        "--rerank-temperature",
        type=float,
        help="temperature of candidates 2..K (default: --temperature, or 0.7 when that is 0)",
    )
    p.add_argument("--method", choices=LATENT_METHODS, default="ddim", help="latent sampler")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--clip-x0", type=float, help="clamp the latent x0 prediction to +-C (standardised units)")
    p.add_argument("--encoder", metavar="DIR", help="T2L: compare with this prepare-latents folder's encoder "
                   "(default: the checkpoint's training data, when present)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--length", type=int, help="tokens to generate (default: the model's data.pad_to_length)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def l2t_options(a: argparse.Namespace) -> dict:
    """sample_l2t keywords: the preset's, overridden by every decoder flag given."""
    opts = dict(L2T_PRESETS[a.preset])
    given = {"num_steps": a.steps, "strategy": a.strategy, "temperature": a.temperature, "guidance_scale": a.guidance}
    opts.update({k: v for k, v in given.items() if v is not None})
    if a.block_size is not None:
        opts["block_size"] = a.block_size or None
    opts.update(top_p=a.top_p, threshold=a.threshold, length=a.length, use_cache=not a.no_cache)
    if a.candidates > 1:
        opts.update(candidates=a.candidates, rerank_temperature=a.rerank_temperature)
    return opts


def _check_args(a: argparse.Namespace) -> None:
    """Refuse impossible combinations before anything loads, each in one line."""
    for name in ("steps", "batch_size", "limit", "unconditional", "length", "candidates"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise DiffRwkvError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.block_size is not None and a.block_size < 0:
        raise DiffRwkvError(f"--block-size must be >= 0 (0 = the whole row), got {a.block_size}")
    l2t = a.latents is not None or a.data is not None
    if a.candidates > 1 and not l2t:
        raise DiffRwkvError("--candidates applies to latent -> text (--latents or --data) only")
    if a.rerank_temperature is not None and a.candidates < 2:
        raise DiffRwkvError("--rerank-temperature needs --candidates of 2 or more")
    if a.encoder is not None and a.text is None and a.text_file is None:
        raise DiffRwkvError("--encoder applies to text -> latent (--text or --text-file) only")
    if a.out:
        if not Path(a.out).resolve().parent.is_dir():
            raise DiffRwkvError(f"{a.out}: its folder does not exist")
        if Path(a.out).suffix == ".npy" and l2t:
            raise DiffRwkvError(f"{a.out}: latent -> text writes text; expected a .jsonl output")


def main(argv: list[str] | None = None) -> int:
    """``diffrwkv sample``: see :func:`build_parser` for options and examples."""
    from rwkv_diffusion_rnn.data_io import atomic_write_bytes
    from rwkv_diffusion_rnn.pipeline import load_trained

    a = build_parser().parse_args(argv)
    _check_args(a)
    opts = l2t_options(a)
    if a.candidates > 1:  # checked before loading, and the value used is the one recorded
        try:
            opts["rerank_temperature"] = rerank_temperature_for(opts["temperature"], a.rerank_temperature)
        except DiffRwkvError as exc:
            raise DiffRwkvError(f"--rerank-temperature: {exc}") from None
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    m = load_trained(a.checkpoint, device=device)
    common = {"batch_size": a.batch_size, "seed": a.seed, "progress": not a.no_progress}
    latent_opts = {"method": a.method, "eta": a.eta, "clip_x0": a.clip_x0}
    settings = {"checkpoint": str(m.path), "step": m.step, "batch_size": a.batch_size, "seed": a.seed}
    records: list[dict] = []
    latents_out = None
    tok = m.tokenizer
    tmap = getattr(m, "token_map", None)

    def world(row: list[int]) -> list[int]:  # written ids are the tokenizer's (World) ids, whatever the model's
        return tmap.to_world(torch.tensor(row, dtype=torch.long)).tolist() if tmap is not None and row else row

    if a.latents is not None or a.data is not None:
        if a.latents is not None:
            latents, refs, source = read_latents_file(a.latents), None, str(a.latents)
        else:
            latents, refs, split = read_data_latents(a.data, a.split, a.limit)
            source = f"{a.data} ({split})"
        latents = latents[: a.limit] if a.limit else latents
        ids = sample_l2t(m, latents, **common, **opts)
        settings.update(mode="l2t", preset=a.preset, **opts)
        for i, row in enumerate(ids):
            inp = {"source": source, "row": i} | ({"reference": refs[i]} if refs and refs[i] is not None else {})
            records.append({"input": inp, "text": tok.decode(row, skip_special_tokens=True), "token_ids": world(row)})
    elif a.text is not None or a.text_file is not None:
        texts = list(a.text) if a.text is not None else read_texts_file(a.text_file)
        texts = texts[: a.limit] if a.limit else texts
        if not texts:
            raise DiffRwkvError("no input text")
        steps = a.steps or t2l_default_steps(m)
        z = sample_t2l(m, [tok.encode(s) for s in texts], num_steps=steps, guidance_scale=a.guidance or 0.0,
                       **common, **latent_opts)  # fmt: skip
        settings.update(mode="t2l", num_steps=steps, guidance_scale=a.guidance or 0.0, **latent_opts)
        cos = encoder_cosine(m, texts, z, a.encoder, device)
        records = [{"input": {"text": s}, "latent": [float(x) for x in row]} for s, row in zip(texts, z, strict=True)]
        if cos is not None:
            for rec, c in zip(records, cos, strict=True):
                rec["encoder_cosine"] = round(float(c), 6)
        latents_out = z
    else:
        given = {"num_steps": a.steps, "strategy": a.strategy, "temperature": a.temperature}
        joint = {**JOINT_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
        joint.update(top_p=a.top_p, threshold=a.threshold, length=a.length)
        ids, z = sample_joint(m, a.unconditional, **common, **joint, **latent_opts)
        settings.update(mode="joint", **joint, **latent_opts)
        for i, (row, zr) in enumerate(zip(ids, z, strict=True)):
            text = tok.decode(row, skip_special_tokens=True)
            rec = {"input": {"unconditional": i}, "text": text, "token_ids": world(row), "latent": zr.tolist()}
            records.append(rec)
        latents_out = z
    if a.out and Path(a.out).suffix == ".npy":
        import io

        buf = io.BytesIO()
        np.save(buf, np.asarray(latents_out, dtype=np.float32))
        atomic_write_bytes(a.out, buf.getvalue())
        print(f"wrote {len(records)} latents to {a.out}", file=sys.stderr)
        return 0
    lines = "".join(json.dumps({**rec, "settings": settings}, ensure_ascii=False) + "\n" for rec in records)
    if a.out:
        atomic_write_bytes(a.out, lines.encode("utf-8"))
        print(f"wrote {len(records)} rows to {a.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


if __name__ == "__main__":
    from rwkv_diffusion_rnn.entry import run_main

    sys.exit(run_main(main, sys.argv[1:]))
