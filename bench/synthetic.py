"""Synthetic inputs shared by the GPU benchmarks (``throughput.py``, ``multi_gpu.py``): a data folder of random rows
in the JSON + per-row file layout and a new RWKV-7 backbone file. Both are written once per folder and reused."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def synthetic_data(root: Path, rows: int, length: int, vocab: int, seed: int = 0) -> dict[str, str]:
    """The JSON + per-row file layout of the original rwkv_diffusion_rnn scripts (``qwen_32d/train_data.json``,
    ``latents/train/*.npy``, ``rwkv_tokens/train/*.npz``) holding ``rows`` random rows of exactly ``length`` ids in
    ``1 .. vocab - 1`` and random unit 32-d latents."""
    from rwkv_diffusion_rnn.data_io import LatentStats

    data, tokens = root / "qwen_32d", root / "rwkv_tokens" / "train"
    paths = {"json": str(data / "train_data.json"), "tokens": str(tokens), "latents": str(data / "latents" / "train")}
    if (data / "latent_stats.json").exists():
        return paths
    rng = np.random.default_rng(seed)
    (data / "latents" / "train").mkdir(parents=True, exist_ok=True)
    tokens.mkdir(parents=True, exist_ok=True)
    lat = rng.standard_normal((rows, 32)).astype(np.float32)
    lat /= np.linalg.norm(lat, axis=1, keepdims=True)
    meta = []
    for i in range(rows):
        key = f"{i:08d}"
        np.save(data / "latents" / "train" / f"{key}.npy", lat[i])
        ids = rng.integers(1, vocab, size=length, dtype=np.int64)
        np.savez(tokens / f"{key}.npz", input_ids=ids, attention_mask=np.ones_like(ids))
        meta.append({"text": f"row {i}", "latent_path": f"latents/train/{key}.npy"})
    (data / "train_data.json").write_text(json.dumps(meta))
    LatentStats.compute(lat).save(data / "latent_stats.json")  # last: its presence marks a complete folder
    return paths


def backbone_file(
    root: Path, shape: tuple[int, int, int], device: str | torch.device, log: Callable[[str], None] | None = None
) -> Path:
    """A BlinkDL-format ``.pth`` of a new RWKV-7 at ``shape`` (BlinkDL's init, built on ``device`` for speed), stored
    in bf16 (the trainer loads it as fp32 master weights, as it does g1 checkpoints); written once, atomically."""
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config
    from rwkv_diffusion_rnn.pretrained_rwkv import save_pth

    path = root / f"rwkv7_L{shape[0]}_D{shape[1]}_V{shape[2]}.pth"
    if not path.exists():
        if log is not None:
            log(f"writing backbone {path.name}")
        torch.manual_seed(0)
        with torch.device(device):
            model = RWKV7(RWKV7Config.for_shape(*shape))
        tmp = path.with_suffix(".tmp")
        save_pth({k: v.to(torch.bfloat16).cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # a driver process would otherwise keep the cache on GPU 0 while workers run
    return path
