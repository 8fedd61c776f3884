"""A short bf16 training run of the denoiser at the g1 0.1B shape (L12 D768, 65,536-token vocabulary) on one GPU
with fla's kernels: the loss must fall; tokens/s and peak memory are printed (issue: training, GPU acceptance).

    python bench/gpu_train_smoke.py --data DIR [--steps 60] [--batch 16] [--length 64] [--out results.json]

``DIR`` is a prepared data folder (``qwen_32d`` + ``rwkv_tokens`` or a pack; e.g. the demo's ``outputs/demo/data``).
The backbone is new (random init at the 0.1B shape) and trained with the rest; tokens/s counts real tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from rwkv_diffusion_rnn.config import TrainConfig
from rwkv_diffusion_rnn.improved_trainer import Trainer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64, help="fixed row length (text + end-of-text padding)")
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    data = Path(args.data)
    cfg = TrainConfig()
    m, d, t, lg = cfg.model, cfg.data, cfg.training, cfg.logging
    m.rwkv_name, m.n_layer, m.n_embd, m.freeze_backbone, m.vocab = "scratch", args.n_layer, args.n_embd, False, "full"
    d.json_path = str(data / "qwen_32d" / "train_data.json")
    d.token_dir, d.latent_dir = str(data / "rwkv_tokens" / "train"), str(data / "qwen_32d" / "latents" / "train")
    d.pad_to_length, d.max_length = args.length, args.length
    t.dtype, t.train_batch_size, t.max_steps, t.lr, t.warmup_steps = "bf16", args.batch, args.steps, 1e-3, 10
    t.device, t.loss_type = "cuda", "mixed"
    lg.save_dir, lg.progress, lg.tensorboard = "/tmp/gpu_train_smoke", False, False
    trainer = Trainer(cfg)
    torch.cuda.reset_peak_memory_stats()
    rows, t0 = [], time.perf_counter()
    first_step_s = None
    for i in range(args.steps):
        rec = trainer.train_step()
        if i == 0:
            torch.cuda.synchronize()
            first_step_s = time.perf_counter() - t0
            t0 = time.perf_counter()
        rows.append(rec)
        if (i + 1) % 10 == 0:
            print(f"step {rec['step']}: loss {rec['loss']:.3f} text {rec['text_loss']:.3f} latent "
                  f"{rec['latent_loss']:.3f}", flush=True)  # fmt: skip
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in rows[1:])
    seq = args.length + cfg.model.latent_prefix_len + cfg.model.latent_readout_len
    first, last = sum(r["loss"] for r in rows[:10]) / 10, sum(r["loss"] for r in rows[-10:]) / 10
    result = {
        "device": torch.cuda.get_device_name(),
        "shape": f"L{args.n_layer} D{args.n_embd} V65536",
        "batch": args.batch,
        "positions_per_row": seq,
        "steps": args.steps,
        "first_step_s": round(first_step_s, 1),
        "tokens_per_s": round(tokens / dt),
        "positions_per_s": round((args.steps - 1) * args.batch * seq / dt),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss_first10": round(first, 3),
        "loss_last10": round(last, 3),
        "finite": all(math.isfinite(r["loss"]) for r in rows),
        "skipped": trainer.skipped,
    }
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if result["finite"] and last < first else 1


if __name__ == "__main__":
    raise SystemExit(main())
