"""Training throughput on one GPU: our denoiser's real training step against plain language models.

    PYTHONPATH=$PWD python bench/throughput.py --out $OUT/tp_0.1b --shapes 0.1b          # every row at 0.1B
    PYTHONPATH=$PWD python bench/throughput.py --out $OUT/tp_0.4b --shapes 0.4b
    PYTHONPATH=$PWD python bench/throughput.py --out $OUT/tp_1.5b --shapes 1.5b --rows denoiser-causal-full,rwkv7-lm
    PYTHONPATH=$PWD python bench/throughput.py --out $OUT/tp_cb --shapes 0.1b --compile-blocks \
        --rows denoiser-causal-full,denoiser-causal-frozen,rwkv7-lm                       # fused blocks vs the above
    PYTHONPATH=$PWD python bench/throughput.py --out $OUT/tp_fast --shapes 0.1b --compile-blocks --cuda-graphs \
        --rows denoiser-causal-full,rwkv7-lm                                              # the fast path
    PYTHONPATH=$PWD python bench/throughput.py --out $OUT/sampling --shapes 0.1b --rows none --sampling
    python bench/throughput.py --device cpu --shapes tiny --steps 2 --warmup 1 --length 32 --out /tmp/tp  # CPU smoke

Rows (``--rows``, comma-separated; default all), each at one g1 shape (``--shapes``; L layers, D width, V vocab):

* ``denoiser-{causal,twice,bidirectional}-{full,frozen}``: ``Trainer.train_step()`` of improved_trainer.py, i.e.
  exactly what ``diffrwkv train`` runs per step (data loading from a synthetic folder in the JSON + per-row file
  layout, corruption, forward, loss, backward, clipping, AdamW, schedule), ``loss_type=mixed``, rows of
  ``--length`` tokens plus one latent prefix and one readout position; ``frozen`` = ``model.freeze_backbone=true``
  (the backbone is loaded from a random checkpoint file, as a pretrained one would be).
* ``rwkv7-lm``: a plain next-token step of our backbone (models/rwkv7.py; cross-entropy over all positions).
* ``fla-rwkv7-lm``: fla's ``RWKV7ForCausalLM`` at the same shape with its default fused kernels ("unavailable"
  when fla does not import).
* ``llama-lm``: transformers' ``LlamaForCausalLM`` (sdpa attention) with D/64 heads of 64 and an MLP width of
  8/3 D rounded to 256 (2048 / 2816 / 5376 for D 768 / 1024 / 2048), so that a block has the same 12 D^2 matrix
  parameters as an RWKV-7 block (4 D^2 time-mix + 8 D^2 FFN) and depth, width and vocabulary are equal; under
  plain ``torch.autocast`` (its weight-cast cache on, as a user runs it) whatever the other flags say.
* ``llama-lm-nocache``: the same with ``torch.autocast(..., cache_enabled=False)`` (what our rows use with
  ``--cuda-graphs``).

Host line (``host`` in results.json, a line under the results.md heading), measured at the start of every run: the
kernel release, the CPU model, the GPU and its driver, torch and triton, and the eager launch latency: the median,
over 5 rounds, of the wall time per launch of 2,000 back-to-back ``torch.add`` on a one-element tensor (each round
waited for). A host-bound step scales with it, so figures from different hosts compare only alongside it.

Every row: fp32 master weights, bf16 autocast (``--dtype``), AdamW (fused on CUDA), gradient clipping at 1.0, batch
``--batch`` x ``--length``. ``tokens/s`` counts text tokens (B x T) per second: the median over ``--steps`` timed
steps (CUDA events) after ``--warmup`` steps (20: the denoiser's masked-position head has a row count rounded to 512
that varies by step, and cuBLAS plans each new count once, as in the first minute of a real run), each step timed
alone (it starts on an idle GPU and is waited for). ``tokens/s, steps back to back``: the same number of steps timed
together with one wait at the end, as the training loop runs them: no step reads a number back (the trainer's
``train_step(sync=False)``, host_sync.py), so the host can queue the next step while the GPU runs this one; this is
the figure a training run sees. ``peak GiB`` is ``torch.cuda.max_memory_allocated`` since the row started (it
includes the weights and optimizer state).

FLOP models (both against the bf16 matmul ceiling measured at the start, an 8192^3 matmul):

* ``MFU``: the convention ``(6 N_grad + 4 N_frozen) x text tokens/s / peak``. N counts matrix parameters applied
  at every token (embedding tables excluded: a lookup is no matmul; the denoiser's unused LM head excluded). A frozen
  parameter still costs its forward (2) and the gradient of its input (2) but no weight gradient, so a frozen
  backbone is not credited 6 N. For the denoiser this overstates the work of its text head, which runs on masked
  positions only, and understates ``twice`` (2x positions): see the next column.
* ``HFU``: matmul FLOPs actually executed in one step, counted by ``torch.utils.flop_counter.FlopCounterMode``
  (mm / bmm / sdpa; the WKV kernels, ~2% of an RWKV-7 step, are not counted) x steps/s / peak.

Triton autotuning (fla) costs minutes on a fresh machine: progress is printed with time stamps, and
``results.json`` / ``results.md`` under ``--out`` are rewritten after every row, so a timeout keeps what finished.
``--append docs/RESULTS.md`` adds the final table, headed with the card, the date and the command, to the lab
notebook (on a lent GPU whose copy of the tree is thrown away, bring ``results.md`` back and append it here).
A row that runs out of memory says ``OOM``; one that fails otherwise says ``error`` with the first line of the error.

``--sampling`` adds the sampling rows (bench/bench_sampling.py's functions): latent -> text sentences/s (32 tokens,
32 steps, batch 256; semi-autoregressive blocks of 8 with the RWKV state cache on and off) and text -> latent
latents/s (DDIM 32 steps; T2L has no state cache, see ``bench_sampling.time_t2l``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import inspect
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_sampling, synthetic, when run as a script
from synthetic import backbone_file, synthetic_data  # noqa: E402

#: name -> (layers, width, vocabulary)
SHAPES = {"tiny": (2, 64, 512), "0.1b": (12, 768, 65536), "0.4b": (24, 1024, 65536), "1.5b": (24, 2048, 65536)}
CONTEXTS = ("causal", "twice", "bidirectional")
DENOISER_ROWS = [f"denoiser-{c}-{f}" for c in CONTEXTS for f in ("full", "frozen")]
LM_ROWS = ["rwkv7-lm", "fla-rwkv7-lm", "llama-lm", "llama-lm-nocache"]
ALL_ROWS = DENOISER_ROWS + LM_ROWS
T0 = time.perf_counter()


def log(msg: str) -> None:
    now = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{now} +{time.perf_counter() - T0:6.0f}s] {msg}", flush=True)


def llama_ffn(width: int) -> int:
    """Llama MLP width with a block's matrix parameters equal to an RWKV-7 block's: 8/3 D, nearest multiple of 256."""
    return max(256, int(round(8 * width / 3 / 256)) * 256)


# ---------------------------------------------------------------------------------------------- measuring
def matmul_peak(dev: torch.device) -> tuple[float, str]:
    """Measured matmul ceiling in FLOP/s: bf16 8192^3 on CUDA, fp32 512^3 on the CPU (smoke only)."""
    if dev.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 20
    else:
        n, dtype, reps = 512, torch.float32, 5
    x = torch.randn(n, n, device=dev, dtype=dtype)
    y = torch.randn(n, n, device=dev, dtype=dtype)

    def matmuls() -> None:
        for _ in range(reps):
            x @ y

    matmuls()
    times = [_timed(matmuls, dev) for _ in range(3)]
    return 2 * n**3 * reps / min(times), f"{str(dtype).removeprefix('torch.')} {n}^3 matmul"


def _timed(fn: Callable[[], object], dev: torch.device) -> float:
    """Seconds one call of ``fn`` takes (CUDA events on a GPU)."""
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def counted_flops(step: Callable[[], object]) -> float | None:
    """Matmul FLOPs of one call of ``step`` (forward + backward), or None when the counter fails."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        return float(counter.get_total_flops())
    except Exception as exc:  # a counter problem must not lose the row's timing
        log(f"  FLOP counter failed: {str(exc).splitlines()[0][:120]}")
        return None


