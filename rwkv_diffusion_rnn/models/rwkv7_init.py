"""The weights of a new RWKV-7 model, initialised the way BlinkDL's RWKV-7 trainer does.

Layer-dependent token-shift mixes and decay spectrum, zero output projections, tiny embeddings: training from
scratch is well-conditioned. :meth:`rwkv_diffusion_rnn.models.rwkv7.RWKV7.reset_parameters` calls
:func:`init_like_blinkdl`; a pretrained checkpoint replaces all of it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def init_like_blinkdl(model: nn.Module) -> None:
    """Initialise every parameter of ``model`` (an :class:`~rwkv_diffusion_rnn.models.rwkv7.RWKV7`) in place."""
    cfg = model.cfg
    C, N, L = cfg.n_embd, cfg.head_size, cfg.n_layer
    ddd = torch.arange(C, dtype=torch.float32) / C
    n = torch.arange(C, dtype=torch.float32)
    linear = n / max(C - 1, 1) - 0.5
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()
    model.emb.weight.uniform_(-1e-4, 1e-4)
    nn.init.orthogonal_(model.head.weight, gain=0.5 * math.sqrt(max(cfg.vocab_size / C, 1.0)))
    for lid, blk in enumerate(model.blocks):
        r01 = lid / max(L - 1, 1)
        r10 = 1.0 - lid / L
        for ln in (blk.ln1, blk.ln2) + ((blk.ln0,) if lid == 0 else ()):
            ln.reset_parameters()
        att = blk.att
        for name, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            getattr(att, name).copy_((1.0 - ddd ** (p * r10)).view(1, 1, C))
        decay = -6 + 6 * (n / max(C - 1, 1)) ** (1 + r01**0.3)
        att.w0.copy_((decay + 0.5 + zigzag * 2.5).view(1, 1, C))
        att.a0.copy_((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
        att.k_k.copy_((0.71 - linear * 0.1).view(1, 1, C))
        att.k_a.fill_(1.02)
        att.r_k.fill_(-0.04)
        lows = [("w1", "w2"), ("a1", "a2"), ("g1", "g2")] + ([("v1", "v2")] if lid > 0 else [])
        for first, second in lows:
            getattr(att, first).zero_()
            nn.init.orthogonal_(getattr(att, second), gain=0.1)
        if lid > 0:
            att.v0.copy_((0.73 - linear * 0.4).view(1, 1, C))
        s = 1 / math.sqrt(C)
        att.receptance.weight.uniform_(-0.5 * s, 0.5 * s)
        att.key.weight.uniform_(-0.05 * s, 0.05 * s)
        att.value.weight.uniform_(-0.5 * s, 0.5 * s)
        att.output.weight.zero_()
        att.ln_x.weight.fill_(((1 + lid) / L) ** 0.7)
        att.ln_x.bias.zero_()
        blk.ffn.x_k.copy_((1.0 - ddd ** (r10**4)).view(1, 1, C))
        blk.ffn.key.weight.uniform_(-0.5 * s, 0.5 * s)
        blk.ffn.value.weight.zero_()
    model.ln_out.reset_parameters()
