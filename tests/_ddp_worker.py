"""Worker for the multi-process trainer tests, launched by ``torchrun`` (gloo on CPU).

    torchrun --standalone --nproc_per_node N tests/_ddp_worker.py CONFIG.json OUT_PREFIX [NAN_STEP NAN_RANK]

Trains ``training.max_steps`` steps from the JSON config and writes ``OUT_PREFIX.rank{r}.pt`` with the trainable
tensors, the per-step losses and the skipped-step count. With NAN_STEP/NAN_RANK, that rank's batch at that step gets
a NaN latent.
"""

import json
import os
import sys

import torch
from omegaconf import OmegaConf

from rwkv_diffusion_rnn import distributed
from rwkv_diffusion_rnn.config import TrainConfig
from rwkv_diffusion_rnn.improved_trainer import Trainer


def main() -> None:
    cfg_path, out = sys.argv[1], sys.argv[2]
    nan_step, nan_rank = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (-1, -1)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), json.load(open(cfg_path))))
    trainer = Trainer(cfg)

    def plant(step, rank, batch):
        if step == nan_step and rank == nan_rank:
            batch = dict(batch)
            batch["latent"] = batch["latent"].clone()
            batch["latent"][0, 0] = float("nan")
        return batch

    trainer.batch_hook = plant
    init = {k: v.clone() for k, v in trainer.trainable_tensors().items()}
    losses, skipped = [], []
    around_nan = {}
    for step in range(cfg.training.max_steps):
        if step == nan_step:
            around_nan["before"] = {k: v.clone() for k, v in trainer.trainable_tensors().items()}
            around_nan["adam_before"] = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
        rec = trainer.train_step()
        if step == nan_step:
            around_nan["after"] = {k: v.clone() for k, v in trainer.trainable_tensors().items()}
            around_nan["adam_after"] = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
        losses.append(rec["loss"])
        skipped.append(rec["skipped"])
    rank = int(os.environ.get("RANK", "0"))
    result = {"tensors": trainer.trainable_tensors(), "init": init, "losses": losses, "skipped": skipped,
              "around_nan": around_nan}  # fmt: skip
    torch.save(result, f"{out}.rank{rank}.pt")
    distributed.cleanup()


if __name__ == "__main__":
    main()
