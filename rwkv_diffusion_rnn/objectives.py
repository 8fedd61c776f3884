"""The training objective: which modality is noised on each row, the corruption, and the normalised loss.

Modes (``training.loss_type``), chosen per row:

=============  ==========================  ==========================  ======================
mode           t_text                      t_latent                    losses
=============  ==========================  ==========================  ======================
l2t            sampled in (0, 1]           0 (clean condition)         text
t2l            0 (clean condition)         sampled in (0, 1]           latent
unconditional  sampled                     sampled                     text + latent
=============  ==========================  ==========================  ======================

With probability ``p_uncond`` an l2t / t2l row drops its condition: the condition is fed fully noised (t = 1; for
text every token is ``<mask>``), which is exactly what classifier-free guidance feeds at sampling time.

The masked text diffusion itself (which positions a time masks, the SUBS cross-entropy, the ELBO weight and the
loss's normaliser) is :class:`~rwkv_diffusion_rnn.diffusion_process.MaskedDiffusion`'s; this module draws the random
numbers, decides each row's mode and times, and sums the losses over the global batch.

Text -> latent times (``t2l_time_power`` p, ``diffusion.t2l_time_power``): a t2l row's latent time is drawn as
``t ** p``, so p < 1 trains more of them near t = 1 — the only time one-step text -> latent sampling (one DDIM step
from pure noise: the posterior mean, with the x0 target) asks about. On the CPU demo, p = 0.5 took the latent path
off the constant answer, where with uniform times it stayed for a seed-dependent number of steps (docs/RESULTS.md).
Validation (``Trainer.evaluate``) corrupts with the same distribution.

Clean prefix (``clean_prefix`` p, ``diffusion.clean_prefix``): a share p of the rows with a text loss picks a
boundary k uniformly among its real positions; positions before k are given clean at t = 0 and the rest is masked
at the row's t as usual, so ``t_text`` becomes per position ``[B, T]``. The loss is then the masked-diffusion ELBO
of the suffix given the prefix (normalised by the suffix's tokens), which is what semi-autoregressive decoding asks
of the model: committed text at t = 0, the active block at t (sampling.py, ``block_size``). With a one-token block
at t = 1 it is the next-token prediction of an autoregressive decoder. The idea is Block Diffusion's (Arriola et
al. 2025, clean earlier blocks, noisy current block) with one block boundary per row. Its draws come after all
others, so p = 0 leaves every other draw, and every earlier run, unchanged.

Exactness across processes: every random draw of a micro-step (modes, times, masking uniforms, Gaussian noise) is
made for the GLOBAL micro-batch from a CPU generator seeded by ``(seed, step, micro_step)``, and each rank takes its
rows (``rank::world``, the rows the batch sampler gave it). One process with a doubled batch therefore sees exactly
the corruption two processes see, and a resumed run sees exactly the corruption of the uninterrupted one. Loss
counts (tokens, rows) are summed over ranks and micro-steps before normalising, so the gradient is that of one big
batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rwkv_diffusion_rnn.continuous_diffusion import GaussianDiffusion, LatentNormalizer
from rwkv_diffusion_rnn.diffusion_process import MaskedDiffusion, sample_uniform_t, text_loss_count
from rwkv_diffusion_rnn.host_sync import HOST_MASK, host_side, to_device

UNCOND, L2T, T2L = 0, 1, 2
MODE_IDS = {"unconditional": UNCOND, "l2t": L2T, "t2l": T2L}


@dataclass
class Corrupted:
    """One micro-batch ready for the denoiser (local rows). Shapes: B rows, T tokens, D latent dims."""

    input_ids: torch.Tensor  # [B, T] clean targets
    attention_mask: torch.Tensor  # [B, T]
    noisy_ids: torch.Tensor  # [B, T]
    masked: torch.Tensor  # [B, T] bool: positions in the text loss
    z0: torch.Tensor  # [B, D] standardised clean latent
    eps: torch.Tensor  # [B, D]
    z_t: torch.Tensor  # [B, D]
    t_text: torch.Tensor  # [B], or [B, T] with clean prefixes (0 before each row's boundary)
    t_latent: torch.Tensor  # [B]
    text_rows: torch.Tensor  # [B] bool: rows with a text loss
    latent_rows: torch.Tensor  # [B] bool: rows with a latent loss
    modes: torch.Tensor  # [B] long
    text_positions: torch.Tensor | None = None  # [B, T] bool: the positions of the text ELBO (None: real tokens)
    picked: torch.Tensor | None = None  # [N] long: ``masked.flatten().nonzero()``, made on the host
    n_tokens: int | None = None  # real tokens of the micro-batch (a host count)

    def counts(self, weighting: str) -> torch.Tensor:
        """Local normalisers ``[text, latent]``: tokens under the text ELBO of text-loss rows (elbo; a clean prefix
        is not) or masked tokens (uniform); rows."""
        pos = self.attention_mask.bool() if self.text_positions is None else self.text_positions
        n_text = text_loss_count(weighting, pos & self.text_rows[:, None], self.masked)
        return torch.stack([n_text.float(), self.latent_rows.sum().float()])


class DiffusionObjective:
    """Corrupts micro-batches and computes the loss of the denoiser's output."""

    def __init__(
        self,
        text: MaskedDiffusion,
        latent: GaussianDiffusion,
        normalizer: LatentNormalizer,
        p_uncond: float = 0.1,
        latent_loss_weight: float = 1.0,
        max_length: int | None = None,
        seed: int = 0,
        chunked_ce: bool = False,
        clean_prefix: float = 0.0,
        t2l_time_power: float = 1.0,
    ) -> None:
        self.text, self.latent, self.normalizer = text, latent, normalizer
        self.p_uncond, self.latent_loss_weight = p_uncond, latent_loss_weight
        self.max_length, self.seed = max_length, seed
        self.chunked_ce, self.clean_prefix = chunked_ce, clean_prefix
        self.t2l_time_power = float(t2l_time_power)

    def generator(self, step: int, micro: int, salt: int = 0) -> torch.Generator:
        # distinct, reproducible streams per (step, micro-step); salt separates e.g. evaluation from training
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step * 1_009 + micro * 7 + salt) % 2**63)

    def corrupt(
        self,
        batch: dict[str, torch.Tensor],
        modes: str | dict[str, float],
        step: int,
        micro: int = 0,
        rank: int = 0,
        world: int = 1,
        salt: int = 0,
        clean_prefix: float | None = None,
    ) -> Corrupted:
        """Corrupt the local rows of a micro-batch. ``modes``: one mode name, or mixing weights per mode name.
        ``clean_prefix``: the share of text rows given a clean prefix (None: the objective's; evaluation passes 0)."""
        p_prefix = self.clean_prefix if clean_prefix is None else clean_prefix
        ids, attn, lat = batch["input_ids"], batch["attention_mask"], batch["latent"]
        dev = ids.device
        b, T = ids.shape
        host_attn = batch.get(HOST_MASK)
        if host_attn is None:
            host_attn = attn.cpu()  # on a GPU a wait: the trainer passes the mask's host copy (HOST_MASK)
        G = b * world  # global micro-batch rows
        L = max(self.max_length or T, T)
        # every draw and every mask is made on the host (no device wait; host_sync.py), then copied over at once
        with host_side():
            g = self.generator(step, micro, salt)
            if isinstance(modes, str):
                mode = torch.full((G,), MODE_IDS[modes], dtype=torch.long)
            else:
                names = list(modes)
                w = torch.tensor([float(modes[n]) for n in names])
                pick = torch.multinomial(w / w.sum(), G, replacement=True, generator=g)
                mode = torch.tensor([MODE_IDS[n] for n in names])[pick]
            t_text = sample_uniform_t(G, "cpu", g, t_min=self.text.schedule.t_min, antithetic=self.text.antithetic)
            t_lat = sample_uniform_t(G, "cpu", g, t_min=self.latent.schedule.t_min, antithetic=self.latent.antithetic)
            drop = torch.rand(G, generator=g) < self.p_uncond
            u = torch.rand(G, L, generator=g)
            eps = torch.randn(G, lat.shape[-1], generator=g)
            with_prefix, cut = torch.zeros(G, dtype=torch.bool), torch.zeros(G)
            if p_prefix > 0:  # drawn last: without clean prefixes every earlier draw is what it always was
                with_prefix, cut = torch.rand(G, generator=g) < p_prefix, torch.rand(G, generator=g)

            rows = slice(rank, G, world)
            mode, t_text, t_lat, drop, u, eps = (x[rows] for x in (mode, t_text, t_lat, drop, u, eps))
            with_prefix, cut = with_prefix[rows], cut[rows]
            # the clean condition is t = 0; a dropped condition is fully noised, t = 1
            t_text = torch.where(mode == T2L, torch.where(drop, 1.0, 0.0), t_text)
            if self.t2l_time_power != 1.0:  # a monotone map: the antithetic strata stay strata
                t_lat = torch.where(mode == T2L, t_lat.pow(self.t2l_time_power), t_lat)
            t_lat = torch.where(mode == L2T, torch.where(drop, 1.0, 0.0), t_lat)

            real = host_attn.bool()
            noised = self.text.mask(u[:, :T], t_text, real)
            noised = torch.where(((mode == T2L) & drop)[:, None], real, noised)  # dropped text: all <mask>
            text_rows = mode != T2L
            positions = None
            if p_prefix > 0:  # boundary k uniform over the row's real positions; before it: clean, t = 0
                k = (cut * real.sum(1)).floor().long()
                k = torch.where(with_prefix & text_rows, k, 0)
                positions = torch.arange(T)[None] >= k[:, None]  # [B, T]: under the ELBO
                noised = noised & positions
                t_text = torch.where(positions, t_text[:, None], 0.0)  # [B, T]
                positions = positions & real
            masked = noised & text_rows[:, None]  # a t2l row's masks are its (dropped) condition, not a target
            picked = masked.flatten().nonzero().squeeze(1)  # the head's rows, known here: no wait in the forward
            n_tokens = int(real.sum())
        host = [mode, t_text, t_lat, eps, noised, masked, text_rows, picked]
        if positions is not None:
            host.append(positions)
        moved = to_device(host, dev)
        mode, t_text, t_lat, eps, noised, masked, text_rows, picked = moved[:8]
        positions = moved[8] if positions is not None else None
        noisy = self.text.apply_mask(ids, noised)
        z0 = self.normalizer.normalize(lat.float())
        z_t = self.latent.q_sample(z0, t_lat, eps)
        return Corrupted(ids, attn, noisy, masked, z0, eps, z_t, t_text, t_lat, text_rows, mode != L2T, mode,
                         positions, picked, n_tokens)  # fmt: skip

    def loss(self, denoiser, c: Corrupted, norm: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch normalised by GLOBAL counts ``norm`` = ``[text, latent]`` (summed over ranks and
        micro-steps), times ``scale`` (the world size under DDP, which averages gradients over ranks)."""
        # the masked positions as one flat index, for the head's rows, the targets and the weights
        picked = c.masked.flatten().nonzero().squeeze(1) if c.picked is None else c.picked
        targets = c.input_ids.flatten()[picked]
        if self.chunked_ce:  # the head + cross-entropy in row chunks, no [N, V] logits kept (models/chunked_ce.py)
            out = denoiser(c.noisy_ids, c.attention_mask, c.z_t, c.t_text, c.t_latent, text_select=picked,
                           text_targets=targets)  # fmt: skip
            ce, pred = out.text_ce, out.text_pred
        else:
            out = denoiser(c.noisy_ids, c.attention_mask, c.z_t, c.t_text, c.t_latent, text_select=picked)
            ce, pred = self.text.masked_ce(out.text_logits, targets)  # [N] each, at the masked positions
        text_sum = self.text.loss_sum(ce, c.t_text, picked, c.masked.shape)
        latent_sum, _ = self.latent.loss(out.latent, c.z0, c.eps, c.t_latent, weight=c.latent_rows, reduction="sum",
                                         stats=False)  # fmt: skip
        text_loss = text_sum / norm[0].clamp_min(1.0)
        latent_loss = latent_sum / norm[1].clamp_min(1.0)
        loss = (text_loss + self.latent_loss_weight * latent_loss) * scale
        with torch.no_grad():
            acc = (pred == targets).float().sum() if len(targets) else torch.zeros((), device=ce.device)
            stats = torch.stack([text_sum.detach(), ce.detach().sum(), acc, latent_sum.detach()])
        return loss, {"sums": stats, "n_masked": c.masked.sum()}
