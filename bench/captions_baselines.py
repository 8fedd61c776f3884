"""What the captions harness's two baselines share (``bench/captions_run.py --variants ar,regress``): the obvious
models the diffusion model must beat, at the same size and under the same training budget. Each has its own file:

(a) ``ar`` (:mod:`captions_ar`) — latent -> text: an autoregressive RWKV-7 decoder with a latent prefix, greedy and
    beam-search decoding, optional early stopping on held-out captions;
(b) ``regress`` (:mod:`captions_regress`) — text -> latent: an RWKV-7 encoder, mean-pooled, with an MLP head.

Here: their training rows (:class:`TrainData`: fixed-length rows in the compact vocabulary, standardised latents),
the batches in the Trainer's order (:class:`RowSource`: an epoch is ``default_rng([seed, epoch]).permutation``,
cut into full batches), one optimizer step with the Trainer's rule (:func:`make_step`: the library's clipping,
skip a non-finite step, schedule every step), and the budgeted loop (:func:`train_baseline`: the same budget rule
and time-based schedule as the diffusion runs, :mod:`captions_common`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path

import numpy as np
import torch
from captions_common import (
    TimeCosineLR,
    budget_of,
    compact_vocab,
    fixed_rows,
    make_clock,
    say,
    train_for_budget,
)
from torch import nn


def autocast(device: torch.device, dtype: str, cache: bool = True):
    """``cache=False`` for a step that replays CUDA graphs (autocast's weight-cast cache cannot be captured)."""
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    return torch.autocast(device.type, dtype=dt, cache_enabled=cache) if dt is not None else contextlib.nullcontext()


# -------------------------------------------------------------------------------------------- rows and batches
class TrainData:
    """Fixed-length training / validation rows in model ids, standardised latents, and the normaliser."""

    def __init__(self, bundle: dict, args: argparse.Namespace) -> None:
        from rwkv_diffusion_rnn.data_io import LatentStats

        tok, off = np.asarray(bundle["train_tokens"]), np.asarray(bundle["train_offsets"])
        self.token_map = compact_vocab(tok, off, args.length)
        self.rows, self.text_len = fixed_rows(tok, off, args.length, self.token_map)
        stats = LatentStats.load(Path(bundle["dir"]) / "latent_stats.json")
        self.mean, self.std = np.asarray(stats.mean, np.float64), np.asarray(stats.std, np.float64)
        self.z = self.standardise(bundle["train_latents"])
        vt, vo = np.asarray(bundle["val_tokens"]), np.asarray(bundle["val_offsets"])
        self.val_rows, _ = fixed_rows(vt, vo, args.length, self.token_map)
        self.val_z = self.standardise(bundle["val_latents"])

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        return ((np.asarray(raw, np.float64) - self.mean) / self.std).astype(np.float32)

    def raw(self, z: np.ndarray) -> np.ndarray:
        return (np.asarray(z, np.float64) * self.std + self.mean).astype(np.float32)


class RowSource:
    """Fixed-length rows and latents on the device, batched in the Trainer's order."""

    def __init__(
        self, rows: np.ndarray, text_len: np.ndarray, z_std: np.ndarray, batch: int, seed: int, device: torch.device
    ) -> None:
        self.rows = torch.as_tensor(rows, dtype=torch.long, device=device)
        self.text_len = torch.as_tensor(text_len, dtype=torch.long, device=device)
        self.z = torch.as_tensor(z_std, dtype=torch.float32, device=device)
        self.batch, self.seed = batch, seed
        self.per_epoch = rows.shape[0] // batch
        if self.per_epoch == 0:
            raise ValueError(f"{rows.shape[0]} training rows cannot fill one batch of {batch}")
        self._perm: tuple[int, torch.Tensor] | None = None

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, k = divmod(step, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.rows.shape[0])
            self._perm = (epoch, torch.as_tensor(perm, device=self.rows.device))
        idx = self._perm[1][k * self.batch : (k + 1) * self.batch]
        return self.rows[idx], self.text_len[idx], self.z[idx]


# ----------------------------------------------------------------------------------------------------- training
def make_step(
    model: nn.Module,
    optimizer,
    scheduler,
    loss_fn,
    source: RowSource,
    device: torch.device,
    dtype: str,
    max_grad_norm: float = 1.0,
    fast: bool = False,
):
    """One optimizer step per call (the Trainer's rule: clip, skip a non-finite step, schedule every step).
    ``fast``: the model's RWKV-7 blocks compiled and replayed as CUDA graphs, as ``training.compile_blocks`` +
    ``training.cuda_graphs`` do for the diffusion runs."""
    from rwkv_diffusion_rnn.optimizer import clip_and_check_grads

    state = {"step": 0, "skipped": 0}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if fast:
        from rwkv_diffusion_rnn.models.graphs import enable_cuda_graphs
        from rwkv_diffusion_rnn.models.rwkv7_compile import compile_blocks

        compile_blocks(model, 1.0)  # torch's default budget, whatever a diffusion run before it set
        enable_cuda_graphs(model)

    def step() -> dict:
        model.train()
        ids, text_len, z = source.batch_at(state["step"])
        with autocast(device, dtype, cache=not fast):
            loss = loss_fn(model, ids, text_len, z)
        loss.backward()
        grad_norm, finite = clip_and_check_grads(params, max_grad_norm)
        loss_f = float(loss.detach())
        finite = finite and math.isfinite(loss_f)
        if finite:
            optimizer.step()
        else:
            state["skipped"] += 1
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state["step"] += 1
        return {
            "step": state["step"],
            "loss": loss_f,
            "grad_norm": grad_norm,
            "lr": scheduler.get_last_lr()[0],
            "skipped_total": state["skipped"],
        }

    return step


def train_baseline(model, data: TrainData, loss_fn, args, dev: torch.device, name: str, hook=None) -> dict:
    """``hook(steps_done, clock, final=False)``: called before every step (e.g. a validation pass inside
    ``clock.paused()``) and once after the last with ``final=True``."""
    from rwkv_diffusion_rnn.optimizer import build_optimizer

    opt = build_optimizer(model, args.lr, 0.01, (0.9, 0.99))
    clock, budget = make_clock(args.budget_steps), budget_of(args)
    sched = TimeCosineLR(opt, args.lr, args.warmup_steps, budget, 0.1, clock)
    src = RowSource(data.rows, data.text_len, data.z, args.batch, args.seed, dev)
    step = make_step(model, opt, sched, loss_fn, src, dev, args.dtype, fast=args.fast)
    tr = train_for_budget(
        step,
        budget,
        clock,
        untimed_steps=args.untimed_steps,
        before_step=None if hook is None else (lambda n: hook(n, clock)),
        log=lambda s: say(f"{name}: {s}"),
    )
    if hook is not None:
        hook(tr["steps"], clock, True)  # the last weights are a candidate too
    tr.update(
        budget_s=args.budget_s,
        budget_steps=args.budget_steps,
        rows_seen=tr["steps"] * args.batch,
        epochs=tr["steps"] * args.batch / data.rows.shape[0],
        skipped=tr["last"].get("skipped_total", 0),
    )
    say(
        f"{name}: {tr['steps']} steps ({tr['timed_steps']} in {tr['train_s']:.1f} s, warm-up {tr['warmup_s']:.1f} s); "
        f"last loss {tr['last'].get('loss', float('nan')):.4f}"
    )
    return tr
