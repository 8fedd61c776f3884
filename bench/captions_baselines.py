"""Issue #7: the obvious baselines the diffusion model must beat, at the same size and the same training budget.

(a) ``ar`` — latent -> text: an autoregressive decoder, the same :class:`~rwkv_diffusion_rnn.models.rwkv7.RWKV7`
    class and shape as the denoiser's backbone, trained with next-token cross-entropy. The standardised latent is
    projected to ``P`` prefix embeddings (a learned linear map plus a learned position embedding per slot) that
    stand before the text; position ``P - 1 + k`` predicts token ``k``. Rows are the diffusion runs' rows (text cut to
    ``L - 1`` tokens, then end-of-text up to ``L``), every position in the loss, so its validation NLL in bits per
    token counts exactly the tokens the diffusion NELBO counts (the NLL is exact; the NELBO is an upper bound).
    Decoding: greedy and beam search (no length normalisation; a finished beam extends only with end-of-text at
    log-probability 0). Each decoding step re-reads the whole row, right-padded to the full length so that every
    step has one input shape (rows are <= 40 tokens: simple, correct on every WKV backend, no per-length kernel
    tuning).
(b) ``regress`` — text -> latent: the same RWKV-7 shape as an encoder over the fixed-length row, its final hidden
    states mean-pooled over the text and its first end-of-text, and an MLP head (the denoiser's latent-head shape)
    predicting the standardised latent; loss MSE (default) or 1 - cosine in the raw latent space.

Both draw batches in the Trainer's order (an epoch is ``default_rng([seed, epoch]).permutation``, cut into full
batches) and train under the same budget rule and time-based schedule (:mod:`captions_common`).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config

EOT = 0


def _autocast(device: torch.device, dtype: str, cache: bool = True):
    """``cache=False`` for a step that replays CUDA graphs (autocast's weight-cast cache cannot be captured)."""
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    return torch.autocast(device.type, dtype=dt, cache_enabled=cache) if dt is not None else contextlib.nullcontext()


class PrefixCaptioner(nn.Module):
    """Latent-prefixed autoregressive RWKV-7 decoder (baseline a)."""

    def __init__(
        self,
        n_layer: int,
        n_embd: int,
        vocab_size: int,
        latent_dim: int = 32,
        prefix_len: int = 4,
        wkv_backend: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if prefix_len < 1:
            raise ValueError(f"prefix_len must be >= 1, got {prefix_len}")
        torch.manual_seed(seed)
        self.backbone = RWKV7(RWKV7Config.for_shape(n_layer, n_embd, vocab_size), wkv_backend=wkv_backend)
        self.prefix_len, self.vocab_size = prefix_len, vocab_size
        self.prefix_proj = nn.Linear(latent_dim, prefix_len * n_embd)
        self.prefix_pos = nn.Parameter(torch.randn(prefix_len, n_embd) * 0.02)
        self.banned: tuple[int, ...] = ()

    def _inputs(self, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        B, C = z.shape[0], self.prefix_pos.shape[1]
        prefix = self.prefix_proj(z).view(B, self.prefix_len, C) + self.prefix_pos
        return torch.cat([prefix, self.backbone.emb(ids).to(prefix.dtype)], 1)

    def _hidden(self, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.backbone.forward_embeds(self._inputs(z, ids), need_state=False)  # graph-eligible in training
        return self.backbone.ln_out(h)

    def forward(self, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[B, L, V]`` for every token of ``ids`` ``[B, L]`` given standardised ``z``."""
        h = self._hidden(z, ids[:, :-1])
        return self.backbone.head(h[:, self.prefix_len - 1 :])

    def next_logits(self, z: torch.Tensor, ids: torch.Tensor, pad_to: int | None = None) -> torch.Tensor:
        """Logits ``[B, V]`` of the token after ``ids`` ``[B, t]`` (t may be 0). ``pad_to``: right-pad the tokens
        with end-of-text to this many first, so every decoding step runs ONE input shape (no kernel re-tuning per
        length on the GPU); the model is causal, so positions after ``t`` do not change the logits read."""
        t = ids.shape[1]
        if pad_to is not None and pad_to > t:
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad_to - t), EOT)], 1)
        h = self._hidden(z, ids)
        return self.backbone.head(h[:, self.prefix_len - 1 + t])


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


# ----------------------------------------------------------------------------------------------------- decoding
@torch.no_grad()
def beam_search(
    model: PrefixCaptioner, z: torch.Tensor, length: int, beams: int = 4, batch_size: int = 256
) -> tuple[list[list[int]], np.ndarray]:
    """Decode up to ``length`` tokens per row of standardised latents ``z`` [N, D]. ``beams`` = 1 is greedy.
    Returns (ids cut at the first end-of-text, model ids; sequence log-probabilities [N])."""
    model.eval()
    K = int(beams)
    if K < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    out: list[list[int]] = []
    logps = np.zeros(z.shape[0])
    for lo in range(0, z.shape[0], batch_size):
        zb = z[lo : lo + batch_size]
        B = zb.shape[0]
        zk = zb.repeat_interleave(K, 0)
        seqs = torch.zeros(B * K, 0, dtype=torch.long, device=z.device)
        scores = torch.full((B, K), float("-inf"), device=z.device, dtype=torch.float64)
        scores[:, 0] = 0.0
        done = torch.zeros(B * K, dtype=torch.bool, device=z.device)
        for _ in range(length):
            logp = torch.log_softmax(model.next_logits(zk, seqs, length - 1).double(), -1)  # [B*K, V]
            if model.banned:
                logp[:, list(model.banned)] = float("-inf")
            V = logp.shape[1]
            if bool(done.any()):  # a finished beam extends only with end-of-text, at no cost
                logp[done] = float("-inf")
                logp[done, EOT] = 0.0
            cand = (scores.reshape(B * K, 1) + logp).reshape(B, K * V)
            top, idx = cand.topk(K, dim=1)
            src = (idx // V) + torch.arange(B, device=z.device)[:, None] * K  # [B, K] rows of the parent beams
            tok = (idx % V).reshape(-1)
            seqs = torch.cat([seqs[src.reshape(-1)], tok[:, None]], 1)
            done = done[src.reshape(-1)] | (tok == EOT)
            scores = top
            if bool(done.all()):
                break
        best = scores.argmax(1)
        rows = seqs.view(B, K, -1)[torch.arange(B, device=z.device), best].tolist()
        for r in rows:
            out.append(r[: r.index(EOT)] if EOT in r else r)
        logps[lo : lo + B] = scores.max(1).values.cpu().numpy()
    return out, logps


# ----------------------------------------------------------------------------------------------------- training
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
        from rwkv_diffusion_rnn.models.rwkv7 import compile_blocks

        compile_blocks(model, 1.0)  # torch's default budget, whatever a diffusion run before it set
        enable_cuda_graphs(model)

    def step() -> dict:
        model.train()
        ids, text_len, z = source.batch_at(state["step"])
        with _autocast(device, dtype, cache=not fast):
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


def ar_loss(model: PrefixCaptioner, ids, text_len, z) -> torch.Tensor:
    logits = model(z, ids)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1))


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
def ar_nll_bits(model: PrefixCaptioner, rows: torch.Tensor, z: torch.Tensor, dtype: str, batch_size: int = 256) -> dict:
    """Validation NLL in bits per token over every position of the fixed-length rows (as the NELBO counts)."""
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, rows.shape[0], batch_size):
        ids, zb = rows[lo : lo + batch_size], z[lo : lo + batch_size]
        with _autocast(rows.device, dtype):
            logits = model(zb, ids)
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="sum"))
        count += ids.numel()
    return {
        "val_nll_bits": total / max(count, 1) / math.log(2),
        "tokens": count,
        "uniform_bits": math.log2(model.vocab_size),
    }


@torch.no_grad()
def regress_predict(
    model: MeanPoolRegressor, rows: torch.Tensor, text_len: torch.Tensor, dtype: str, batch_size: int = 256
) -> torch.Tensor:
    """Standardised predictions [N, D] (float32)."""
    model.eval()
    out = []
    for lo in range(0, rows.shape[0], batch_size):
        with _autocast(rows.device, dtype):
            out.append(model(rows[lo : lo + batch_size], text_len[lo : lo + batch_size]).float())
    return torch.cat(out) if out else torch.zeros(0, model.head[-1].out_features, device=rows.device)
