"""Rebuild a trained denoiser from a checkpoint folder, for sampling and evaluation.

    from rwkv_diffusion_rnn.pipeline import load_trained
    m = load_trained("outputs/rwkv_mmdit/step_00001000", device="cuda")   # or the save_dir: newest checkpoint
    m.denoiser, m.text, m.latent, m.normalizer, m.tokenizer, m.config

A checkpoint holds the trainable tensors and the resolved config: a frozen backbone is re-read from the
path recorded in the checkpoint and must have the recorded sha256; a backbone trained from scratch is rebuilt at
its recorded shape and filled from the checkpoint. With ``ema=True`` (default) the EMA weights are used where the
run kept an EMA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rwkv_diffusion_rnn.backbone_ref import backbone_sha256
from rwkv_diffusion_rnn.checkpoints import apply_model_tensors, load_checkpoint
from rwkv_diffusion_rnn.config import TrainConfig
from rwkv_diffusion_rnn.continuous_diffusion import GaussianDiffusion, LatentNormalizer, build_latent_schedule
from rwkv_diffusion_rnn.diffusion_process import MaskedDiffusion, build_text_schedule
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, RWKVDenoiser
from rwkv_diffusion_rnn.tokenizer import load_tokenizer
from rwkv_diffusion_rnn.vocab import CompactTokenizer, TokenMap


@dataclass
class LoadedModel:
    denoiser: RWKVDenoiser
    text: MaskedDiffusion
    latent: GaussianDiffusion
    normalizer: LatentNormalizer
    tokenizer: object
    config: TrainConfig
    step: int
    path: Path
    token_map: TokenMap | None = None  # compact vocabulary (model.vocab=data): World ids -> model ids


def config_from_dict(d: dict) -> TrainConfig:
    """A checkpoint's stored config as a :class:`TrainConfig` (unknown keys are an error)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), d))


def load_trained(path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> LoadedModel:
    ck = load_checkpoint(path)
    tensors = dict(ck.model_tensors)
    if ema and ck.ema is not None:
        tensors.update({k: v.to(tensors[k].dtype) for k, v in ck.ema["shadow"].items() if k in tensors})
    return build_model(ck.config, ck.extra or {}, ck.backbone, tensors, ck.path, ck.step, device)


def build_model(
    config: dict,
    extra: dict,
    backbone_ref: dict | None,
    tensors: dict[str, torch.Tensor],
    where: Path,
    step: int,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """The model a checkpoint describes: its stored ``config``, its ``extra`` (backbone and denoiser shapes,
    normaliser, compact vocabulary), its backbone reference ``{"path", "sha256"}`` (None: rebuilt from
    ``extra["backbone_config"]``) and the trained ``tensors``. ``where`` names the source in errors."""
    cfg = config_from_dict(config)
    bcfg = RWKV7Config(**extra["backbone_config"]) if "backbone_config" in extra else None
    if backbone_ref:  # a pretrained backbone, referenced by path + hash
        from rwkv_diffusion_rnn.pretrained_rwkv import load_rwkv_model

        bpath = Path(backbone_ref["path"])
        if not bpath.exists():
            raise DiffRwkvError(f"{where}: its backbone {bpath} is missing; put the file back at that path")
        if backbone_ref.get("sha256") and backbone_sha256(bpath) != backbone_ref["sha256"]:
            raise DiffRwkvError(f"{where}: backbone {bpath} changed since training (sha256 differs)")
        backbone = load_rwkv_model(bpath, wkv_backend=cfg.model.wkv_backend)
    else:
        if bcfg is None:
            raise DiffRwkvError(f"{where}: no backbone reference and no backbone_config in meta.json")
        backbone = RWKV7(bcfg, wkv_backend=cfg.model.wkv_backend)  # every trained tensor is overwritten below
    dcfg = DenoiserConfig(**extra["denoiser"]) if "denoiser" in extra else DenoiserConfig()
    if isinstance(dcfg.lora_targets, list):
        dcfg.lora_targets = tuple(dcfg.lora_targets)
    denoiser = RWKVDenoiser(backbone, dcfg)
    with torch.no_grad():
        apply_model_tensors(denoiser, tensors, where=str(where))
    denoiser = denoiser.to(device).eval()
    dc = cfg.diffusion
    text = MaskedDiffusion(build_text_schedule(dc.text_schedule, eps=dc.text_eps), denoiser.mask_id, dc.text_weighting)
    latent = GaussianDiffusion(build_latent_schedule(dc.latent_schedule), dc.latent_prediction)
    normalizer = LatentNormalizer.from_state_dict(extra["normalizer"])
    tc = cfg.tokenizer
    tok = load_tokenizer(
        tc.name, local_files_only=tc.local_files_only, cache_dir=tc.cache_dir, trust_remote_code=tc.trust_remote_code
    )
    token_map = None
    if "vocab_ids" in extra:  # a compact vocabulary (model.vocab=data): the tokenizer speaks the model's ids
        token_map = TokenMap(extra["vocab_ids"])
        tok = CompactTokenizer(tok, token_map)
        denoiser.sample_banned_ids = (token_map.unk,)  # never generate the unknown id
    return LoadedModel(denoiser, text, latent, normalizer, tok, cfg, step, Path(where), token_map)
