"""A tiny dataset and random backbone shared by the reliability tests, and the config that trains on them."""

from __future__ import annotations

import pytest
import torch

from rwkv_diffusion_rnn.config import TrainConfig
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7
from rwkv_diffusion_rnn.pretrained_rwkv import save_pth
from tests.data_helpers import make_dataset


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    paths = make_dataset(root / "ds", n=16, seed=7)
    save_pth(random_rwkv7(RWKV7Config.for_shape(2, 64), seed=11).state_dict(), root / "bb.pth")
    return root, paths


def tiny_cfg(tiny, save_dir, **over) -> TrainConfig:
    """fp32 CPU, frozen backbone (small checkpoints), batch 4 of 16 rows; ``section__key=value`` overrides."""
    root, p = tiny
    cfg = TrainConfig()
    cfg.model.rwkv_name = str(root / "bb.pth")
    cfg.model.freeze_backbone = True
    cfg.data.json_path, cfg.data.token_dir, cfg.data.latent_dir = (
        str(p["json"]),
        str(p["token_dir"]),
        str(p["latent_dir"]),
    )
    cfg.data.validation_fraction = 0.0
    t = cfg.training
    t.dtype, t.train_batch_size, t.max_steps, t.lr, t.warmup_steps, t.ema_decay = "fp32", 4, 12, 3e-3, 2, 0.9
    t.loss_type = "mixed"
    lg = cfg.logging
    lg.save_dir, lg.progress, lg.tensorboard, lg.log_freq, lg.eval_freq = str(save_dir), False, False, 1, 10**6
    for key, value in over.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
