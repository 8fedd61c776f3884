"""A tiny trained model made the way the demo makes its own (corpus -> prepare-latents -> tokenize -> train a scratch
RWKV-7 with a compact vocabulary and fixed-length rows), in seconds: the fake "test-hash" encoder stands in for
MiniLM so that ``embed`` runs offline without a model download."""

from __future__ import annotations

from pathlib import Path

import torch

from rwkv_diffusion_rnn import cli
from rwkv_diffusion_rnn.corpus import generate
from rwkv_diffusion_rnn.preprocess_tokenize_text import tokenize_json
from tests.data_helpers import SHARED_DATA  # noqa: F401  (registers the "test-hash" embedder)

N_ROWS = 40


def tiny_run(root: Path, steps: int = 4, **over) -> dict[str, Path]:
    """Data under ``root/data`` and a checkpoint under ``root/run``; ``section__key=value`` overrides the config.
    Returns the folders (``data`` is the prepare-latents folder, ``save_dir`` the run)."""
    from rwkv_diffusion_rnn.config import TrainConfig
    from rwkv_diffusion_rnn.improved_trainer import Trainer

    src = root / "corpus.txt"
    src.write_text("\n".join(generate(N_ROWS, seed=11)) + "\n")
    data = root / "data" / "qwen_32d"
    args = ["prepare-latents", "--input", str(src), "--output_dir", str(data), "--encoder", "test-hash"]
    assert cli.main([*args, "--validation-fraction", "0.2"]) == 0
    for split in ("train", "validation"):
        tokenize_json(data / f"{split}_data.json", root / "data" / "rwkv_tokens", max_length=64, num_workers=1)
    cfg = TrainConfig()
    m, d, t = cfg.model, cfg.data, cfg.training
    m.rwkv_name, m.n_layer, m.n_embd, m.vocab, m.freeze_backbone = "scratch", 1, 64, "data", False
    d.json_path, d.latent_dir = str(data / "train_data.json"), str(data / "latents" / "train")
    d.token_dir, d.pad_to_length, d.max_length = str(root / "data" / "rwkv_tokens" / "train"), 12, 64
    t.dtype, t.train_batch_size, t.max_steps, t.warmup_steps, t.loss_type = "fp32", 8, steps, 1, "mixed"
    t.ema_decay, t.seed = 0.5, 0
    cfg.logging.save_dir, cfg.logging.progress, cfg.logging.tensorboard = str(root / "run"), False, False
    for key, value in over.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    for _ in range(steps):
        trainer.train_step()
    trainer.save()
    return {"root": root, "data": data, "save_dir": root / "run"}