def matrix_params(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> tuple[int, int]:
    """(parameters taking gradients, frozen parameters): matrices used per token (no embeddings, no ``skip``)."""
    emb = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    grad = frozen = 0
    for name, p in model.named_parameters():
        if id(p) in emb or name in skip or p.dim() < 2 or min(p.shape) == 1:
            continue
        if p.requires_grad:
            grad += p.numel()
        else:
            frozen += p.numel()
    return grad, frozen


@dataclass
class Runner:
    """One row's training step and what it processes."""

    step: Callable[[], object]
    text_tokens: int  # per step
    positions: int  # sequence positions the backbone runs per step
    params_grad: int
    params_frozen: int
    notes: dict = field(default_factory=dict)
    close: Callable[[], None] = lambda: None
    read: Callable[[object], object] = lambda result: result  # a step's result with numbers (may wait)


def launch_latency_us(dev: torch.device, launches: int = 2000, rounds: int = 5) -> float:
    """Median over ``rounds`` of the wall time per launch (microseconds) of ``launches`` back-to-back ``torch.add``
    on a one-element tensor, each round waited for: the host's eager launch cost (on the CPU: one tiny op)."""
    x = torch.zeros(1, device=dev)
    for _ in range(50):  # first launches load the kernel and warm the allocator
        x = torch.add(x, 1)
    per_launch = []
    for _ in range(rounds):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(launches):
            x = torch.add(x, 1)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        per_launch.append((time.perf_counter() - t0) / launches)
    return 1e6 * statistics.median(per_launch)


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _gpu_driver() -> str | None:
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def host_info(dev: torch.device) -> dict:
    """The host line's fields (see the module docstring)."""
    vers = versions()
    return {
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "driver": _gpu_driver() if dev.type == "cuda" else None,
        "torch": vers["torch"],
        "triton": vers["triton"],
        "launch_us": launch_latency_us(dev),
    }


def set_inductor_options(items: list[str]) -> dict:
    """``NAME=VALUE`` items -> set on ``torch._inductor.config`` (``NAME`` dotted for a sub-config); returns what was
    set. ValueError naming the item for a malformed one, an unknown option, or a value of another type."""
    import ast

    import torch._inductor.config as config

    done = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{item!r}: expected NAME=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: a string option
        *path, leaf = name.split(".")
        owner = config
        for part in path:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, leaf):
            raise ValueError(f"{name!r} is not an option of torch._inductor.config")
        old = getattr(owner, leaf)
        if old is not None and type(old) is not type(value) and not (isinstance(old, float) and isinstance(value, int)):
            if isinstance(old, bool) and value in (0, 1):
                value = bool(value)
            else:
                raise ValueError(f"{name}={text}: expected a {type(old).__name__} (now {old!r})")
        setattr(owner, leaf, value)
        done[name] = value
    return done


def host_line(h: dict) -> str:
    return (f"Host: kernel {h['kernel']}; CPU {h['cpu']}; GPU {h['gpu'] or '-'} (driver {h['driver'] or '-'}); "
            f"torch {h['torch']}, triton {h['triton']}; eager launch {h['launch_us']:.2f} us (median per launch, "
            "2,000 back-to-back torch.add on one element)")  # fmt: skip


