"""What the trainer reports: each step's numbers, the validation pass, and where they are written.

Step records (every ``logging.log_freq`` steps): ``loss`` (the training objective), ``text_loss`` and
``latent_loss`` (its two terms, each normalised as in training), ``masked_ce`` and ``masked_acc`` (plain
cross-entropy in nats and accuracy per masked token), ``grad_norm`` (before clipping), ``lr``, ``skipped`` and
``skipped_total`` (non-finite steps), ``tokens_per_s``.

Validation (every ``logging.eval_freq`` steps, at most ``logging.eval_batches`` batches of
``training.eval_batch_size`` rows per process, with the EMA weights when there is an EMA), under fixed noise:

* ``val_masked_ce_bits``: latent -> text. Each validation row is given its clean latent, its text is masked at a
  time t ~ U(0, 1] of the text schedule, and this is the cross-entropy of the true token at the masked positions,
  averaged over all masked positions, in bits per masked token. It is the same number whatever
  ``diffusion.text_weighting`` trains with, and it is not a NELBO: the validation NELBO (1/t-weighted, per token,
  an upper bound on the text's negative log-likelihood) is ``val_text_nelbo_bits`` of ``diffrwkv evaluate``
  (:func:`evaluate.likelihood_metrics`). Runs before 2026-12-06 logged this number, computed with
  ``diffusion.p_uncond`` of the latents dropped, as ``val_text_nelbo_bits`` in their metrics.jsonl.
* ``val_latent_mse``: text -> latent. Each row is given its clean text and its standardised latent is noised at a
  time of the latent schedule (with ``diffusion.t2l_time_power``, as in training); the squared error of the
  prediction of ``diffusion.latent_prediction``'s target, averaged over the latent dimensions, then the rows. The
  same quantity as ``val_latent_mse`` of ``diffrwkv evaluate``.

The condition is given on every validation row (no condition dropout, no clean prefix). Records go to
``metrics.jsonl`` in ``logging.save_dir`` (one JSON object of numbers per line), and to TensorBoard and W&B when
``logging.tensorboard`` / ``logging.wandb`` ask for them; only the main process writes.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from rwkv_diffusion_rnn import distributed

#: the validation noise stream (the corruption of each validation batch), shared with evaluate.likelihood_metrics
VALIDATION_SALT = 99991


def read_step_metrics(rec: dict, latent_loss_weight: float) -> dict:
    """A training-step record with numbers for its device tensors (one wait); other keys are kept."""
    if "_totals" not in rec:
        return rec
    out = {k: v for k, v in rec.items() if k not in ("_totals", "_norm")}
    tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    dev = rec["_totals"].device
    flat = [rec["_totals"].float(), rec["_norm"].float().to(dev)]
    flat += [v.detach().float().reshape(1).to(dev) for v in tensors.values()]
    values = torch.cat(flat).tolist()  # the one wait
    totals, norm, rest = values[:5], values[5:7], values[7:]
    for (k, _), v in zip(tensors.items(), rest, strict=True):
        out[k] = v
    out["skipped"], out["skipped_total"] = int(out["skipped"]), int(out["skipped_total"])
    if not math.isfinite(out["grad_norm"]):
        out["grad_norm"] = float("nan")
    text_loss = totals[0] / max(norm[0], 1.0)
    latent_loss = totals[3] / max(norm[1], 1.0)
    out.update(
        loss=text_loss + latent_loss_weight * latent_loss,
        text_loss=text_loss,
        latent_loss=latent_loss,
        masked_ce=totals[1] / max(totals[4], 1.0),
        masked_acc=totals[2] / max(totals[4], 1.0),
    )
    return out


@torch.no_grad()
def validation_metrics(model, objective, rows, collate: Callable, *, batch_size: int, max_batches: int | None,
                       info: distributed.DistInfo, every_rank_runs: bool, autocast: Callable) -> dict:  # fmt: skip
    """``val_masked_ce_bits`` and ``val_latent_mse`` (module docstring) of ``model`` on the dataset ``rows``,
    summed over the processes; ``{}`` without rows. ``objective``: the training :class:`DiffusionObjective` (its
    schedules, normaliser and seed; its condition dropout is not used). ``every_rank_runs``: a rank without rows in
    a batch still runs its forward, with weight 0 (FSDP gathers parameters in every forward)."""
    if len(rows) == 0:
        return {}
    objective = copy.copy(objective)
    objective.p_uncond = 0.0  # the condition is given on every row (the draws stay those of the training's p)
    device, w, r = info.device, info.world_size, info.rank
    n_batches = math.ceil(len(rows) / (batch_size * w))
    if max_batches:
        n_batches = min(n_batches, max_batches)
    ones = torch.ones(2, device=device)  # the loss's normalisers: plain sums here
    totals = torch.zeros(4, device=device)  # CE nats at masked positions, masked positions, latent loss, rows
    for i in range(n_batches):
        mine = list(range(i * batch_size * w, min((i + 1) * batch_size * w, len(rows))))[r::w]
        weight = 1.0
        if not mine:
            if not every_rank_runs:
                continue
            mine, weight = [0], 0.0
        batch = {k: v.to(device) for k, v in collate([rows[j] for j in mine]).items()}
        c = objective.corrupt(batch, "l2t", i, 0, 0, 1, salt=VALIDATION_SALT, clean_prefix=0.0)
        with autocast():
            _, st = objective.loss(model, c, ones)
        totals[0] += weight * st["sums"][1]  # plain cross-entropy: whatever the training's text weighting
        totals[1] += weight * c.masked.sum()
        c = objective.corrupt(batch, "t2l", i, 2, 0, 1, salt=VALIDATION_SALT, clean_prefix=0.0)
        with autocast():
            _, st = objective.loss(model, c, ones)
        totals[2] += weight * st["sums"][3]
        totals[3] += weight * c.latent_rows.sum()
    totals = distributed.all_reduce_sum(totals)
    return {
        "val_masked_ce_bits": float(totals[0] / totals[1].clamp_min(1)) / math.log(2),
        "val_latent_mse": float(totals[2] / totals[3].clamp_min(1)),
    }


class MetricsLog:
    """Writes records (their numbers) to ``save_dir/metrics.jsonl`` and, if asked, TensorBoard and W&B; opened at
    the first record. ``enabled=False`` (the processes other than the main one) writes nothing."""

    def __init__(self, save_dir: Path, logging_cfg, config: dict, enabled: bool) -> None:
        self.save_dir, self.cfg, self.config, self.enabled = Path(save_dir), logging_cfg, config, enabled
        self._writers: dict | None = None

    def _open(self) -> dict:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        writers = {"jsonl": open(self.save_dir / "metrics.jsonl", "a")}
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writers["tb"] = SummaryWriter(str(self.save_dir / "tensorboard"))
            except ImportError:
                distributed.print0("tensorboard is not installed: logging to metrics.jsonl only")
        if self.cfg.wandb:
            import wandb

            wandb.init(project=self.cfg.wandb_project, config=self.config)
            writers["wandb"] = wandb
        return writers

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._writers is None:
            self._writers = self._open()
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        self._writers["jsonl"].write(json.dumps(numbers) + "\n")
        self._writers["jsonl"].flush()
        if "tb" in self._writers:
            for k, v in numbers.items():
                if k != "step":
                    self._writers["tb"].add_scalar(k, v, record["step"])
        if "wandb" in self._writers:
            self._writers["wandb"].log(numbers, step=record["step"])

    def close(self) -> None:
        for w in (self._writers or {}).values():
            if hasattr(w, "close"):
                w.close()
            elif hasattr(w, "finish"):
                w.finish()
        self._writers = None
