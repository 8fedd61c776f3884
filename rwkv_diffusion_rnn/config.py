"""The training configuration schema: typed dataclasses, one per section of ``configs/rwkv_mmdit.yaml``.

Every key the original rwkv_diffusion_rnn README names exists here with its documented meaning.
``train_rwkv.py`` registers :class:`TrainConfig` with Hydra as the schema of the YAML file, so a misspelled or
unknown key is an error that names it. Library code receives the plain dataclass (no Hydra or OmegaConf objects
past the entry point).

Derived values (global batch, steps per epoch) are computed once in :func:`derived` and checked there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rwkv_diffusion_rnn.errors import DiffRwkvError

LOSS_TYPES = ("unconditional", "l2t", "t2l", "mixed", "sequential")
DTYPES = ("fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
CHECKPOINT_FORMATS = ("auto", "file", "dcp")
# data.num_workers: the trainer reads each step's rows itself (data_simple.DataConfig.num_workers)
NUM_WORKERS_REFUSED = (
    "data.num_workers is {}; expected 0: training reads rows in its own process (on CUDA the next step's rows are "
    "read while the GPU computes), with no worker processes"
)


@dataclass
class ModelConfig:
    rwkv_name: str = "BlinkDL/rwkv7-g1"  # local .pth / HF folder, or a hub repo id; "scratch" = new random backbone
    rwkv_filename: str | None = None  # file inside a hub repo (BlinkDL/rwkv7-g1 holds several .pth)
    rwkv_revision: str | None = None  # hub commit to pin (recommended whenever a hub id is used)
    cache_dir: str | None = None  # Hugging Face cache folder
    local_files_only: bool = False  # never touch the network for the weights
    trust_remote_code: bool = False  # only false: weights never run code (see tokenizer.trust_remote_code)
    # new backbone (rwkv_name: scratch): BlinkDL's init at this shape
    n_layer: int = 6
    n_embd: int = 512
    vocab_size: int = 65536
    # full: the World vocabulary; data (new backbones only): the token ids the training data uses, plus end-of-text
    # and an unknown id (rwkv_diffusion_rnn/vocab.py) -- far smaller embedding and head for small corpora
    vocab: str = "full"
    wkv_backend: str = "auto"  # auto | reference | fla | triton | cuda (our own kernels, opt-in: models/wkv7_*.py)
    freeze_backbone: bool = True  # backbone weights never change and never reach the optimizer
    unfreeze_patterns: list[str] = field(default_factory=list)  # fnmatch on BlinkDL names, e.g. "blocks.1[01].*"
    unfreeze_after_steps: int = 0  # apply unfreeze_patterns at this step (0: from the start)
    lora_rank: int = 0  # > 0: LoRA adapters on the backbone's linear layers (backbone stays frozen)
    lora_alpha: float = 16.0
    use_rwkv_lm_head: bool = False  # False: train a fresh text head
    latent_dim: int = 32
    latent_prefix_len: int = 1
    latent_readout_len: int = 1
    context: str = "causal"  # causal | twice | bidirectional (models/rwkv_denoiser.py)
    time_conditioning: str = "film"  # film | add
    film_every_block: bool = False
    latent_film: bool = False  # the noisy latent also feeds the FiLM MLP: every position sees it, not only the prefix
    time_embed_dim: int = 128
    latent_head_hidden: int = 0  # 0: backbone width


@dataclass
class TokenizerConfig:
    name: str = "BlinkDL/rwkv7-g1"  # resolves offline to the RWKV World vocabulary
    local_files_only: bool = True
    cache_dir: str | None = None
    trust_remote_code: bool = False


@dataclass
class DataSection:
    json_path: str | None = "preprocessed_data/qwen_32d/train_data.json"
    token_dir: str = "preprocessed_data/rwkv_tokens/train"
    latent_dir: str = "preprocessed_data/qwen_32d/latents/train"
    max_samples: int | None = None
    num_workers: int = 0  # only 0 (NUM_WORKERS_REFUSED says why)
    validation_fraction: float = 0.0  # > 0: hold out this fraction of train; 0: use the validation split beside it
    seed: int = 0  # seed of the validation_fraction hash split (the training order follows training.seed)
    on_bad_sample: str = "error"  # error | skip
    max_length: int | None = 512
    # Fixed-length rows (MDLM's recipe): text, then end-of-text tokens (id 0) up to exactly this many tokens, all in
    # the loss, so the model learns where a text ends; samplers generate this many tokens and cut at the first
    # end-of-text. None: variable-length rows (padding outside the loss); samplers then need explicit lengths.
    pad_to_length: int | None = None
    # Keep the whole training split on the training device as padded tensors and index batches there: no per-row
    # reads and collation on the host each step (small models are host-bound). For splits that fit the device:
    # rows x longest row x 8 bytes (145k captions x 40 tokens: 46 MB).
    device_cache: bool = False


@dataclass
class DiffusionConfig:
    text_schedule: str = "loglinear"  # MDLM log-linear masking schedule
    text_eps: float = 1e-3
    # uniform (plain masked CE) | elbo (MDLM continuous-time NELBO weights 1/t). uniform won latent -> text on real
    # captions in every GPU comparison, with a lower validation NELBO (diffrwkv evaluate) too (docs/RESULTS.md
    # 2026-11-27)
    text_weighting: str = "uniform"
    latent_schedule: str = "cosine"  # continuous-time cosine VP
    latent_prediction: str = "x0"  # x0 | eps | v (x0 won text->latent on captions: docs/RESULTS.md 2026-11-27)
    antithetic: bool = True
    p_uncond: float = 0.1  # condition dropout for classifier-free guidance (the condition is fed fully noised)
    # share of text-loss rows whose text before a random boundary is given clean (t = 0) while the rest is diffused
    # at the row's t: trains semi-autoregressive decoding (--block-size) in-distribution (objectives.py)
    clean_prefix: float = 0.0
    # t2l rows draw their latent time as t ** p: p < 1 puts more of them near t = 1, the only time one-step text ->
    # latent sampling asks about; 1 = uniform like every other row (objectives.py; the demo uses 0.5)
    t2l_time_power: float = 1.0


@dataclass
class TrainingConfig:
    loss_type: str = "mixed"  # unconditional | l2t | t2l | mixed | sequential
    mixed_weights: dict[str, float] = field(default_factory=lambda: {"l2t": 1.0, "t2l": 1.0, "unconditional": 0.5})
    sequential_schedule: list[str] = field(default_factory=lambda: ["l2t:0", "t2l:1000", "mixed:2000"])  # mode:step
    latent_loss_weight: float = 1.0
    num_epochs: int = 1
    max_steps: int | None = None  # overrides num_epochs when set
    train_batch_size: int = 8  # per device, per micro-step
    eval_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    dtype: str = "bf16"  # fp32 | bf16 | fp16: autocast dtype; master weights stay fp32
    ema_decay: float = 0.0  # 0: no EMA
    compile: bool = False  # torch.compile the denoiser
    compile_blocks: bool = False  # torch.compile each RWKV-7 block, the WKV kernel excluded (models/rwkv7_compile.py)
    # with compile_blocks: share (0, 1] of a block's saved activations kept for the backward; the rest is recomputed
    # (0.5: 0.4B peak 19.3 -> 13.6 GiB for 3 % speed on an H200). 1 = keep all (torch's default)
    memory_budget: float = 1.0
    # WKV backend cuda: share [0, 1] of the layers (the first ones) whose WKV forward keeps its states for the
    # backward (~150 MiB a layer at 0.4B, B16 T512) instead of the backward running the forward again (one WKV
    # forward a layer more); null: the kernel's default (keep; DIFFRWKV_WKV_CUDA_RECOMPUTE=1 rebuilds in every layer)
    wkv_keep_states: float | None = None
    # the blocks' residual stream (their input, norm outputs and the sums added to it, and the gradients of these)
    # in bf16 under dtype bf16, as BlinkDL's trainer runs it; weights, gradients and optimizer stay fp32
    # (models/rwkv7.py set_bf16_residual). null: on with dtype bf16, off with the others
    bf16_residual: bool | None = None
    # fp32 master weights in the optimizer, bf16 matmul weights in the model, one update kernel that writes both
    # (master_weights.py): under dtype bf16 autocast has no weight to cast and the gradients stay bf16. null: on
    # where it applies (CUDA with Triton, dtype bf16, one process, no fsdp, model.unfreeze_after_steps=0), off
    # elsewhere: on an H100 0.7 / 2.4 ms of kernels less a 0.1B / 0.4B step, the same peak memory (docs/RESULTS.md)
    master_weights: bool | None = None
    # AdamW as one Triton launch a parameter group over flat fp32 buffers, every trainable tensor a view of them
    # (master_weights.MasterAdamW without bf16 copies; the same update and state dict as torch's AdamW), instead of
    # torch's fused AdamW: on an H100 0.6 / 1.5 ms less a 0.1B / 0.4B step, the same peak memory (docs/RESULTS.md,
    # 2026-12-07). null: on where it applies (CUDA, one process, a fixed trainable set, no fsdp, no master weights)
    flat_adamw: bool | None = None
    chunked_ce: bool = False  # masked-position head + cross-entropy in row chunks: no [N, V] logits kept (memory)
    cuda_graphs: bool = False  # the blocks' fwd + bwd replayed as CUDA graphs; one CUDA process (models/graphs.py)
    # torch.compile the denoiser's own work around the blocks in its training forward: embeddings + layout, the
    # time/latent modulation, the final norm + latent head (models/rwkv_denoiser.py compile_denoiser_regions)
    compile_denoiser: bool = False
    seed: int = 0
    resume: str | None = None  # a checkpoint folder (step_XXXXXXXX) or a save_dir (newest checkpoint)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # several processes (docs/multi_gpu.md): ddp = every rank holds the whole model, gradients all-reduced;
    # fsdp = FSDP2 (fully_shard per RWKV block, then the root): parameters, gradients and optimizer state sharded
    strategy: str = "ddp"
    activation_checkpointing: bool = False  # recompute each RWKV block in the backward pass (memory for compute)


@dataclass
class LoggingConfig:
    log_freq: int = 10  # steps between metric lines (the only steps that read numbers back from the GPU)
    eval_freq: int = 500  # steps between validation passes: val_masked_ce_bits, val_latent_mse (train_metrics.py)
    eval_batches: int = 8  # validation batches per pass
    save_dir: str = "outputs/rwkv_mmdit"
    save_freq: int = 1000  # steps between checkpoints (and one at the end)
    keep_last: int = 3
    # file: one folder of safetensors written by rank 0 (needs the whole model on rank 0); dcp: sharded
    # torch.distributed.checkpoint, written by every rank, loadable on any number of ranks; auto: dcp under fsdp
    checkpoint_format: str = "auto"
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "diffrwkv"
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataSection = field(default_factory=DataSection)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def parse_sequential(schedule: list[str]) -> list[tuple[int, str]]:
    """``["l2t:0", "t2l:1000"]`` -> ``[(0, "l2t"), (1000, "t2l")]``, checked and sorted by step."""
    out = []
    for item in schedule:
        mode, _, step = str(item).partition(":")
        if mode not in LOSS_TYPES or mode == "sequential" or not step.strip().isdigit():
            raise DiffRwkvError(f"training.sequential_schedule entry '{item}': expected '<mode>:<step>' with mode in "
                                "unconditional, l2t, t2l, mixed")  # fmt: skip
        out.append((int(step), mode))
    out.sort()
    if not out or out[0][0] != 0:
        raise DiffRwkvError("training.sequential_schedule must start at step 0 (e.g. 'l2t:0')")
    return out


def validate(cfg: TrainConfig) -> None:
    """Check values a type cannot express; each failure names its key."""
    t, m, d = cfg.training, cfg.model, cfg.diffusion
    checks: list[tuple[bool, str]] = [
        (t.loss_type in LOSS_TYPES, f"training.loss_type must be one of {', '.join(LOSS_TYPES)}; got '{t.loss_type}'"),
        (t.dtype in DTYPES, f"training.dtype must be one of {', '.join(DTYPES)}; got '{t.dtype}'"),
        (t.train_batch_size >= 1, "training.train_batch_size must be >= 1"),
        (t.eval_batch_size >= 1, "training.eval_batch_size must be >= 1"),
        (t.grad_accum_steps >= 1, "training.grad_accum_steps must be >= 1"),
        (t.num_epochs >= 1 or (t.max_steps or 0) >= 1, "training.num_epochs (or training.max_steps) must be >= 1"),
        (t.lr > 0, "training.lr must be > 0"),
        (len(t.betas) == 2, "training.betas must have two values"),
        (0 <= t.ema_decay < 1, "training.ema_decay must be in [0, 1)"),
        (0 <= d.p_uncond < 1, "diffusion.p_uncond must be in [0, 1)"),
        (0 <= d.clean_prefix <= 1, "diffusion.clean_prefix must be in [0, 1]"),
        (0 < d.t2l_time_power <= 1, "diffusion.t2l_time_power must be in (0, 1]"),
        (d.latent_prediction in ("eps", "x0", "v"),
         f"diffusion.latent_prediction must be eps, x0 or v; got '{d.latent_prediction}'"),
        (m.latent_dim >= 1, "model.latent_dim must be >= 1"),
        (m.vocab in ("full", "data"), f"model.vocab must be 'full' or 'data'; got '{m.vocab}'"),
        (m.vocab == "full" or m.rwkv_name == "scratch",
         "model.vocab=data needs model.rwkv_name=scratch (a new backbone)"),
        (cfg.logging.log_freq >= 1 and cfg.logging.save_freq >= 1 and cfg.logging.eval_freq >= 1,
         "logging.log_freq, logging.eval_freq and logging.save_freq must be >= 1"),
        (cfg.data.on_bad_sample in ("error", "skip"), "data.on_bad_sample must be 'error' or 'skip'"),
        (cfg.data.num_workers == 0, NUM_WORKERS_REFUSED.format(cfg.data.num_workers)),
        (not m.trust_remote_code,
         "model.trust_remote_code must be false: backbone weights are read as tensors and never run code "
         "(tokenizer.trust_remote_code is the tokenizer's)"),
        (t.strategy in STRATEGIES, f"training.strategy must be one of {', '.join(STRATEGIES)}; got '{t.strategy}'"),
        (cfg.logging.checkpoint_format in CHECKPOINT_FORMATS,
         f"logging.checkpoint_format must be one of {', '.join(CHECKPOINT_FORMATS)}; "
         f"got '{cfg.logging.checkpoint_format}'"),
        (t.strategy != "fsdp" or t.dtype != "fp16",
         "training.strategy=fsdp supports training.dtype fp32 or bf16, not fp16 (no sharded loss scaler)"),
        (t.strategy != "fsdp" or m.unfreeze_after_steps == 0,
         "training.strategy=fsdp needs model.unfreeze_after_steps=0 (the trainable set is fixed when sharding)"),
        (0 < t.memory_budget <= 1, f"training.memory_budget must be in (0, 1]; got {t.memory_budget}"),
        (t.wkv_keep_states is None or 0 <= t.wkv_keep_states <= 1,
         f"training.wkv_keep_states must be null or in [0, 1]; got {t.wkv_keep_states}"),
        (t.bf16_residual is not True or t.dtype == "bf16",
         f"training.bf16_residual needs training.dtype bf16 (the stream in autocast's dtype); got dtype {t.dtype}"),
        (t.master_weights is not True or t.dtype == "bf16",
         f"training.master_weights needs training.dtype bf16 (the model's copies are bf16); got dtype {t.dtype}"),
        (t.master_weights is not True or t.strategy != "fsdp",
         "training.master_weights and training.strategy=fsdp: FSDP2 keeps its own bf16 copies; set one of them"),
        (t.master_weights is not True or m.unfreeze_after_steps == 0,
         "training.master_weights needs model.unfreeze_after_steps=0 (its buffers hold a fixed set of tensors)"),
        (t.flat_adamw is not True or t.strategy != "fsdp",
         "training.flat_adamw and training.strategy=fsdp: FSDP2 shards the parameters; set one of them"),
        (t.flat_adamw is not True or m.unfreeze_after_steps == 0,
         "training.flat_adamw needs model.unfreeze_after_steps=0 (its buffers hold a fixed set of tensors)"),
        (t.memory_budget == 1 or t.compile_blocks,
         "training.memory_budget < 1 acts on compiled blocks: set training.compile_blocks=true"),
        (not (t.compile and t.compile_denoiser),
         "training.compile_denoiser compiles parts of the denoiser that training.compile already compiles whole: "
         "set one of them"),
        (not t.cuda_graphs or (m.lora_rank == 0 and not t.activation_checkpointing and not t.compile),
         "training.cuda_graphs cannot be combined with model.lora_rank > 0, training.activation_checkpointing or "
         "training.compile"),
    ]  # fmt: skip
    for ok, msg in checks:
        if not ok:
            raise DiffRwkvError(msg)
    if t.loss_type == "mixed":
        bad = [k for k in t.mixed_weights if k not in ("unconditional", "l2t", "t2l")]
        if bad or not any(v > 0 for v in t.mixed_weights.values()):
            raise DiffRwkvError("training.mixed_weights: keys must be unconditional/l2t/t2l with a positive weight")
    if t.loss_type == "sequential":
        parse_sequential(t.sequential_schedule)


def config_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (``training.num_epochs``, ...), sections included."""
    from dataclasses import fields, is_dataclass

    cfg = TrainConfig() if cfg is None else cfg
    keys = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        keys.append(prefix + f.name)
        if is_dataclass(value):
            keys += config_keys(value, prefix + f.name + ".")
    return keys


def did_you_mean(key: str) -> str | None:
    """The schema key nearest to a misspelled ``key`` (``training.num_epoch`` -> ``training.num_epochs``), or None
    when nothing is close. Keys are matched whole, then by their last part among all sections (a key put in the
    wrong section)."""
    import difflib

    if not key or key in config_keys():
        return None
    keys = config_keys()
    hit = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if hit:
        return hit[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys if "." in k}
    hit = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
    return by_leaf[hit[0]] if hit else None


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain JSON-able data (stored in every checkpoint)."""
    from dataclasses import asdict

    return asdict(cfg)
