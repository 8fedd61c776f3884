"""A tiny dataset and random backbone shared by the reliability tests, and the config that trains on them."""

from __future__ import annotations

import pytest
import torch

from rwkv_diffusion_rnn.config import TrainConfig
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7
from rwkv_diffusion_rnn.pretrained_rwkv import save_pth
from tests.data_helpers import make_dataset
from tests.train_helpers import make_cfg


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    paths = make_dataset(root / "ds", n=16, seed=7)
    save_pth(random_rwkv7(RWKV7Config.for_shape(2, 64), seed=11).state_dict(), root / "bb.pth")
    return root, paths


def tiny_cfg(tiny, save_dir, **over) -> TrainConfig:
    """fp32 CPU, frozen backbone (small checkpoints), batch 4 of 16 rows; ``section__key=value`` overrides."""
    base = {
        "model__freeze_backbone": True,
        "training__train_batch_size": 4,
        "training__max_steps": 12,
        "training__ema_decay": 0.9,
        "training__loss_type": "mixed",
        "logging__log_freq": 1,
        "logging__eval_freq": 10**6,
    }
    return make_cfg(tiny, save_dir, **{**base, **over})


torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
