"""Baseline (a) of the captions harness, ``ar`` — latent -> text: an autoregressive decoder, the same
:class:`~rwkv_diffusion_rnn.models.rwkv7.RWKV7` class and shape as the denoiser's backbone, trained with next-token
cross-entropy. The standardised latent is projected to ``P`` prefix embeddings (a learned linear map plus a learned
position embedding per slot) that stand before the text; position ``P - 1 + k`` predicts token ``k``. Rows are the
diffusion runs' rows (text cut to ``L - 1`` tokens, then end-of-text up to ``L``), every position in the loss, so its
validation NLL in bits per token counts exactly the tokens the diffusion NELBO counts (the NLL is exact; the NELBO
is an upper bound).

Decoding: greedy and beam search (no length normalisation; a finished beam extends only with end-of-text at
log-probability 0). Each decoding step re-reads the whole row, right-padded to the full length so that every step
has one input shape (rows are <= 40 tokens: simple, correct on every WKV backend, no per-length kernel tuning).

It overfits within minutes (26 passes over the captions in 300 s on an H200): ``--ar-early-stop X`` validates it
every X budget units on captions 2-5 outside the clock and evaluates its best weights (:class:`EarlyStop`).
Evaluation: exact NLL in bits/token on the diffusion runs' rows and positions (and with another image's latent);
greedy and beam decoding from the caption-1 latents.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from captions_baselines import TrainData, autocast, train_baseline
from captions_common import EOT, Eval, RunError, budget_text, finite_or_none, say, texts, to_world
from torch import nn

from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config


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

    def _prefix(self, z: torch.Tensor) -> torch.Tensor:
        """The ``P`` prefix embeddings ``[B, P, C]`` of standardised latents ``z`` ``[B, D]``."""
        B, C = z.shape[0], self.prefix_pos.shape[1]
        return self.prefix_proj(z).view(B, self.prefix_len, C) + self.prefix_pos

    def _inputs(self, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        prefix = self._prefix(z)
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


@torch.no_grad()
def greedy_stateful(model: PrefixCaptioner, z: torch.Tensor, length: int, batch_size: int = 256) -> torch.Tensor:
    """Greedy decoding carried as RWKV state: the latent prefix is read once, then each step feeds only the token
    just chosen to the recurrent state (no re-reading of the prefix). The same choices as :func:`beam_search` with
    ``beams=1`` (banned ids never chosen; after end-of-text a row continues with end-of-text), every row decoding
    all ``length`` steps. Returns the ids ``[N, length]`` uncut (:func:`cut_at_eot` cuts them as beam_search does)."""
    model.eval()
    bb = model.backbone
    out = []
    for lo in range(0, z.shape[0], batch_size):
        prefix = model._prefix(z[lo : lo + batch_size])
        h, state = bb.forward_embeds(prefix)
        done = torch.zeros(prefix.shape[0], dtype=torch.bool, device=z.device)
        toks = []
        for k in range(length):
            logits = bb.head(bb.ln_out(h[:, -1]))
            if model.banned:
                logits[:, list(model.banned)] = float("-inf")
            tok = logits.argmax(-1).masked_fill(done, EOT)
            done |= tok == EOT
            toks.append(tok)
            if k + 1 < length:
                h, state = bb.forward_embeds(bb.emb(tok[:, None]).to(prefix.dtype), state)
        out.append(torch.stack(toks, 1))
    return torch.cat(out) if out else torch.zeros(0, length, dtype=torch.long, device=z.device)


def cut_at_eot(ids: torch.Tensor) -> list[list[int]]:
    """Rows of ``ids`` ``[N, L]`` as lists cut before the first end-of-text (as :func:`beam_search` returns them)."""
    return [r[: r.index(EOT)] if EOT in r else r for r in ids.tolist()]


# ----------------------------------------------------------------------------------------------------- training
def ar_loss(model: PrefixCaptioner, ids, text_len, z) -> torch.Tensor:
    logits = model(z, ids)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1))


@torch.no_grad()
def ar_nll_bits(model: PrefixCaptioner, rows: torch.Tensor, z: torch.Tensor, dtype: str, batch_size: int = 256) -> dict:
    """Validation NLL in bits per token over every position of the fixed-length rows (as the NELBO counts)."""
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, rows.shape[0], batch_size):
        ids, zb = rows[lo : lo + batch_size], z[lo : lo + batch_size]
        with autocast(rows.device, dtype):
            logits = model(zb, ids)
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="sum"))
        count += ids.numel()
    return {
        "val_nll_bits": total / max(count, 1) / math.log(2),
        "tokens": count,
        "uniform_bits": math.log2(model.vocab_size),
    }


# ----------------------------------------------------------------------------------------------- early stopping
class EarlyStop:
    """The AR baseline's early stopping (``--ar-early-stop X``): every X budget units (seconds, or timed steps with
    ``--budget-steps``) the validation NLL of captions 2-5 of the validation images, given their own latents, is
    measured OUTSIDE the budget clock (``clock.paused()``: neither the budget nor the lr schedule moves), and the
    weights of the best pass are kept; :meth:`finish` puts them back. Caption-1, the text every L2T decoder is scored
    against, takes no part in the choice. What a user does with a captioner that overfits: the fair baseline."""

    def __init__(self, model, val_ids: torch.Tensor, val_z: torch.Tensor, args) -> None:
        if val_ids.shape[0] == 0:
            raise RunError("--ar-early-stop: no validation rows beyond caption-1 to choose on (check --eval-limit)")
        self.model, self.ids, self.z, self.args = model, val_ids, val_z, args
        self.every, self.next_at = float(args.ar_early_stop), float(args.ar_early_stop)
        self.best, self.best_at, self.best_state, self.curve, self.last_step = math.inf, None, None, [], -1
        self.paused_s = 0.0

    def __call__(self, steps: int, clock, final: bool = False) -> None:
        if not clock.started or steps == self.last_step or (not final and clock.elapsed() < self.next_at):
            return
        self.last_step = steps
        while self.next_at <= clock.elapsed():
            self.next_at += self.every
        t, budget_t = time.perf_counter(), clock.elapsed()  # read before the pass: inside it the wall clock runs on
        with clock.paused():
            nll = ar_nll_bits(self.model, self.ids, self.z, self.args.dtype, self.args.eval_batch)["val_nll_bits"]
            finite = math.isfinite(nll)
            at = {"step": steps, "t": round(budget_t, 2), "val_nll_bits": round(nll, 5) if finite else None}
            self.curve.append(at)
            if finite and nll < self.best:
                self.best, self.best_at = nll, at
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.paused_s += time.perf_counter() - t
        self.model.train()

    def finish(self) -> dict:
        """Load the best weights (the last ones when no pass was finite); what was chosen, the validation curve, and
        the selection rows' NLL measured again after the restore (equal to the chosen pass's: the weights are back)."""
        restored = None
        if self.best_state is not None:
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    v.copy_(self.best_state[k])  # in place: CUDA graphs captured the parameters' addresses
            restored = ar_nll_bits(self.model, self.ids, self.z, self.args.dtype, self.args.eval_batch)["val_nll_bits"]
            say(
                f"ar: early stopping chose step {self.best_at['step']} (t={self.best_at['t']} of the budget; "
                f"validation NLL {self.best:.4f} bits/token on captions 2-5, {restored:.4f} after the restore) of "
                f"{len(self.curve)} passes, {self.paused_s:.1f} s outside the clock"
            )
        else:
            say(f"ar: early stopping: no finite validation NLL in {len(self.curve)} passes; the last weights are kept")
        return {
            "every": self.every,
            "rows": int(self.ids.shape[0]),
            "chosen": self.best_at,
            "restored_val_nll_bits": finite_or_none(restored) if restored is not None else None,
            "passes": len(self.curve),
            "paused_s": round(self.paused_s, 2),
            "curve": self.curve,
        }


# ------------------------------------------------------------------------------------------------------ the run
def run_ar(args, data: TrainData, ev: Eval, dev: torch.device, tok, shared: dict) -> tuple[dict, None]:
    """Train and evaluate the AR baseline (``shared``: the settings every run records). Returns (its JSON, None:
    it makes no T2L predictions)."""
    tm = data.token_map
    model = PrefixCaptioner(args.n_layer, args.n_embd, tm.size, prefix_len=args.ar_prefix, seed=args.seed).to(dev)
    model.banned = (tm.unk,)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"ar: {n_params:,} trainable parameters, compact vocabulary {tm.size}; training for {budget_text(args)}")
    n_val = data.val_rows.shape[0] if not args.eval_limit else min(data.val_rows.shape[0], 5 * ev.n_img)
    val_ids = torch.as_tensor(data.val_rows[:n_val], device=dev)
    val_z = torch.as_tensor(data.val_z[:n_val], device=dev)
    stopper = None
    if args.ar_early_stop > 0:  # captions 2-5 of the evaluated images: rows k x (all images) + i, k = 1..4
        n_all = data.val_rows.shape[0] // 5
        sel = torch.as_tensor([k * n_all + i for k in range(1, 5) for i in range(ev.n_img)], device=dev)
        rows, zs = torch.as_tensor(data.val_rows, device=dev), torch.as_tensor(data.val_z, device=dev)
        stopper = EarlyStop(model, rows[sel], zs[sel], args)
    tr = train_baseline(model, data, ar_loss, args, dev, "ar", hook=stopper)
    if stopper is not None:
        tr["early_stop"] = stopper.finish()
    t1 = time.perf_counter()
    nll = ar_nll_bits(model, val_ids, val_z, args.dtype, args.eval_batch)
    # the same rows, each with the NEXT row's latent (another image): what the latent is worth to the model
    wrong = ar_nll_bits(model, val_ids, val_z.roll(-1, 0), args.dtype, args.eval_batch)["val_nll_bits"]
    nll.update(val_nll_bits_other_latent=wrong, latent_info_bits=wrong - nll["val_nll_bits"])
    t_lik = time.perf_counter() - t1
    say(
        f"ar: val NLL {nll['val_nll_bits']:.4f} bits/token (uniform {nll['uniform_bits']:.2f}); with another "
        f"image's latent {wrong:.4f} [{t_lik:.0f} s]"
    )
    z = torch.as_tensor(data.standardise(ev.val_latents), device=dev)
    l2t, secs = {}, {}
    for name, k in (("greedy", 1), (f"beam{args.beams}", args.beams)):
        t1 = time.perf_counter()
        ids, logp = beam_search(model, z, args.length, beams=k, batch_size=args.eval_batch)
        secs[name] = round(time.perf_counter() - t1, 1)
        world = to_world(tm, ids)
        l2t[name] = {"world_ids": world, "texts": texts(tok, world), "mean_logprob": float(np.mean(logp))}
        say(
            f"ar: {name}: {len(ids)} rows in {secs[name]:.0f} s, mean sequence log-prob {np.mean(logp):.3f}"
            + (f"; [0] {l2t[name]['texts'][0]!r}" if l2t[name]["texts"] else "")
        )
    result = {
        "variant": "ar",
        "kind": "ar",
        "config": {"shared": shared, "prefix_len": args.ar_prefix},
        "model": {"trainable_params": n_params, "vocab_size": tm.size},
        "train": tr,
        "eval": {
            "likelihood": nll,
            "nelbo_bits": finite_or_none(nll["val_nll_bits"]),
            "latent_info_bits": finite_or_none(nll["latent_info_bits"]),
            "likelihood_s": round(t_lik, 1),
            "decode_s": secs,
        },
        "l2t": l2t,
        "t2l": None,
    }
    return result, None