# ---------------------------------------------------------------------------------------------- rows
def denoiser_runner(a, shape, context: str, frozen: bool, work: Path, dev: torch.device) -> Runner:
    from rwkv_diffusion_rnn.config import TrainConfig
    from rwkv_diffusion_rnn.improved_trainer import Trainer
    from rwkv_diffusion_rnn.models.rwkv7_compile import compile_blocks, compile_regions
    from rwkv_diffusion_rnn.models.wkv7 import resolve_backend

    data = synthetic_data(work / f"data_T{a.length}_V{shape[2]}", 2 * a.batch, a.length, shape[2])
    cfg = TrainConfig()
    m, d, t, lg = cfg.model, cfg.data, cfg.training, cfg.logging
    m.rwkv_name = str(backbone_file(work, shape, dev))
    m.freeze_backbone, m.context, m.wkv_backend = frozen, context, a.wkv_backend
    d.json_path, d.token_dir, d.latent_dir = data["json"], data["tokens"], data["latents"]
    d.pad_to_length = d.max_length = a.length
    d.validation_fraction = 0.0
    d.device_cache = a.device_cache
    t.dtype, t.train_batch_size, t.device, t.compile = a.dtype, a.batch, str(dev), a.compile
    t.cuda_graphs, t.chunked_ce, t.compile_denoiser = a.cuda_graphs, a.chunked_ce, a.compile_denoiser
    t.max_steps, t.warmup_steps, t.lr = 10_000, 10, 1e-4
    t.wkv_keep_states, t.bf16_residual, t.master_weights = a.wkv_keep_states, a.bf16_residual, a.master_weights
    lg.save_dir, lg.progress, lg.tensorboard = str(work / "run"), False, False
    trainer = Trainer(cfg)
    if a.compile_regions:
        compile_regions(trainer.model)
    if a.compile_blocks:
        compile_blocks(trainer.model, a.memory_budget)
    grad, frozen_n = matrix_params(trainer.model, skip=tuple(f"backbone.{n}" for n in trainer.model.unused_backbone))
    copies = 2 if context == "twice" else 1
    positions = a.batch * copies * (a.length + m.latent_prefix_len + m.latent_readout_len)
    positions *= 2 if context == "bidirectional" else 1  # the time-mix also runs over the reversed sequence
    notes = {"wkv_backend": resolve_backend(m.wkv_backend, dev), "loss_type": t.loss_type, "compile": t.compile,
             "compile_regions": a.compile_regions, "compile_blocks": a.compile_blocks,
             "cuda_graphs": a.cuda_graphs, "chunked_ce": a.chunked_ce,
             "compile_denoiser": a.compile_denoiser, "device_cache": a.device_cache}  # fmt: skip

    def close() -> None:
        trainer.close()

    return Runner(lambda: trainer.train_step(sync=False), a.batch * a.length, positions, grad, frozen_n, notes, close,
                  trainer.read_metrics)  # fmt: skip


def _lm_step(model, opt, ids, autocast, loss_fn) -> Callable[[], torch.Tensor]:
    from rwkv_diffusion_rnn.optimizer import clip_grads_on_device

    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        with autocast():
            loss = loss_fn(model, ids)
        loss.backward()
        # the trainer's clipping (optimizer.py): on the device, its factor folded into the fused AdamW's step
        clip_grads_on_device(params, 1.0, optimizer=opt)
        opt.step()
        opt.__dict__.pop("grad_scale", None)
        opt.zero_grad(set_to_none=True)
        return loss.detach()  # read only when asked (warm-up): as in the trainer's loop, a step does not wait

    return step


def _adamw(
    model: torch.nn.Module, dev: torch.device, master_weights: bool = False, flat: bool = False
) -> torch.optim.AdamW:
    if master_weights or flat:  # the update kernel of master_weights.py, with or without bf16 copies
        from rwkv_diffusion_rnn.optimizer import build_optimizer

        return build_optimizer(model, lr=1e-4, weight_decay=0.01, master_weights=master_weights, flat=True)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=dev.type == "cuda" or None)


def _ids(a, vocab: int, dev: torch.device) -> torch.Tensor:
    return torch.randint(1, vocab, (a.batch, a.length), device=dev, generator=torch.Generator(dev).manual_seed(0))


def rwkv7_runner(a, shape, dev: torch.device, autocast) -> Runner:
    from rwkv_diffusion_rnn.improved_trainer import resolve_flat_adamw, resolve_master_weights
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config, set_bf16_residual, set_wkv_keep_states
    from rwkv_diffusion_rnn.models.rwkv7_compile import compile_blocks, compile_regions
    from rwkv_diffusion_rnn.models.wkv7 import resolve_backend

    torch.manual_seed(0)
    with torch.device(dev):
        model = RWKV7(RWKV7Config.for_shape(*shape), wkv_backend=a.wkv_backend)
    model.train()
    set_wkv_keep_states(model, a.wkv_keep_states)
    set_bf16_residual(model, a.bf16_residual)
    if a.compile_regions:
        compile_regions(model)
    if a.compile_blocks:
        compile_blocks(model, a.memory_budget)
    if a.cuda_graphs:
        from rwkv_diffusion_rnn.models.graphs import enable_cuda_graphs

        enable_cuda_graphs(model)

    def loss_fn(model, ids):
        if a.chunked_ce:  # head + cross-entropy in row chunks (models/chunked_ce.py): no [B*T, V] logits kept
            from rwkv_diffusion_rnn.models.chunked_ce import linear_cross_entropy

            h = model.hidden_states(ids[:, :-1])
            return linear_cross_entropy(h.flatten(0, 1), model.head.weight, ids[:, 1:].flatten())[0].mean()
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

    grad, frozen = matrix_params(model)
    master = resolve_master_weights(a.master_weights, dev.type, a.dtype, False, "ddp", 0)  # as the trainer's
    flat = resolve_flat_adamw(a.flat_adamw, dev.type, False, "ddp", 0, master)  # one process, as the trainer's
    step = _lm_step(model, _adamw(model, dev, master, flat), _ids(a, shape[2], dev), autocast, loss_fn)
    notes = {"wkv_backend": resolve_backend(a.wkv_backend, dev), "compile_regions": a.compile_regions,
             "compile_blocks": a.compile_blocks, "cuda_graphs": a.cuda_graphs, "chunked_ce": a.chunked_ce,
             "master_weights": master, "flat_adamw": master or flat}  # fmt: skip
    return Runner(step, a.batch * a.length, a.batch * a.length, grad, frozen, notes)


def fla_runner(a, shape, dev: torch.device, autocast, weights: torch.dtype = torch.float32) -> Runner:
    from fla.models import RWKV7Config as FlaConfig
    from fla.models import RWKV7ForCausalLM

    from rwkv_diffusion_rnn.models.rwkv7 import default_lora_dims

    L, D, V = shape
    lora = default_lora_dims(D)
    want = {"hidden_size": D, "num_hidden_layers": L, "head_dim": 64, "vocab_size": V, "hidden_ratio": 4,
            "decay_low_rank_dim": lora["d_decay"], "a_low_rank_dim": lora["d_aaa"], "v_low_rank_dim": lora["d_mv"],
            "gate_low_rank_dim": lora["d_gate"], "max_position_embeddings": a.length, "tie_word_embeddings": False,
            "use_cache": False}  # fmt: skip
    accepted = inspect.signature(FlaConfig.__init__).parameters
    config = FlaConfig(**{k: v for k, v in want.items() if k in accepted})
    torch.manual_seed(0)
    model = RWKV7ForCausalLM(config).to(dev, weights).train()

    def loss_fn(model, ids):
        return model(input_ids=ids, labels=ids).loss

    grad, frozen = matrix_params(model)
    notes = {k: getattr(config, k) for k in ("fuse_cross_entropy", "fuse_linear_cross_entropy", "fuse_norm")
             if hasattr(config, k)}  # fmt: skip
    notes["weights"] = str(weights).removeprefix("torch.")
    step = _lm_step(model, _adamw(model, dev), _ids(a, V, dev), autocast, loss_fn)
    return Runner(step, a.batch * a.length, a.batch * a.length, grad, frozen, notes)


