"""Train the denoiser (the entry point of the original rwkv_diffusion_rnn scripts). Hydra reads
``configs/rwkv_mmdit.yaml`` (schema: :mod:`rwkv_diffusion_rnn.config`; an unknown key fails and names it).

    python rwkv_diffusion_rnn/train_rwkv.py --config-name rwkv_mmdit training.num_epochs=1 \\
        training.train_batch_size=1 training.dtype=fp32 data.max_samples=10 model.rwkv_name=/path/to/rwkv7-g1.pth
    diffrwkv train model.rwkv_name=scratch model.freeze_backbone=false ...       # same thing
    torchrun --nproc_per_node 2 rwkv_diffusion_rnn/train_rwkv.py ...             # several processes (DDP)
    torchrun --nproc_per_node 4 rwkv_diffusion_rnn/train_rwkv.py training.strategy=fsdp \
        training.activation_checkpointing=true ...                               # sharded (FSDP2), docs/multi_gpu.md

Bad input or an unreachable checkpoint stops with one line (``error: ...``, exit status 2).
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from rwkv_diffusion_rnn.config import TrainConfig, did_you_mean
from rwkv_diffusion_rnn.errors import DiffRwkvError

ConfigStore.instance().store(name="rwkv_mmdit_schema", node=TrainConfig)


@hydra.main(version_base="1.3", config_path="configs", config_name="rwkv_mmdit")
def _hydra_main(cfg: DictConfig) -> None:
    from rwkv_diffusion_rnn import distributed
    from rwkv_diffusion_rnn.improved_trainer import Trainer

    try:
        config: TrainConfig = OmegaConf.to_object(cfg)
        trainer = Trainer(config)
        result = trainer.fit()
        distributed.print0("final: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))
        distributed.print0(next_steps(config, trainer.save_dir))
    except DiffRwkvError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        distributed.cleanup()


def next_steps(config: TrainConfig, save_dir) -> str:
    """Where the checkpoint went and the commands that use it (the run's last lines)."""
    from pathlib import Path

    from rwkv_diffusion_rnn.checkpoints import latest_checkpoint

    ckpt = latest_checkpoint(save_dir) or save_dir
    d = config.data
    data = Path(d.json_path).parent.parent if d.json_path else Path(d.latent_dir).parent.parent.parent
    return (f"checkpoint written to {ckpt}\n"
            f"next: diffrwkv sample --checkpoint {save_dir} --data {data} --limit 8      # latent -> text\n"
            f"      diffrwkv evaluate --checkpoint {save_dir} --data {data}")  # fmt: skip


def _check_overrides(args: list[str]) -> None:
    """Refuse an unknown key or a value of the wrong type in one line (Hydra's own report spans several lines)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [a for a in args if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    try:
        overrides = OverridesParser.create().parse_overrides(plain)
    except Exception as exc:
        raise DiffRwkvError(f"command line: {' '.join(str(exc).split())}") from exc
    schema = OmegaConf.structured(TrainConfig)
    for o in overrides:
        if o.is_delete() or o.is_sweep_override():
            continue
        try:
            OmegaConf.update(schema, o.key_or_group, o.value(), merge=True)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            hint = did_you_mean(o.key_or_group)
            hint = f"; did you mean {hint}?" if hint else ""
            raise DiffRwkvError(f"override '{o.input_line}': {first}{hint}") from exc


def main(argv: list[str] | None = None) -> int:
    """``diffrwkv train [overrides...]``: Hydra parses ``sys.argv``, so hand it ours."""
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    try:
        _check_overrides(sys.argv[1:])
    except DiffRwkvError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    _hydra_main()
    return 0


if __name__ == "__main__":
    main()
