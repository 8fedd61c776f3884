"""Setup and config builder shared by the trainer tests and the reliability tests."""

from __future__ import annotations

import zlib

from rwkv_diffusion_rnn.config import TrainConfig
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7
from rwkv_diffusion_rnn.pretrained_rwkv import save_pth
from tests.data_helpers import make_dataset


def make_setup(tmp_path_factory, name: str):
    """A 16-row dataset and a random L2 D64 backbone checkpoint ``bb.pth``, seeded by ``name`` (the same on every
    run; another name, other data and weights): the ``setup`` = (root, make_dataset paths) that :func:`make_cfg`
    takes."""
    root = tmp_path_factory.mktemp(name)
    seed = zlib.crc32(name.encode())
    paths = make_dataset(root / "ds", n=16, seed=seed % 1000)
    save_pth(random_rwkv7(RWKV7Config.for_shape(2, 64), seed=seed).state_dict(), root / "bb.pth")
    return root, paths


def make_cfg(setup, save_dir, **over) -> TrainConfig:
    """A tiny fp32 CPU run on ``setup`` = (root holding ``bb.pth``, make_dataset paths); ``section__key=value``
    overrides any field."""
    root, p = setup
    cfg = TrainConfig()
    cfg.model.rwkv_name = str(root / "bb.pth")
    cfg.model.freeze_backbone = False
    cfg.data.json_path, cfg.data.token_dir, cfg.data.latent_dir = (
        str(p["json"]),
        str(p["token_dir"]),
        str(p["latent_dir"]),
    )
    cfg.data.validation_fraction = 0.0
    t = cfg.training
    t.dtype, t.train_batch_size, t.max_steps, t.lr, t.warmup_steps = "fp32", 8, 10, 3e-3, 2
    cfg.logging.save_dir, cfg.logging.progress, cfg.logging.tensorboard = str(save_dir), False, False
    for key, value in over.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg
