"""Worker for the multi-process trainer tests, launched by ``torchrun`` (gloo on CPU).

    torchrun --standalone --nproc_per_node N tests/_ddp_worker.py CONFIG.json OUT_PREFIX [NAN_STEP NAN_RANK] \\
        [save_at=K] [resume=CHECKPOINT]

Trains until ``training.max_steps`` from the JSON config (its ``training.strategy`` picks ddp or fsdp) and writes
``OUT_PREFIX.rank{r}.pt`` with the whole trainable tensors (gathered under fsdp), the EMA shadows, the per-step
losses, the skipped flags and the rows each step read on this rank. With NAN_STEP/NAN_RANK, that rank's batch at that
step gets a NaN latent. ``save_at=K`` writes a checkpoint after step K (its folder is in the result);
``resume=PATH`` starts from a checkpoint.
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
    rest = sys.argv[3:]
    opts = dict(a.split("=", 1) for a in rest if "=" in a)
    pos = [a for a in rest if "=" not in a]
    nan_step, nan_rank = (int(pos[0]), int(pos[1])) if len(pos) > 1 else (-1, -1)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), json.load(open(cfg_path))))
    if "resume" in opts:
        cfg.training.resume = opts["resume"]
    save_at = int(opts.get("save_at", -1))
    trainer = Trainer(cfg)

    def plant(step, rank, batch):
        if step == nan_step and rank == nan_rank:
            batch = dict(batch)
            batch["latent"] = batch["latent"].clone()
            batch["latent"][0, 0] = float("nan")
        return batch

    def adam():
        return [distributed.full_tensor(s["exp_avg"]).clone() for s in trainer.optimizer.state.values()]

    trainer.batch_hook = plant
    init = trainer.full_trainable_tensors()
    losses, skipped, rows, saved = [], [], [], None
    around_nan = {}
    while trainer.step < cfg.training.max_steps:
        step = trainer.step
        if step == nan_step:
            around_nan["before"] = trainer.full_trainable_tensors()
            around_nan["adam_before"] = adam()
        rows.append([r.tolist() for r in trainer.data.rank_rows(step)])
        rec = trainer.train_step()
        if step == nan_step:
            around_nan["after"] = trainer.full_trainable_tensors()
            around_nan["adam_after"] = adam()
        losses.append(rec["loss"])
        skipped.append(rec["skipped"])
        if trainer.step == save_at:
            saved = str(trainer.save())
    rank = int(os.environ.get("RANK", "0"))
    ema = None
    if trainer.ema is not None:
        ema = {k: distributed.full_tensor(v).clone() for k, v in trainer.ema.shadow.items()}
    result = {"tensors": trainer.full_trainable_tensors(), "init": init, "losses": losses, "skipped": skipped,
              "around_nan": around_nan, "ema": ema, "rows": rows, "saved": saved,
              "grad_accum_steps": trainer.cfg.training.grad_accum_steps}  # fmt: skip
    torch.save(result, f"{out}.rank{rank}.pt")
    distributed.cleanup()


if __name__ == "__main__":
    main()
