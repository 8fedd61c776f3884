"""Baseline (b) of the captions harness, ``regress`` — text -> latent: the same RWKV-7 shape as an encoder over the
fixed-length row, its final hidden states mean-pooled over the text and its first end-of-text, and an MLP head (the
denoiser's latent-head shape) predicting the standardised latent; loss MSE (default) or 1 - cosine in the raw
latent space (``--regress-loss``). Evaluation: its prediction for the diffusion runs' T2L inputs (every caption-1
and every STS-B sentence).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from captions_baselines import TrainData, autocast, train_baseline
from captions_common import Eval, budget_text, say
from torch import nn

from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config


class MeanPoolRegressor(nn.Module):
    """RWKV-7 encoder + mean pooling + MLP -> standardised latent (baseline b)."""

    def __init__(
        self, n_layer: int, n_embd: int, vocab_size: int, latent_dim: int = 32, wkv_backend: str = "auto", seed: int = 0
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = RWKV7(RWKV7Config.for_shape(n_layer, n_embd, vocab_size), wkv_backend=wkv_backend)
        self.backbone.head.requires_grad_(False)  # the LM head takes no part
        self.head = nn.Sequential(nn.Linear(n_embd, n_embd), nn.SiLU(), nn.Linear(n_embd, latent_dim))

    def forward(self, ids: torch.Tensor, text_len: torch.Tensor) -> torch.Tensor:
        """``ids`` [B, L] fixed-length rows, ``text_len`` [B] text tokens per row -> [B, D]. Pools positions
        ``0 .. text_len`` (the text and its first end-of-text)."""
        h = self.backbone.hidden_states(ids)
        L = ids.shape[1]
        keep = (torch.arange(L, device=ids.device)[None] <= text_len.clamp(max=L - 1)[:, None]).to(h.dtype)
        pooled = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        return self.head(pooled.float())


def regress_loss_fn(kind: str, mean: torch.Tensor, std: torch.Tensor):
    """MSE on the standardised latent, or 1 - cosine in the raw latent space."""
    if kind not in ("mse", "cosine"):
        raise ValueError(f"regress loss must be mse or cosine, got {kind!r}")

    def loss(model: MeanPoolRegressor, ids, text_len, z) -> torch.Tensor:
        pred = model(ids, text_len).float()
        if kind == "mse":
            return F.mse_loss(pred, z)
        return (1 - F.cosine_similarity(pred * std + mean, z * std + mean, dim=-1)).mean()

    return loss


@torch.no_grad()
def regress_predict(
    model: MeanPoolRegressor, rows: torch.Tensor, text_len: torch.Tensor, dtype: str, batch_size: int = 256
) -> torch.Tensor:
    """Standardised predictions [N, D] (float32)."""
    model.eval()
    out = []
    for lo in range(0, rows.shape[0], batch_size):
        with autocast(rows.device, dtype):
            out.append(model(rows[lo : lo + batch_size], text_len[lo : lo + batch_size]).float())
    return torch.cat(out) if out else torch.zeros(0, model.head[-1].out_features, device=rows.device)


# ------------------------------------------------------------------------------------------------------ the run
def run_regress(args, data: TrainData, ev: Eval, dev: torch.device, shared: dict) -> tuple[dict, np.ndarray]:
    """Train and evaluate the regression baseline (``shared``: the settings every run records). Returns (its JSON,
    its T2L predictions in the raw latent space)."""
    tm = data.token_map
    model = MeanPoolRegressor(args.n_layer, args.n_embd, tm.size, seed=args.seed).to(dev)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"regress: {n_params:,} trainable parameters ({args.regress_loss}); training for {budget_text(args)}")
    mean = torch.as_tensor(data.mean, dtype=torch.float32, device=dev)
    std = torch.as_tensor(data.std, dtype=torch.float32, device=dev)
    tr = train_baseline(model, data, regress_loss_fn(args.regress_loss, mean, std), args, dev, "regress")
    t1 = time.perf_counter()
    rows, lens = ev.t2l_fixed(tm, args.length)
    z = regress_predict(
        model, torch.as_tensor(rows, device=dev), torch.as_tensor(lens, device=dev), args.dtype, args.eval_batch
    )
    pred = data.raw(z.cpu().numpy())
    t2l = ev.t2l_metrics(pred)
    say(
        f"regress: T2L {pred.shape[0]} rows in {time.perf_counter() - t1:.0f} s: cosine {t2l['val_cosine']}, "
        f"STS-B Spearman {t2l['stsb_spearman']}"
    )
    result = {
        "variant": "regress",
        "kind": "regress",
        "config": {"shared": shared, "loss": args.regress_loss},
        "model": {"trainable_params": n_params, "vocab_size": tm.size},
        "train": tr,
        "eval": {"nelbo_bits": None},
        "l2t": None,
        "t2l": t2l,
    }
    return result, pred