def llama_runner(a, shape, dev: torch.device, autocast, cache: bool = True) -> Runner:
    from transformers import LlamaConfig, LlamaForCausalLM

    L, D, V = shape
    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=llama_ffn(D), num_hidden_layers=L,
                         num_attention_heads=D // 64, num_key_value_heads=D // 64, max_position_embeddings=a.length,
                         tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dev).train()

    def loss_fn(model, ids):
        return model(input_ids=ids, labels=ids).loss

    grad, frozen = matrix_params(model)
    notes = {"intermediate_size": config.intermediate_size, "heads": D // 64, "attn": "sdpa", "autocast_cache": cache}
    step = _lm_step(model, _adamw(model, dev), _ids(a, V, dev), lambda: autocast(cache), loss_fn)
    return Runner(step, a.batch * a.length, a.batch * a.length, grad, frozen, notes)


def build_runner(row: str, a, shape, work: Path, dev: torch.device) -> Runner:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[a.dtype]

    def autocast(cache: bool | None = None):
        """``cache`` None: our rows' rule (graphs need autocast without its cast cache); True / False: as given."""
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(dev.type, dtype=dtype, cache_enabled=not a.cuda_graphs if cache is None else cache)

    if row.startswith("denoiser-"):
        _, context, mode = row.split("-")
        return denoiser_runner(a, shape, context, mode == "frozen", work, dev)
    if row.startswith("llama-lm"):
        return llama_runner(a, shape, dev, autocast, cache=row == "llama-lm")
    return {"rwkv7-lm": rwkv7_runner, "fla-rwkv7-lm": fla_runner}[row](a, shape, dev, autocast)


def _loss_of(result) -> float | None:
    """The loss a step returned (the trainer's metrics dict or the LM step's loss)."""
    value = result.get("loss") if isinstance(result, dict) else result
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    return float(value) if isinstance(value, (int, float)) else None


def measure(runner: Runner, a, dev: torch.device, peak: float) -> dict:
    first_loss = None
    for i in range(a.warmup):
        t0 = time.perf_counter()
        result = runner.read(runner.step())
        if i == 0:
            first_loss = _loss_of(result)
        dt, loss = time.perf_counter() - t0, _loss_of(result)
        log(f"  warm-up step {i + 1}/{a.warmup}: {dt:.2f} s, loss {_f(loss, '.4f')}")
    times = [_timed(runner.step, dev) for _ in range(a.steps)]
    med = statistics.median(times)
    # the same number of steps back to back, one wait at the end, as the training loop runs them: a step that
    # never waits lets the host prepare the next one while the GPU finishes this one
    run_s = _timed(lambda: [runner.step() for _ in range(a.steps)], dev)
    # a FLOP count through compiled code would recompile under the counting mode: the eager run gives the number
    compiled = a.compile or a.compile_regions or a.compile_blocks or a.cuda_graphs
    flops = counted_flops(runner.step) if a.count_flops and not compiled else None
    n_model = 6 * runner.params_grad + 4 * runner.params_frozen
    out = {
        "tokens_per_s": runner.text_tokens / med,
        "tokens_per_s_run": runner.text_tokens * a.steps / run_s,
        "positions_per_s": runner.positions / med,
        "step_ms_median": 1000 * med,
        "first_loss": first_loss,  # same seeds and data in every run: compares e.g. --compile-regions with eager
        "step_ms": [round(1000 * t, 2) for t in times],
        "params_grad": runner.params_grad,
        "params_frozen": runner.params_frozen,
        "mfu": n_model * runner.text_tokens / med / peak,
        "flops_counted_per_step": flops,
        "hfu": flops / med / peak if flops else None,
    }
    if dev.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        if a.profile:
            out["profile"] = kernel_profile(runner.step, dev, a.profile)
            try:  # where a step timed alone waits on the host; a profiler without these fields keeps the rest
                out["profile"]["alone"] = step_timeline(runner.step, dev)
            except (AttributeError, RuntimeError) as exc:
                out["profile"]["alone"] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
    if a.host_profile:
        out["host_profile"] = host_profile(runner.step, dev)
    return out


def host_profile(step: Callable[[], object], dev: torch.device, steps: int = 5, top: int = 30) -> dict:
    """Where the host spends a step timed alone (a wait after each): cProfile over ``steps`` steps, the ``top``
    functions by their own time and by time including callees, ms a step. The wait for the GPU shows as
    ``synchronize``; what runs before a graph's replay (the GPU idle meanwhile) shows by name. cProfile adds time
    to every Python call, so the figures are upper bounds; their order is what tells."""
    import cProfile
    import pstats

    def wait() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    wait()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        step()
        wait()
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)

    def rows(index: int) -> list[dict]:
        ranked = sorted(stats.items(), key=lambda kv: -kv[1][index])[:top]
        return [
            {
                "function": f"{Path(f).name}:{line}({name})",
                "calls_per_step": round(v[1] / steps, 1),
                "own_ms": round(1000 * v[2] / steps, 3),
                "cumulative_ms": round(1000 * v[3] / steps, 3),
            }
            for (f, line, name), v in ranked
        ]

    return {"steps": steps, "wall_ms_per_step": round(1000 * wall / steps, 3), "own": rows(2), "cumulative": rows(3)}


