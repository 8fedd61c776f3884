"""Config builder shared by the trainer tests and the reliability tests."""

from __future__ import annotations

from rwkv_diffusion_rnn.config import TrainConfig


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
