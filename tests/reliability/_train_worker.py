"""Training worker for the kill/resume fault tests (run as a subprocess, killed with SIGKILL at random moments).

    python tests/reliability/_train_worker.py CONFIG.json LOSSES.jsonl [RESUME_DIR]

Builds a :class:`Trainer` from the JSON config (``training.resume=RESUME_DIR`` when given) and runs ``fit()`` — the
real loop, with its checkpoints every ``logging.save_freq`` steps — appending ``{"step", "loss"}`` to LOSSES.jsonl
after every step (flushed, so a SIGKILL loses nothing already written). With ``DIFFRWKV_SLOW_SAVE=<seconds>`` each
``.pt`` file of a checkpoint is written after that pause, which widens the window in which a kill lands inside a
checkpoint write (the ``.tmp-step_*`` folder exists); the write itself is the library's.
"""

import json
import os
import sys
import time

import torch
from omegaconf import OmegaConf

from rwkv_diffusion_rnn import checkpoints
from rwkv_diffusion_rnn.config import TrainConfig
from rwkv_diffusion_rnn.improved_trainer import Trainer


def main() -> None:
    torch.set_num_threads(1)  # the same reduction order in every process: losses compare exactly
    cfg_path, losses_path = sys.argv[1], sys.argv[2]
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), json.load(open(cfg_path))))
    if len(sys.argv) > 3:
        cfg.training.resume = sys.argv[3]
    slow = float(os.environ.get("DIFFRWKV_SLOW_SAVE", "0"))
    if slow > 0:
        write = checkpoints._write_torch

        def slow_write(path, obj):
            time.sleep(slow)
            write(path, obj)

        checkpoints._write_torch = slow_write
    trainer = Trainer(cfg)
    log = trainer._log
    out = open(losses_path, "a")

    def log_and_record(record: dict) -> None:
        if "loss" in record:
            out.write(json.dumps({"step": record["step"], "loss": record["loss"]}) + "\n")
            out.flush()
        log(record)

    trainer._log = log_and_record
    print(f"start step {trainer.step}", flush=True)
    trainer.fit()
    out.close()


if __name__ == "__main__":
    main()