# Kernel-name patterns for the profile's categories, first match wins (ours, BlinkDL's, fla's, cuBLAS, inductor, aten).
# Inductor names a generated kernel after the operators it fuses, a custom operator's too
# (triton_per_fused_..._wkv7_cuda_bwd_9: elementwise work fused beside the WKV op), so those never count as WKV.
KERNEL_CATEGORIES = (
    (
        "wkv",
        r"^(?!triton_(poi|per|red)_).*(wkv|_kernel_preload|chunk_dplr|chunk_rwkv|fused_recurrent|chunk_fwd|"
        r"chunk_bwd|chunk_scaled_dot)",
    ),
    ("gemm", r"nvjet|gemm|cutlass|xmma|cublas|sm90_|sm80_"),
    ("optimizer", r"multi_tensor_apply|FusedOptimizer|fused_adam|adamw"),
    ("head loss", r"logsumexp|arange_eq_exp|l2wrap|cross_entropy|nll_loss|softmax"),
    ("fused tmix/cmix (hand-written)", r"tmix|cmix"),
    ("compiled elementwise (Triton)", r"^triton_"),
    ("copies / casts", r"copy_kernel|CatArrayBatched|bfloat16_copy|direct_copy"),
    ("fills", r"FillFunctor|fill_"),
    ("eager elementwise / norms", r"elementwise_kernel|reduce_kernel|layer_norm|LayerNorm|GammaBeta|group_norm|norm"),
)


def kernel_category(name: str) -> str:
    """The profile category of a CUDA kernel name (:data:`KERNEL_CATEGORIES`; "other" when none matches)."""
    for cat, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return cat
    return "other"


def gpu_timeline(kernels: list[tuple[float, float, str]], windows: list[tuple[float, float]], top: int = 8) -> dict:
    """Where a step timed alone leaves the GPU idle, from kernel intervals ``(start, end, name)`` and the steps' host
    windows ``(start, end)`` (from the call to the return of the synchronisation), all in microseconds on one clock.
    Per step (the mean over the windows, in ms): ``lead`` (the step's start to its first kernel: host work before
    the GPU has any), ``idle`` (gaps between its kernels, overlapping kernels merged), ``tail`` (its last kernel's
    end to the wait's return) and ``busy`` (kernels running). ``gaps``: the ``top`` largest gaps between kernels by
    the kernels on either side, mean ms a step, each gap of at least 20 us."""
    lead = idle = tail = busy = 0.0
    pairs: dict[tuple[str, str], float] = {}
    n = 0
    for w0, w1 in windows:
        ks = sorted((k for k in kernels if w0 <= k[0] < w1), key=lambda k: k[0])
        if not ks:
            continue
        n += 1
        lead += ks[0][0] - w0
        end, prev = ks[0][1], ks[0][2]
        covered = ks[0][1] - ks[0][0]
        for k0, k1, name in ks[1:]:
            gap = k0 - end
            if gap > 0:
                idle += gap
                if gap >= 20:
                    key = (prev[:70], name[:70])
                    pairs[key] = pairs.get(key, 0.0) + gap
            covered += max(0.0, k1 - max(k0, end))
            if k1 >= end:
                end, prev = k1, name
        tail += max(0.0, w1 - end)
        busy += covered
    if n == 0:
        return {"steps": 0}
    ms = 1000.0 * n
    gaps = sorted(pairs.items(), key=lambda kv: -kv[1])[:top]
    return {
        "steps": n,
        "lead_ms": round(lead / ms, 3),
        "idle_ms": round(idle / ms, 3),
        "tail_ms": round(tail / ms, 3),
        "busy_ms": round(busy / ms, 3),
        "gaps": [{"after": a, "before": b, "ms_per_step": round(t / ms, 3)} for (a, b), t in gaps],
    }


def step_timeline(step: Callable[[], object], dev: torch.device, steps: int = 3) -> dict:
    """:func:`gpu_timeline` of ``steps`` steps each timed alone (a wait after each), under torch.profiler (its
    callbacks add host time to each eager launch, so ``lead`` and ``idle`` are upper bounds)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with record_function("diffrwkv_step_alone"):
                step()
                torch.cuda.synchronize(dev)
    kernels, windows = [], []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            kernels.append((e.time_range.start, e.time_range.end, e.name))
        elif e.name == "diffrwkv_step_alone" and e.device_type == torch.autograd.DeviceType.CPU:
            windows.append((e.time_range.start, e.time_range.end))
    return gpu_timeline(kernels, windows)


def kernel_profile(step: Callable[[], object], dev: torch.device, top: int, steps: int = 3) -> dict:
    """GPU time per step by kernel name over ``steps`` profiled steps (torch.profiler): where the time goes.

    Also by category (:func:`kernel_category`) and by the eager operator that launched the kernels (``ops``: the
    host-side aten operators with their input shapes, e.g. the gradient copies of autograd; kernels replayed from a
    CUDA graph or launched by compiled code have no such parent and are left out of ``ops``)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize(dev)
        wall = (time.perf_counter() - t0) / steps
    per_name: dict[str, list[float]] = {}
    for e in prof.events():
        # kernels only: a user annotation (e.g. "Optimizer.step#AdamW.step") is a range over kernels counted already
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            entry = per_name.setdefault(e.name, [0.0, 0])
            entry[0] += e.device_time / 1000 / steps  # us -> ms, per step
            entry[1] += 1
    gpu_ms = sum(v[0] for v in per_name.values())
    kernels = sorted(per_name.items(), key=lambda kv: -kv[1][0])
    categories: dict[str, list[float]] = {}
    for name, (ms, calls) in per_name.items():
        c = categories.setdefault(kernel_category(name), [0.0, 0])
        c[0] += ms
        c[1] += calls
    ops = []
    try:  # a profiler without these fields must not cost the row its figures
        for e in prof.key_averages(group_by_input_shape=True):
            ms = getattr(e, "self_device_time_total", 0.0) / 1000 / steps
            if ms > 0 and e.device_type == torch.autograd.DeviceType.CPU:
                ops.append({"op": e.key[:80], "shapes": str(e.input_shapes)[:120], "ms_per_step": round(ms, 3),
                            "calls_per_step": e.count / steps})  # fmt: skip
    except (AttributeError, RuntimeError) as exc:
        ops.append({"op": f"(not available: {type(exc).__name__})", "shapes": "", "ms_per_step": 0.0,
                    "calls_per_step": 0})  # fmt: skip
    ops.sort(key=lambda o: -o["ms_per_step"])
    return {
        "wall_ms_per_step": 1000 * wall,
        "gpu_kernel_ms_per_step": gpu_ms,
        "kernels_per_step": sum(v[1] for v in per_name.values()) / steps,
        "categories": {
            k: {"ms_per_step": round(v[0], 3), "calls_per_step": v[1] / steps}
            for k, v in sorted(categories.items(), key=lambda kv: -kv[1][0])
        },
        "top": [
            {"name": n[:120], "ms_per_step": round(v[0], 3), "calls_per_step": v[1] / steps} for n, v in kernels[:top]
        ],
        "ops": ops[:top],
        # every kernel above 5 us a step, for attributing the time offline (the table shows the top ones)
        "kernels": [
            {"name": n[:160], "ms_per_step": round(v[0], 4), "calls_per_step": v[1] / steps}
            for n, v in kernels
            if v[0] >= 0.005
        ],
    }


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def run_row(row: str, shape_name: str, a, work: Path, dev: torch.device, peak: float) -> dict:
    shape = SHAPES[shape_name]
    rec = {"shape": shape_name, "layers": shape[0], "width": shape[1], "vocab": shape[2], "row": row}
    if row == "fla-rwkv7-lm":
        if dev.type != "cuda":
            return {**rec, "status": "skipped (fla needs CUDA)"}
        try:
            import fla  # noqa: F401
        except Exception as exc:
            return {**rec, "status": f"unavailable ({str(exc).splitlines()[0][:100]})"}
    free_memory(dev)
    runner = None
    try:
        runner = build_runner(row, a, shape, work, dev)
        try:
            rec.update(status="ok", notes=runner.notes, **measure(runner, a, dev, peak))
        except Exception as exc:
            if row != "fla-rwkv7-lm" or isinstance(exc, torch.OutOfMemoryError):
                raise
            # fla's fused kernels may refuse fp32 weights under autocast: measure it as fla trains, in bf16
            log(f"  fp32 weights + autocast failed ({str(exc).splitlines()[0][:100]}); retrying with bf16 weights")
            runner.close()
            runner = None
            free_memory(dev)
            runner = fla_runner(a, shape, dev, contextlib.nullcontext, weights=torch.bfloat16)
            rec.update(status="ok (bf16 weights)", notes=runner.notes, **measure(runner, a, dev, peak))
    except torch.OutOfMemoryError:
        rec["status"] = "OOM"
    except Exception as exc:  # one failing row must not lose the others
        first = (str(exc).splitlines() or [""])[0][:160]
        rec["status"] = f"error: {type(exc).__name__}: {first}"
        log(f"  {row} failed:\n{traceback.format_exc()}")
    finally:
        if runner is not None:
            runner.close()
        del runner
        free_memory(dev)
    return rec


