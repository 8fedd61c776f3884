"""The training loop: data order, steps, skipping non-finite steps, evaluation, logging and checkpoints.

What is exact, and why (tests/test_trainer.py checks each):

* Data order is a function of ``(seed, epoch)`` (train_data.py): step ``s`` takes the global batch at stream
  positions ``[s x G, (s + 1) x G)``, ``G = train_batch_size x world x grad_accum_steps``, no row dropped or
  repeated at an epoch's end; rank ``r`` takes every ``world``-th row from ``r``. The data position is ``step``, so
  resume needs no loader state.
* The global batch ``G`` is held fixed across a resume: with another number of processes, ``grad_accum_steps`` is
  recomputed so that ``G`` is unchanged (one-line error when no integer works). Resuming with the same rows per
  micro-step (``train_batch_size x world``) reproduces the uninterrupted losses; changed accumulation keeps the
  sample order but draws the corruption noise per micro-step of the new split.
* The model and the loop are single-device code; ``training.strategy`` (ddp | fsdp) wraps or shards the model
  (distributed.py). Checkpoints: the single-folder file layout, or sharded DCP (``logging.checkpoint_format``;
  default dcp under fsdp, distributed_checkpoint.py), which resumes on any number of processes under either
  strategy (docs/multi_gpu.md).
* Corruption randomness is a function of ``(seed, step, micro-step)`` (see :mod:`objectives`), so resume and
  multi-process runs see the same noise as the uninterrupted single-process run.
* A step whose loss or gradient is non-finite on ANY rank is skipped on EVERY rank: no optimizer, EMA or weight
  change; the step counter, data position and LR schedule move on, and the log counts it (``skipped_total``, read
  at the logged steps: the decision stays on the device, so the step never waits for it; host_sync.py).
* The frozen backbone never enters the optimizer; DDP wraps the model after the trainable set is final (again when
  ``unfreeze_after_steps`` changes it).

What is reported, validation included, is train_metrics.py's.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rwkv_diffusion_rnn import distributed
from rwkv_diffusion_rnn.checkpoints import (
    capture_rng_state,
    copy_checked,
    file_sha256,
    load_checkpoint,
    peek_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_backbone,
)
from rwkv_diffusion_rnn.config import TrainConfig, parse_sequential, to_dict, validate
from rwkv_diffusion_rnn.continuous_diffusion import GaussianDiffusion, LatentNormalizer, build_latent_schedule
from rwkv_diffusion_rnn.data_simple import DataConfig, build_datasets, latent_stats
from rwkv_diffusion_rnn.diffusion_process import MaskedDiffusion, build_text_schedule
from rwkv_diffusion_rnn.distributed_checkpoint import hold_global_batch, resume_dcp, save_dcp
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.host_sync import DeviceCount
from rwkv_diffusion_rnn.master_weights import MasterAdamW
from rwkv_diffusion_rnn.master_weights import kernel_available as master_weights_kernel_available
from rwkv_diffusion_rnn.models.graphs import enable_cuda_graphs, own_gradients
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config, set_bf16_residual, set_wkv_keep_states
from rwkv_diffusion_rnn.models.rwkv7_compile import compile_blocks
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, RWKVDenoiser, compile_denoiser_regions
from rwkv_diffusion_rnn.objectives import DiffusionObjective
from rwkv_diffusion_rnn.optimizer import (
    EMA,
    add_params,
    build_optimizer,
    build_scheduler,
    clip_and_check_grads,
    clip_grads_on_device,
    load_optimizer_state,
)
from rwkv_diffusion_rnn.train_data import StepBatches, collate
from rwkv_diffusion_rnn.train_metrics import MetricsLog, read_step_metrics, validation_metrics
from rwkv_diffusion_rnn.vocab import TokenMap

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_backbone(cfg: TrainConfig, vocab_size: int | None = None) -> tuple[RWKV7, dict | None]:
    """The backbone and its reference for checkpoints (``{"path", "sha256"}``; None for a new random one)."""
    m = cfg.model
    if m.rwkv_name == "scratch":
        if m.freeze_backbone and m.lora_rank == 0:
            raise DiffRwkvError("model.rwkv_name=scratch trains a new backbone: set model.freeze_backbone=false")
        torch.manual_seed(cfg.training.seed)
        shape = RWKV7Config.for_shape(m.n_layer, m.n_embd, vocab_size or m.vocab_size)
        return RWKV7(shape, wkv_backend=m.wkv_backend), None
    from rwkv_diffusion_rnn.pretrained_rwkv import check_state_dict, read_local_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(m.rwkv_name, m.rwkv_filename, m.rwkv_revision, m.cache_dir, m.local_files_only)
    sd = read_local_checkpoint(path)
    bcfg = RWKV7Config.from_state_dict(sd, str(path))
    with torch.device("meta"):
        model = RWKV7(bcfg, wkv_backend=m.wkv_backend, init=False)
    model.load_state_dict({k: v.float() for k, v in check_state_dict(model, sd, str(path)).items()}, assign=True)
    digest = file_sha256(path) if path.is_file() else None
    return model, {"path": str(path), "sha256": digest}


def data_config(cfg: TrainConfig) -> DataConfig:
    d = cfg.data
    return DataConfig(
        json_path=d.json_path,
        token_dir=d.token_dir,
        latent_dir=d.latent_dir,
        max_samples=d.max_samples,
        num_workers=d.num_workers,
        validation_fraction=d.validation_fraction,
        seed=d.seed,
        on_bad_sample=d.on_bad_sample,
        max_length=d.max_length,
        latent_dim=cfg.model.latent_dim,
    )


def resolve_master_weights(setting: bool | None, device_type: str, dtype: str, distributed: bool, strategy: str,
                           unfreeze_after_steps: int) -> bool:  # fmt: skip
    """``training.master_weights``: true / false as set; null is on where it applies and was measured (a CUDA device
    with Triton for the update kernel, dtype bf16, one process, no fsdp, a trainable set fixed from the start), off
    elsewhere."""
    if setting is not None:
        return bool(setting)
    return (device_type == "cuda" and master_weights_kernel_available() and dtype == "bf16" and not distributed
            and strategy != "fsdp" and unfreeze_after_steps == 0)  # fmt: skip


def resolve_flat_adamw(setting: bool | None, device_type: str, distributed: bool, strategy: str,
                       unfreeze_after_steps: int, master_weights: bool) -> bool:  # fmt: skip
    """``training.flat_adamw``: true / false as set; null is on where it applies and was measured (a CUDA device,
    one process, no fsdp, a trainable set fixed from the start, no master weights, which run the same update with
    bf16 copies), off elsewhere."""
    if setting is not None:
        return bool(setting)
    return (device_type == "cuda" and not distributed and strategy != "fsdp" and unfreeze_after_steps == 0
            and not master_weights)  # fmt: skip


class Trainer:
    """Build everything from a :class:`TrainConfig` and train. ``batch_hook(step, rank, batch) -> batch`` is a test
    and fault-injection hook (e.g. plant a NaN); leave it None."""

    def __init__(self, cfg: TrainConfig, dist: distributed.DistInfo | None = None) -> None:
        validate(cfg)
        cfg = copy.deepcopy(cfg)  # grad_accum_steps may be adapted to a checkpoint's global batch (hold_global_batch)
        self.cfg = cfg
        self.dist = dist or distributed.init(cfg.training.device)
        self.device = self.dist.device
        self.batch_hook = None
        t, m = cfg.training, cfg.model

        if m.rwkv_name != "scratch":  # first, so that "how to point at a checkpoint" is the first thing said
            backbone, self.backbone_ref = build_backbone(cfg)
        self.train_set, self.val_set = build_datasets(data_config(cfg))
        if len(self.train_set) == 0:
            raise DiffRwkvError(f"{cfg.data.token_dir}: the training split is empty")
        stats = latent_stats(self.train_set)
        self.normalizer = LatentNormalizer(torch.as_tensor(stats.mean).float(), torch.as_tensor(stats.std).float())
        self.token_map = None
        if m.vocab == "data":
            self.token_map = TokenMap.from_token_arrays(
                self.train_set[i]["input_ids"].numpy() for i in range(len(self.train_set))
            )
            self.train_set.token_map = self.val_set.token_map = self.token_map  # samples in the model's ids
        if m.rwkv_name == "scratch":
            backbone, self.backbone_ref = build_backbone(cfg, self.token_map.size if self.token_map else None)
        dcfg = DenoiserConfig(**{k: getattr(m, k) for k in DenoiserConfig.__dataclass_fields__ if hasattr(m, k)})
        torch.manual_seed(t.seed)
        self.model = RWKVDenoiser(backbone, dcfg).to(self.device)
        if m.freeze_backbone or m.lora_rank > 0:
            self.model.set_backbone_trainable(None, False)
        if m.unfreeze_patterns and m.unfreeze_after_steps == 0:
            self.model.set_backbone_trainable(tuple(m.unfreeze_patterns), True)
        self.strategy = t.strategy
        fmt = cfg.logging.checkpoint_format
        self.checkpoint_format = "dcp" if fmt == "dcp" or (fmt == "auto" and t.strategy == "fsdp") else "file"
        if t.activation_checkpointing:
            self._checkpoint_blocks()
        set_wkv_keep_states(self.model, t.wkv_keep_states)
        # null: the stream follows the autocast dtype (bf16 with bf16, the weights' dtype with the others)
        set_bf16_residual(self.model, t.dtype == "bf16" if t.bf16_residual is None else t.bf16_residual)
        if t.compile_blocks:  # after activation checkpointing, before fully_shard (the torchtitan order)
            compile_blocks(self.model, t.memory_budget)  # 1 included: never inherit an earlier model's budget
        if t.compile_denoiser:
            compile_denoiser_regions(self.model)
        if t.cuda_graphs:  # (LoRA, whose adapters sit outside the graphed blocks, etc.: refused by validate)
            if self.device.type != "cuda" or self.dist.enabled:
                raise DiffRwkvError(
                    f"training.cuda_graphs needs one process on a CUDA device (here: device {self.device}, "
                    f"{self.dist.world_size} processes)"
                )
            enable_cuda_graphs(self.model)
            if not cfg.data.pad_to_length:
                distributed.print0(
                    "note: training.cuda_graphs captures one graph (and its activation memory) per batch shape; "
                    "set data.pad_to_length so that every batch has one shape"
                )
        self.sharded = t.strategy == "fsdp" and self.dist.enabled
        if self.sharded:  # before the optimizer and the EMA: they must hold the sharded parameters
            distributed.shard_fsdp(self.model, self.dist, bf16=t.dtype == "bf16")

        dc = cfg.diffusion
        text = MaskedDiffusion(build_text_schedule(dc.text_schedule, eps=dc.text_eps), self.model.mask_id,
                               dc.text_weighting, dc.antithetic)  # fmt: skip
        latent = GaussianDiffusion(build_latent_schedule(dc.latent_schedule), dc.latent_prediction, dc.antithetic)
        self.objective = DiffusionObjective(text, latent, self.normalizer, dc.p_uncond, t.latent_loss_weight,
                                            cfg.data.max_length, t.seed, t.chunked_ce, dc.clean_prefix,
                                            dc.t2l_time_power)  # fmt: skip

        hold_global_batch(t, self.dist.world_size)  # a resume with another number of processes
        self.global_batch = t.train_batch_size * self.dist.world_size * t.grad_accum_steps
        self.steps_per_epoch = len(self.train_set) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DiffRwkvError(
                f"{len(self.train_set)} training rows cannot fill one global batch of {self.global_batch} "
                "(train_batch_size x processes x grad_accum_steps); lower training.train_batch_size"
            )
        self.total_steps = t.max_steps or t.num_epochs * len(self.train_set) // self.global_batch
        self.warmup_steps = min(t.warmup_steps, self.total_steps)  # a 10-step smoke run with the default warmup
        self.master_weights = self._use_master_weights()
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, tuple(t.betas),
                                         master_weights=self.master_weights, flat=self._use_flat_adamw())  # fmt: skip
        self.scheduler = build_scheduler(self.optimizer, self.warmup_steps, self.total_steps, t.min_lr_ratio)
        self.ema = EMA(self.weights(), t.ema_decay) if t.ema_decay > 0 else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.dtype == "fp16")
        self.step, self.skipped = 0, 0  # skipped: a count kept on the device between reads (see the property)
        self.data = StepBatches(self.train_set, seed=t.seed, global_batch=self.global_batch,
                                grad_accum_steps=t.grad_accum_steps, info=self.dist,
                                pad_to_length=cfg.data.pad_to_length, device_cache=cfg.data.device_cache,
                                progress=cfg.logging.progress and self.dist.is_main)  # fmt: skip
        self.save_dir = Path(cfg.logging.save_dir)
        if t.resume:
            self._resume(t.resume)
        self._wrap()
        self.metrics_log = MetricsLog(self.save_dir, cfg.logging, to_dict(cfg), enabled=self.dist.is_main)

    # ------------------------------------------------------------------ model wrapping / trainable set
    def _use_master_weights(self) -> bool:
        """training.master_weights resolved: null is on where it applies (:func:`resolve_master_weights`); validate
        refuses true with another dtype than bf16, fsdp or a later unfreeze, and this refuses it with several
        processes."""
        t, m = self.cfg.training, self.cfg.model
        if t.master_weights and self.dist.enabled:
            raise DiffRwkvError(
                f"training.master_weights runs in one process (here {self.dist.world_size}); set it to false or null"
            )
        return resolve_master_weights(t.master_weights, self.device.type, t.dtype, self.dist.enabled, t.strategy,
                                      m.unfreeze_after_steps)  # fmt: skip

    def _use_flat_adamw(self) -> bool:
        """training.flat_adamw resolved: null is on where it applies (a CUDA device, one process, no fsdp, a fixed
        trainable set, no master weights, which run the same update with bf16 copies), off elsewhere; validate refuses
        true with fsdp or a later unfreeze, and this refuses it with several processes (built and tested for one)."""
        t, m = self.cfg.training, self.cfg.model
        if t.flat_adamw and self.dist.enabled:
            raise DiffRwkvError(
                f"training.flat_adamw runs in one process (here {self.dist.world_size}); set it to false or null"
            )
        return resolve_flat_adamw(t.flat_adamw, self.device.type, self.dist.enabled, t.strategy,
                                  m.unfreeze_after_steps, self.master_weights)  # fmt: skip

    def weights(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name as the optimizer updates them: the fp32 masters under
        training.master_weights (the model then holds bf16 copies of its matmul weights), else the parameters."""
        if isinstance(getattr(self, "optimizer", None), MasterAdamW):
            return self.optimizer.master_tensors()
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _wrap(self) -> None:
        model = self.model
        if self.cfg.training.compile:
            model = torch.compile(model)
        if not self.sharded:
            model = distributed.wrap_ddp(model, self.dist)
        self.ddp = model  # what the loss calls: DDP, or the FSDP2 module itself (its hooks do the communication)

    def _checkpoint_blocks(self) -> None:
        """Activation checkpointing: each RWKV block keeps only its inputs and recomputes its activations in the
        backward pass. The block's ``forward`` is wrapped in place, so parameter names do not change."""
        from torch.utils.checkpoint import checkpoint

        for block in self.model.backbone.blocks:
            if getattr(block, "_diffrwkv_checkpointed", False):
                continue

            def run(*args, _forward=block.forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            block.forward = run
            block._diffrwkv_checkpointed = True

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by name, fp32 (the masters under training.master_weights; under fsdp: this
        rank's DTensor shards)."""
        return {n: p.detach() for n, p in self.weights().items()}

    def full_trainable_tensors(self) -> dict[str, torch.Tensor]:
        """Whole trainable tensors on the CPU on every rank (under fsdp a collective: call it on every rank)."""
        return {n: distributed.full_tensor(t).cpu().clone() for n, t in self.trainable_tensors().items()}

    def _maybe_unfreeze(self) -> None:
        m = self.cfg.model
        if m.unfreeze_patterns and m.unfreeze_after_steps and self.step == m.unfreeze_after_steps:
            names = self.model.set_backbone_trainable(tuple(m.unfreeze_patterns), True)
            add_params(self.optimizer, self.model, names)
            if self.ema is not None:
                self.ema.add_params(self.model, names)
            self._wrap()
            distributed.print0(f"step {self.step}: unfroze {len(names)} backbone tensors")

    def modes(self, step: int):
        t = self.cfg.training
        if t.loss_type == "mixed":
            return dict(t.mixed_weights)
        if t.loss_type == "sequential":
            current = "l2t"
            for start, mode in parse_sequential(t.sequential_schedule):
                if step >= start:
                    current = mode
            return dict(t.mixed_weights) if current == "mixed" else current
        return t.loss_type

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        dtype = AUTOCAST[self.cfg.training.dtype]
        if dtype is None:
            return contextlib.nullcontext()
        # CUDA graphs replay every weight cast inside the graph; autocast's cast cache cannot be captured
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=not self.cfg.training.cuda_graphs)

    def _steps_on_device(self) -> bool:
        """Whether the finiteness check and the skip can stay on the device (no host wait): every optimizer group
        fused (its ``found_inf``), no fp16 loss scaler and no FSDP (both decide on the host)."""
        return (
            not self.sharded
            and not self.scaler.is_enabled()
            and all(g.get("fused") for g in self.optimizer.param_groups)
        )

    @property
    def skipped(self) -> int:
        """Steps skipped so far (reading it waits for the device, where the count is kept)."""
        return int(self._skipped)

    @skipped.setter
    def skipped(self, value: int) -> None:
        self._skipped = DeviceCount(value)

    def train_step(self, sync: bool = True) -> dict:
        """One optimizer step (all micro-steps). Returns the step's metrics as numbers; with ``sync=False`` some are
        still device tensors (:meth:`read_metrics` makes numbers of them, one wait). On a GPU the step itself then
        never waits for the device (host_sync.py): the masks are made on the host, the finiteness check, the
        clipping and the skip stay on the device — except under fp16 loss scaling or FSDP, which check on the host."""
        t, w = self.cfg.training, self.dist.world_size
        self._maybe_unfreeze()
        self.ddp.train()
        batches = self.data.micro_batches(self.step)
        if self.batch_hook is not None:
            batches = [self.batch_hook(self.step, self.dist.rank, b) for b in batches]
        modes = self.modes(self.step)
        corrupted = [self.objective.corrupt(b, modes, self.step, m, self.dist.rank, w) for m, b in enumerate(batches)]
        weighting = self.objective.text.weighting
        norm = distributed.all_reduce_sum(torch.stack([c.counts(weighting) for c in corrupted]).sum(0))
        sums = torch.zeros(4, device=self.device)
        n_masked = torch.zeros((), device=self.device)
        if t.cuda_graphs and len(corrupted) > 1:  # accumulate into gradients of our own, not the graph's buffers
            own_gradients(self.model)
        for m, c in enumerate(corrupted):
            # fsdp reduce-scatters every micro-step into the fp32 sharded gradients (no unsharded gradient kept)
            sync_grads = m == len(corrupted) - 1 or not self.dist.enabled or self.sharded
            ctx = contextlib.nullcontext() if sync_grads else self.ddp.no_sync()
            with ctx, self._autocast():
                loss, st = self.objective.loss(self.ddp, c, norm, scale=float(w))
            self.scaler.scale(loss).backward()
            sums += st["sums"]
            n_masked += st["n_masked"]
        self.data.prefetch(self.step + 1)
        self.scaler.unscale_(self.optimizer)
        if isinstance(self.optimizer, MasterAdamW):  # the gradients are on the model's (bf16) copies
            params = self.optimizer.module_params()
        else:  # the optimizer's list: no walk over the model's modules on every step
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # the clipping factor rides on the fused AdamW's step (its grad_scale) where no loss scaler sets one
        fold = None if self.scaler.is_enabled() else self.optimizer
        if self._steps_on_device():
            grad_norm, finite = clip_grads_on_device(params, t.max_grad_norm, also_finite=sums, optimizer=fold)
            finite = distributed.all_true_on_device(finite)
            self.optimizer.found_inf = (~finite).float()  # the fused AdamW leaves weights and moments as they are
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
                self.optimizer.__dict__.pop("grad_scale", None)
            if self.ema is not None:
                self.ema.update(self.weights(), apply=finite)
            bad = (~finite).long()
            self._skipped.add(bad)
            skipped_total = self._skipped.tensor(bad.device)  # this step's total, read later or now
        else:  # one sync; under fsdp the norm is of the whole gradient, summed over the ranks' shards
            sum_over_ranks = distributed.all_reduce_sum if self.sharded else None
            grad_norm, finite = clip_and_check_grads(
                params, t.max_grad_norm, sums, sum_over_ranks, optimizer=None if self.sharded else fold
            )
            finite = distributed.all_true(finite, self.device)
            if finite:
                self.scaler.step(self.optimizer)
                if self.ema is not None:
                    self.ema.update(self.weights())
            else:
                self._skipped.add(1)
            self.optimizer.__dict__.pop("grad_scale", None)
            skipped_total = self.skipped
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        tokens = sum(c.n_tokens for c in corrupted) * w
        rec = {
            "step": self.step,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens": tokens,
            "_totals": distributed.all_reduce_sum(torch.cat([sums, n_masked[None]])),
            "_norm": norm,
            "grad_norm": grad_norm,
            "skipped": bad if isinstance(finite, torch.Tensor) else int(not finite),
            "skipped_total": skipped_total,
        }
        return self.read_metrics(rec) if sync else rec

    def read_metrics(self, rec: dict) -> dict:
        """A :meth:`train_step` record with numbers for its device tensors (one wait); other keys are kept."""
        return read_step_metrics(rec, self.cfg.training.latent_loss_weight)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, max_batches: int | None = None) -> dict:
        """Validation (with the EMA weights if any): ``val_masked_ce_bits`` and ``val_latent_mse``, defined in
        train_metrics.py; ``{}`` without validation rows."""
        if len(self.val_set) == 0:
            return {}
        self.ddp.eval()
        rows = functools.partial(collate, pad_to_length=self.cfg.data.pad_to_length)
        with self.ema.swapped(self.model) if self.ema is not None else contextlib.nullcontext():
            return validation_metrics(self.model, self.objective, self.val_set, rows, info=self.dist,
                                      batch_size=self.cfg.training.eval_batch_size, max_batches=max_batches,
                                      every_rank_runs=self.sharded, autocast=self._autocast)  # fmt: skip

    # ------------------------------------------------------------------ checkpoints
    def data_state(self) -> dict:
        t = self.cfg.training
        return {"step": self.step, "epoch": self.step * self.global_batch // len(self.train_set),
                "samples": self.step * self.global_batch, "global_batch": self.global_batch,
                "world_size": self.dist.world_size, "train_batch_size": t.train_batch_size,
                "grad_accum_steps": t.grad_accum_steps}  # fmt: skip

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (every rank calls it). File layout: rank 0 writes, returns the
        folder on rank 0 and None elsewhere; DCP layout: every rank writes its shards, returns the folder on all."""
        extra = {"normalizer": self.normalizer.state_dict(), "skipped": self.skipped,
                 "denoiser": asdict(self.model.cfg), "backbone_config": self.model.backbone.cfg.to_dict(),
                 "strategy": self.strategy}  # fmt: skip
        if self.token_map is not None:
            extra["vocab_ids"] = self.token_map.vocab_ids
        if self.checkpoint_format == "dcp":
            return save_dcp(self.save_dir, self.step, model=self.model, optimizer=self.optimizer,
                            scheduler=self.scheduler, trainable=self.trainable_tensors(), ema=self.ema,
                            data_state=self.data_state(), config=to_dict(self.cfg), backbone=self.backbone_ref,
                            extra=extra, keep_last=self.cfg.logging.keep_last, info=self.dist)  # fmt: skip
        path = None
        if self.dist.is_main:
            path = save_checkpoint(
                self.save_dir, self.step, model_tensors=self.trainable_tensors(),
                optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                ema=self.ema.state_dict() if self.ema is not None else None, rng=capture_rng_state(),
                data_state=self.data_state(),
                config=to_dict(self.cfg), backbone=self.backbone_ref, extra=extra, keep_last=self.cfg.logging.keep_last,
            )  # fmt: skip
        distributed.barrier()
        return path

    def _resume(self, where: str) -> None:
        folder, meta = peek_checkpoint(where)
        if meta.get("layout") == "dcp":
            self.step, self.skipped = resume_dcp(str(folder), model=self.model, optimizer=self.optimizer,
                                                 scheduler=self.scheduler, trainable=self.trainable_tensors(),
                                                 ema=self.ema, backbone_ref=self.backbone_ref,
                                                 rank=self.dist.rank)  # fmt: skip
            return
        if self.sharded:
            raise DiffRwkvError(
                f"{folder}: a single-file checkpoint cannot resume under training.strategy=fsdp; resume it once with "
                "strategy=ddp and logging.checkpoint_format=dcp, then continue from that checkpoint with fsdp"
            )
        ck = load_checkpoint(where)
        m = self.cfg.model
        step = int(ck.meta["step"])
        if m.unfreeze_patterns and 0 < m.unfreeze_after_steps <= step:
            self.model.set_backbone_trainable(tuple(m.unfreeze_patterns), True)
            self.optimizer = build_optimizer(self.model, self.cfg.training.lr, self.cfg.training.weight_decay,
                                             tuple(self.cfg.training.betas),
                                             master_weights=self.master_weights)  # fmt: skip
            self.scheduler = build_scheduler(self.optimizer, self.warmup_steps, self.total_steps,
                                             self.cfg.training.min_lr_ratio)  # fmt: skip
            self.ema = EMA(self.weights(), self.cfg.training.ema_decay) if self.cfg.training.ema_decay > 0 else None
        verify_backbone(ck.backbone, self.backbone_ref, str(ck.path))
        want = self.trainable_tensors()
        with torch.no_grad():  # every tensor checked before any is copied: a mismatch leaves the model untouched
            copy_checked(want, ck.model_tensors, where=str(where), require=want)
            if isinstance(self.optimizer, MasterAdamW):  # the model's bf16 copies of the masters just loaded
                self.optimizer.sync_module()
        load_optimizer_state(self.optimizer, ck.optimizer, f"{ck.path}/optimizer.pt")
        self.scheduler.load_state_dict(ck.scheduler)
        if self.ema is not None and ck.ema is not None:
            self.ema.load_state_dict(ck.ema)
        # training noise is seeded by (seed, step) and does not depend on these; they cover anything else random
        restore_rng_state(ck.rng.get(self.dist.rank, ck.rng[min(ck.rng)]))
        self.step = step
        self.skipped = int(ck.meta.get("extra", {}).get("skipped", 0))
        distributed.print0(f"resumed from {ck.path} at step {self.step}")

    # ------------------------------------------------------------------ logging
    def _log(self, record: dict) -> None:
        self.metrics_log.write(record)

    def close(self) -> None:
        """End of training: the log closed; under training.master_weights the model gets its fp32 weights back
        (the values of the masters) for whatever runs it next."""
        self.metrics_log.close()
        if isinstance(self.optimizer, MasterAdamW):
            self.optimizer.release()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        lg = self.cfg.logging
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        distributed.print0(
            f"training {n_train:,} of {n_all:,} parameters on {self.dist.world_size} x {self.device}; "
            f"{len(self.train_set):,} rows, global batch {self.global_batch}, {self.total_steps} steps"
        )
        bar = None
        if self.dist.is_main and lg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        last: dict = {}
        t0, tokens, skipped_seen = time.perf_counter(), 0, self.skipped
        try:
            while self.step < self.total_steps:
                # the step's numbers stay on the device until a logged step reads them: no per-step wait
                rec = self.train_step(sync=False)
                tokens += rec.pop("tokens")
                last = rec
                if bar is not None:
                    bar.update(1)
                if self.step % lg.log_freq == 0 or self.step == self.total_steps:
                    rec = last = self.read_metrics(rec)
                    dt = time.perf_counter() - t0
                    rec["tokens_per_s"] = tokens / max(dt, 1e-9)
                    t0, tokens = time.perf_counter(), 0
                    if rec["skipped_total"] > skipped_seen:
                        n_new, skipped_seen = rec["skipped_total"] - skipped_seen, rec["skipped_total"]
                        distributed.print0(f"step {self.step}: {n_new} non-finite step(s) skipped since the last "
                                           f"log ({skipped_seen} in all)")  # fmt: skip
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", skipped=rec["skipped_total"])
                    self._log(rec)
                if self.step % lg.eval_freq == 0 or self.step == self.total_steps:
                    ev = self.evaluate(lg.eval_batches)
                    if ev:
                        last.update(ev)
                        self._log({"step": self.step, **ev})
                if self.step % lg.save_freq == 0 or self.step == self.total_steps:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            self.close()
        return self.read_metrics(last)
