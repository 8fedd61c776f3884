"""``diffrwkv smoke``: load an RWKV-7 checkpoint, tokenize, forward, and check the recurrent state — in seconds.

    diffrwkv smoke                                   # builds a small random checkpoint (no weights needed)
    diffrwkv smoke --checkpoint path/to/rwkv7-g1.pth # a real g1 file: also prints its next-token guesses

It exercises the same path as training: the World tokenizer, :func:`load_rwkv_model` on a ``.pth`` file, a batched
forward, and the state contract (the text fed in two pieces with carried state must equal one pass).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.tokenizer import load_tokenizer

DEFAULT_TEXT = "A brown dog runs across the green field while two children watch from the fence."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="diffrwkv smoke", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a .pth / HF folder / hub repo id; default: build a random one")
    ap.add_argument("--out-dir", default="outputs/smoke", help="where the random checkpoint is written")
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--n-layer", type=int, default=4, help="random checkpoint: layers")
    ap.add_argument("--n-embd", type=int, default=256, help="random checkpoint: width (multiple of 64)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7
    from rwkv_diffusion_rnn.pretrained_rwkv import load_rwkv_model, save_pth

    tok = load_tokenizer("BlinkDL/rwkv7-g1")
    ids = tok.encode(args.text)
    if len(ids) < 2:
        raise DiffRwkvError("--text must encode to at least 2 tokens")
    print(f"tokenizer: RWKV World, {len(ids)} tokens: {ids[:12]}{' ...' if len(ids) > 12 else ''}")

    path = args.checkpoint
    if path is None:
        path = Path(args.out_dir) / f"random-L{args.n_layer}-D{args.n_embd}.pth"
        save_pth(random_rwkv7(RWKV7Config.for_shape(args.n_layer, args.n_embd), seed=0).state_dict(), path)
        print(f"built a random RWKV-7 checkpoint (BlinkDL .pth format): {path}")
    t0 = time.perf_counter()
    model = load_rwkv_model(path, device=args.device)
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {path}: L{cfg.n_layer} D{cfg.n_embd} H{cfg.n_head} V{cfg.vocab_size}, {n_params / 1e6:.1f}M params "
          f"in {time.perf_counter() - t0:.2f}s on {args.device}")  # fmt: skip

    x = torch.tensor([ids], device=args.device)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits, _ = model(x, return_state=True)
        dt = time.perf_counter() - t0
        half = len(ids) // 2
        first, state = model(x[:, :half], return_state=True)
        second = model(x[:, half:], state=state)
    gap = (torch.cat([first, second], 1) - logits).abs().max().item()
    print(f"forward: logits {tuple(logits.shape)} in {dt * 1000:.0f} ms ({len(ids) / dt:,.0f} tok/s), finite: "
          f"{bool(torch.isfinite(logits).all())}")  # fmt: skip
    print(f"state check: two pieces with carried state vs one pass, max |diff| = {gap:.2e}")
    if gap > 1e-4 or not torch.isfinite(logits).all():
        raise DiffRwkvError(f"smoke check failed: piecewise/one-pass difference {gap:.2e}")
    if args.checkpoint:
        guess = logits[0, :-1].argmax(-1).tolist()
        print("next-token guesses:", repr(tok.decode(guess, skip_special_tokens=True)))
    print("smoke run OK")
    return 0


if __name__ == "__main__":
    import sys

    from rwkv_diffusion_rnn.entry import run_main

    sys.exit(run_main(main, None))