# ---------------------------------------------------------------------------------------------- sampling
def sampling_rows(shape_name: str, a, dev: torch.device) -> list[dict]:
    from bench_sampling import build_sampling_model, time_l2t, time_t2l

    L, D, V = SHAPES[shape_name]
    n, steps = a.sampling_batch, a.sampling_steps
    m = build_sampling_model(L, D, V, dev, a.sampling_length)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((n, 32)).astype(np.float32)
    texts = rng.integers(1, V, size=(n, a.sampling_length - 1)).tolist()
    bf16 = a.dtype == "bf16"
    block = max(1, a.sampling_length // 4)
    runs = {
        f"l2t {steps} steps": dict(num_steps=steps),
        f"l2t semi-AR blocks of {block}, state cache on": dict(num_steps=steps // 4 or 1, block_size=block,
                                                                use_cache=True),
        f"l2t semi-AR blocks of {block}, state cache off": dict(num_steps=steps // 4 or 1, block_size=block,
                                                                 use_cache=False),
    }  # fmt: skip
    out = []
    for name, kw in runs.items():
        log(f"  sampling: {name}")
        row, _ = time_l2t(m, latents, kw, bf16)
        out.append({"shape": shape_name, "row": name, "status": "ok", "per_s": row["sentences_per_s"],
                    "unit": "sentences/s", **row})  # fmt: skip
    log(f"  sampling: t2l ddim {steps} steps")
    row = time_t2l(m, texts, steps, bf16)
    out.append({"shape": shape_name, "row": f"t2l ddim {steps} steps (no state cache exists)", "status": "ok",
                "per_s": row["latents_per_s"], "unit": "latents/s", **row})  # fmt: skip
    del m
    free_memory(dev)
    return out


# ---------------------------------------------------------------------------------------------- report
def versions() -> dict:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for name in ("fla", "transformers", "triton"):
        try:
            out[name] = getattr(__import__(name), "__version__", "?")
        except Exception:
            out[name] = None
    return out


def _f(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def markdown(meta: dict, rows: list[dict], sampling: list[dict]) -> str:
    lines = [
        f"# Training throughput — {meta['device']}, {meta['date']}",
        "",
        f"`{meta['command']}`",
        "",
        f"torch {meta['versions']['torch']}, fla {meta['versions']['fla']}, transformers "
        f"{meta['versions']['transformers']}; batch {meta['batch']} x {meta['length']} tokens, {meta['dtype']} "
        f"autocast, fp32 master weights, AdamW; median of {meta['steps']} steps after {meta['warmup']} warm-up. "
        f"Matmul ceiling: {meta['peak_tflops']:.3g} TFLOP/s ({meta['peak_what']}).",
        *([host_line(meta["host"])] if meta.get("host") else []),
        "MFU = (6 N_grad + 4 N_frozen) x text tokens/s / ceiling; HFU = counted matmul FLOPs per step x steps/s / "
        "ceiling (bench/throughput.py docstring).",
        "",
        "| shape | row | tokens/s | tokens/s, steps back to back | step ms | peak GiB | params grad / frozen (M) "
        "| MFU | HFU | loss 1st step | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        params = f"{r['params_grad'] / 1e6:.1f} / {r['params_frozen'] / 1e6:.1f}" if "params_grad" in r else "-"
        lines.append(
            f"| {r['shape']} | {r['row']} | {_f(r.get('tokens_per_s'), ',.0f')} | "
            f"{_f(r.get('tokens_per_s_run'), ',.0f')} | {_f(r.get('step_ms_median'), '.1f')}"
            f" | {_f(r.get('peak_mem_gib'), '.1f')} | {params} | {_f(r.get('mfu'), '.1%')} | {_f(r.get('hfu'), '.1%')}"
            f" | {_f(r.get('first_loss'), '.4f')} | {r['status']} |"
        )
    for r in rows:
        prof = r.get("profile")
        if prof:
            lines += [
                "",
                f"Profile {r['shape']} {r['row']}: {prof['wall_ms_per_step']:.1f} ms wall, "
                f"{prof['gpu_kernel_ms_per_step']:.1f} ms of GPU kernels, "
                f"{prof['kernels_per_step']:.0f} kernels per step",
                "",
                "| kernel | ms / step | calls / step |",
                "|---|---:|---:|",
            ]
            lines += [
                f"| `{k['name'][:90]}` | {k['ms_per_step']:.2f} | {k['calls_per_step']:.0f} |" for k in prof["top"]
            ]
            if prof.get("categories"):
                lines += ["", "| category | ms / step | kernels / step |", "|---|---:|---:|"]
                lines += [f"| {c} | {v['ms_per_step']:.2f} | {v['calls_per_step']:.0f} |"
                          for c, v in prof["categories"].items()]  # fmt: skip
            if prof.get("ops"):
                lines += ["", "| eager operator (input shapes) | ms / step | calls / step |", "|---|---|---:|"]
                lines += [f"| `{o['op']}` {o['shapes'][:70]} | {o['ms_per_step']:.2f} | {o['calls_per_step']:.0f} |"
                          for o in prof["ops"]]  # fmt: skip
            alone = prof.get("alone") or {}
            if alone.get("steps"):
                lines += ["", f"A step alone, under the profiler (ms): {alone['lead_ms']:.2f} before its first kernel, "
                          f"{alone['busy_ms']:.2f} of kernels, {alone['idle_ms']:.2f} between them, "
                          f"{alone['tail_ms']:.2f} after the last"]  # fmt: skip
                if alone["gaps"]:
                    lines += ["", "| gap after kernel | before kernel | ms / step |", "|---|---|---:|"]
                    lines += [f"| `{g['after'][:60]}` | `{g['before'][:60]}` | {g['ms_per_step']:.3f} |"
                              for g in alone["gaps"]]  # fmt: skip
    if sampling:
        lines += ["", "| shape | sampling run | per s | unit | total s |", "|---|---|---:|---|---:|"]
        for r in sampling:
            lines.append(f"| {r['shape']} | {r['row']} | {_f(r.get('per_s'), ',.1f')} | {r.get('unit', '')} | "
                         f"{_f(r.get('total_s'), '.2f')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write(out: Path | None, meta: dict, rows: list[dict], sampling: list[dict]) -> str:
    md = markdown(meta, rows, sampling)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({**meta, "rows": rows, "sampling": sampling}, indent=1))
        (out / "results.md").write_text(md)
    return md


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="0.1b,0.4b", help=f"comma-separated: {', '.join(SHAPES)}")
    p.add_argument("--rows", default="all", help=f"'all', 'none' or comma-separated: {', '.join(ALL_ROWS)}")
    p.add_argument("--steps", type=int, default=8, help="timed steps per row (median reported)")
    p.add_argument(
        "--warmup",
        type=int,
        default=20,
        help="untimed steps first (the denoiser's masked-position head meets ~10 row-count buckets, each planned by "
        "cuBLAS once: a long run's steady state)",
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=512, help="text tokens per row")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="autocast dtype")
    p.add_argument("--device", default="cuda")
    p.add_argument("--wkv-backend", default="auto", help="auto | reference | fla | triton | cuda (our RWKV-7 rows)")
    p.add_argument(
        "--triton-config",
        default=None,
        help="launch parameters of backend triton: KEY=INT,... (models/wkv7_triton.py TritonWKVConfig) or the JSON "
        "written by bench/gpu_check_wkv.py (its 'config_timed')",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="K",
        help="after timing, profile 3 steps per row (torch.profiler) and keep the K kernels with most GPU time",
    )
    p.add_argument(
        "--host-profile",
        action="store_true",
        help="after timing, cProfile 5 steps timed alone: the host's functions by time, ms a step (host_profile)",
    )
    p.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        metavar="F",
        help="with --compile-blocks: torch._functorch.config.activation_memory_budget = F in (0, 1], the share of the "
        "saved activations the compiled blocks may keep (the partitioner recomputes the cheapest rest); 1 = torch's "
        "default",
    )
    p.add_argument(
        "--wkv-keep-states",
        type=float,
        default=None,
        metavar="F",
        help="share [0, 1] of the layers (the first ones) whose WKV kernel (backend cuda) keeps its states for the "
        "backward instead of rebuilding them there (training.wkv_keep_states); default: the kernel's default",
    )
    p.add_argument(
        "--bf16-residual",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the RWKV-7 blocks' residual stream in bf16 under bf16 autocast (training.bf16_residual); weights and "
        "optimizer stay fp32. Default: on with --dtype bf16, as the trainer's default",
    )
    p.add_argument(
        "--master-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="our rows: fp32 master weights in the optimizer and bf16 matmul weights in the model, one update kernel "
        "(rwkv_diffusion_rnn/master_weights.py; training.master_weights). Default: as the trainer's null (on CUDA "
        "with --dtype bf16 on, else off)",
    )
    p.add_argument(
        "--flat-adamw",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="our RWKV-7 LM rows: every trainable tensor, fp32, a view of flat buffers updated by one Triton launch a "
        "parameter group (master_weights.MasterAdamW without bf16 copies) instead of torch's fused AdamW. Default: as "
        "the trainer's training.flat_adamw=null (on CUDA on, on the CPU off)",
    )
    p.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set torch._inductor.config.NAME (dotted for sub-configs, e.g. triton.cudagraphs) before anything is "
        "compiled; VALUE is read as a Python literal (True, 1, 0.5, 'x'); repeatable. For A/Bs of Inductor's options",
    )
    p.add_argument("--compile", action="store_true", help="training.compile=true for the denoiser rows")
    p.add_argument(
        "--compile-regions",
        action="store_true",
        help="torch.compile the blocks' elementwise regions (models/rwkv7_compile.py) in our rows",
    )
    p.add_argument(
        "--compile-blocks",
        action="store_true",
        help="torch.compile each RWKV-7 block, the WKV call excluded (models/rwkv7_compile.py)",
    )
    p.add_argument(
        "--compile-denoiser",
        action="store_true",
        help="denoiser rows: compile its embeddings, time modulation and latent head around the blocks "
        "(training.compile_denoiser; models/rwkv_denoiser.py compile_denoiser_regions)",
    )
    p.add_argument(
        "--device-cache",
        action="store_true",
        help="denoiser rows: data.device_cache=true (batches indexed on the device, no host collation per step)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay our backbone's blocks (fwd + bwd) as CUDA graphs (models/graphs.py; training.cuda_graphs)",
    )
    p.add_argument(
        "--chunked-ce",
        action="store_true",
        help="our rows: head + cross-entropy in row chunks, no logits kept (models/chunked_ce.py)",
    )
    p.add_argument(
        "--ce-chunk",
        type=int,
        default=None,
        help="rows a chunk of the chunked head + cross-entropy (default: models/chunked_ce.py's DEFAULT_CHUNK)",
    )
    p.add_argument("--no-count-flops", dest="count_flops", action="store_false", help="skip the HFU column")
    p.add_argument("--sampling", action="store_true", help="also measure sampling speed per shape")
    p.add_argument("--sampling-batch", type=int, default=256)
    p.add_argument("--sampling-length", type=int, default=32)
    p.add_argument("--sampling-steps", type=int, default=32)
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    p.add_argument(
        "--append",
        metavar="FILE",
        help="append the final table (its heading names the card, the date and the command) to this markdown file, "
        "e.g. docs/RESULTS.md, the project's lab notebook",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    rows = ALL_ROWS if a.rows == "all" else [] if a.rows == "none" else [r.strip() for r in a.rows.split(",")]
    bad = [s for s in shapes if s not in SHAPES] + [r for r in rows if r not in ALL_ROWS]
    if bad:
        print(f"unknown shape or row {bad[0]!r}; shapes: {', '.join(SHAPES)}; rows: {', '.join(ALL_ROWS)}")
        return 2
    if a.append and not Path(a.append).parent.is_dir():  # before the measurements, not after them
        print(f"--append {a.append}: its folder does not exist")
        return 2
    triton_config = None
    if a.triton_config:
        from rwkv_diffusion_rnn.models import wkv7_triton

        try:
            if "=" in a.triton_config:  # inline: fwd_bv=32,fwd_warps=2,...
                triton_config = dict(kv.split("=", 1) for kv in a.triton_config.split(","))
            else:
                triton_config = json.loads(Path(a.triton_config).read_text())["config_timed"]
            for k, v in triton_config.items():
                if not hasattr(wkv7_triton.CONFIG, k):
                    raise KeyError(f"unknown launch parameter {k!r}")
                setattr(wkv7_triton.CONFIG, k, int(v))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(
                f"--triton-config {a.triton_config}: expected KEY=INT,... ({', '.join(vars(wkv7_triton.CONFIG))}) "
                f"or gpu_check_wkv.py's JSON with 'config_timed' ({e})"
            )
            return 2
    from rwkv_diffusion_rnn.models.wkv7 import BACKENDS

    if a.wkv_backend not in ("auto", *BACKENDS):
        print(f"--wkv-backend {a.wkv_backend}: expected one of auto, {', '.join(BACKENDS)}")
        return 2
    if a.ce_chunk is not None:
        if a.ce_chunk <= 0:
            print(f"--ce-chunk {a.ce_chunk}: expected a positive row count")
            return 2
        from rwkv_diffusion_rnn.models import chunked_ce

        chunked_ce.DEFAULT_CHUNK = a.ce_chunk
    if a.memory_budget is not None and not 0 < a.memory_budget <= 1:  # compile_blocks applies it
        print(f"--memory-budget {a.memory_budget}: expected a share in (0, 1]")
        return 2
    if a.wkv_keep_states is not None and not 0 <= a.wkv_keep_states <= 1:
        print(f"--wkv-keep-states {a.wkv_keep_states}: expected a share in [0, 1]")
        return 2
    if a.bf16_residual is None:
        a.bf16_residual = a.dtype == "bf16"
    elif a.bf16_residual and a.dtype != "bf16":
        print(f"--bf16-residual needs --dtype bf16 (the stream in autocast's dtype); got {a.dtype}")
        return 2
    if a.memory_budget is not None and not a.compile_blocks:
        print("--memory-budget acts on compiled blocks: add --compile-blocks")
        return 2
    try:
        inductor_options = set_inductor_options(a.inductor)
    except ValueError as e:
        print(f"--inductor: {e}")
        return 2
    dev = torch.device(a.device)
    if dev.type == "cuda":
        if dev.index is None:  # "cuda" alone: the current device, named by index from here on
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (none in the hot path)
    out = Path(a.out) if a.out else None
    host = host_info(dev)
    log(host_line(host))
    log(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}; measuring the matmul ceiling")
    peak, what = matmul_peak(dev)
    log(f"matmul ceiling {peak / 1e12:.3g} TFLOP/s ({what})")
    meta = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": versions(),
        "host": host,
        "peak_tflops": peak / 1e12,
        "peak_what": what,
        "triton_config": triton_config,
        "memory_budget": a.memory_budget,
        "wkv_keep_states": a.wkv_keep_states,
        "bf16_residual": a.bf16_residual,
        "ce_chunk": a.ce_chunk,
        "inductor": inductor_options,
        **{
            k: getattr(a, k)
            for k in (
                "batch",
                "length",
                "dtype",
                "steps",
                "warmup",
                "compile",
                "compile_regions",
                "compile_blocks",
                "wkv_backend",
            )
        },
    }
    results: list[dict] = []
    sampling: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="diffrwkv_tp_") as tmp:
        work = Path(tmp)
        for shape_name in shapes:
            for row in rows:
                log(f"{shape_name} {row}: start")
                rec = run_row(row, shape_name, a, work, dev, peak)
                results.append(rec)
                write(out, meta, results, sampling)
                log(f"{shape_name} {row}: {rec['status']} {_f(rec.get('tokens_per_s'), ',.0f')} tokens/s, "
                    f"peak {_f(rec.get('peak_mem_gib'), '.1f')} GiB, MFU {_f(rec.get('mfu'), '.1%')}")  # fmt: skip
            if a.sampling:
                log(f"{shape_name} sampling: start")
                try:
                    sampling += sampling_rows(shape_name, a, dev)
                except torch.OutOfMemoryError:
                    sampling.append({"shape": shape_name, "row": "sampling", "status": "OOM"})
                    free_memory(dev)
                write(out, meta, results, sampling)
            for f in work.glob("*.pth"):  # the next shape needs its own; keep the disk free
                f.unlink()
    md = write(out, meta, results, sampling)
    print(md, flush=True)
    if a.append:
        with open(a.append, "a") as f:  # its "# Training throughput" heading becomes a notebook entry ("## ...")
            f.write("\n" + ("#" + md if md.startswith("# ") else md))
        log(f"appended to {a.append}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
