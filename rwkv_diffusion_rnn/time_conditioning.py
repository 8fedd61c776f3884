"""Conditioning the backbone on the two diffusion times (t_text, t_latent), each in [0, 1].

Both times are embedded with sinusoidal features (as in DDPM/DiT), concatenated, and mapped by an MLP to per-site
modulation of the residual stream. A "site" is the input of a block: site 0 is the input of block 0 (after
``ln0``), and with ``every_block`` there is one site per block.

* ``film``: ``x * (1 + scale) + shift`` (FiLM, Perez et al. 2018; the adaLN-Zero idea of DiT, Peebles & Xie 2023).
* ``add``: ``x + shift``.

The output layer is zero-initialised, so at step 0 the modulation is the identity and a pretrained backbone sees
exactly its pretrained inputs.

With ``latent_dim`` > 0 (``model.latent_film``) the (noisy, standardised) latent is a third input of the MLP, through
its own linear embedding: the modulation then carries the latent to every position of the sites (adaLN with a class
embedding, as DiT conditions on labels), where the latent prefix reaches later positions only through the
recurrent state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rwkv_diffusion_rnn.errors import DiffRwkvError

MODES = ("film", "add")


def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> torch.Tensor:
    """``[B]`` times in [0, 1] -> ``[B, dim]`` sin/cos features.

    ``t`` is multiplied by ``scale`` first: with t in [0, 1] and periods from 1 to ``max_period``, unscaled t would
    leave most features nearly constant (the DDPM convention embeds integer steps 0..1000).
    """
    if dim % 2:
        raise DiffRwkvError(f"time embedding size must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeConditioner(nn.Module):
    """(t_text [B], t_latent [B]) -> a function ``pre_block(i, x)`` that modulates block inputs ``x`` ``[B, T, C]``."""

    def __init__(self, n_embd: int, n_layer: int, mode: str = "film", every_block: bool = False,
                 embed_dim: int = 128, hidden: int | None = None, latent_dim: int = 0) -> None:  # fmt: skip
        super().__init__()
        if mode not in MODES:
            raise DiffRwkvError(f"model.time_conditioning must be one of {', '.join(MODES)}; got '{mode}'")
        self.mode, self.every_block, self.embed_dim, self.n_embd = mode, every_block, embed_dim, n_embd
        self.n_sites = n_layer if every_block else 1
        per_site = (2 if mode == "film" else 1) * n_embd
        hidden = hidden or n_embd
        self.latent_dim = latent_dim
        self.latent_in = nn.Linear(latent_dim, embed_dim) if latent_dim else None
        n_in = (3 if latent_dim else 2) * embed_dim
        self.mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, self.n_sites * per_site)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, t_text: torch.Tensor, t_latent: torch.Tensor, z: torch.Tensor | None = None):
        """Returns ``pre_block(i, x) -> x`` for :meth:`RWKV7.forward_embeds`.

        Times are ``[B]`` (one per row) or ``[B, S]`` (one per sequence position, as semi-autoregressive sampling
        uses: committed positions are clean, t = 0, while the active block is noisy). ``z`` ``[B, D]``: the latent,
        used only when built with ``latent_dim`` (ignored otherwise)."""
        return SiteModulation(self.modulation(t_text, t_latent, z), self.mode, self.n_sites)

    def modulation(self, t_text: torch.Tensor, t_latent: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor of :meth:`forward`'s :class:`SiteModulation`: ``[B, S or 1, sites, 1 or 2, C]``."""
        per_position = t_text.dim() == 2 or t_latent.dim() == 2
        if per_position:
            S = (t_text if t_text.dim() == 2 else t_latent).shape[1]
            t_text = t_text if t_text.dim() == 2 else t_text[:, None].expand(-1, S)
            t_latent = t_latent if t_latent.dim() == 2 else t_latent[:, None].expand(-1, S)
        shape = t_text.shape
        parts = [sinusoidal_embedding(t_text.reshape(-1), self.embed_dim),
                 sinusoidal_embedding(t_latent.reshape(-1), self.embed_dim)]  # fmt: skip
        if self.latent_in is not None:
            if z is None:
                raise DiffRwkvError("this time conditioner was built with latent_dim: pass the latent z")
            ez = self.latent_in(z.to(self.latent_in.weight.dtype))  # [B, E]
            parts.append((ez[:, None].expand(-1, shape[1], -1) if len(shape) == 2 else ez).reshape(-1, self.embed_dim))
        e = torch.cat([p.float() for p in parts], -1)
        mod = self.out(self.mlp(e.to(self.out.weight.dtype)))  # [B(*S), sites * per_site]
        mod = mod.view(*shape, self.n_sites, -1, self.n_embd)  # [B, (S,) sites, 1 or 2, C]
        return mod if per_position else mod.unsqueeze(1)  # broadcast over positions


class SiteModulation:
    """``pre_block(i, x) -> x``: the modulation of site ``i`` applied to block input ``x`` ``[B, T, C]``.

    A plain object holding its one tensor ``mod`` ``[B, S or 1, sites, 1 or 2, C]``, so that a CUDA graph of the blocks
    (models/graphs.py) can take ``mod`` as an input and rebuild the hook around its own copy: :meth:`graph_parts`
    and :meth:`from_graph_parts` are what the graph asks of a hook."""

    def __init__(self, mod: torch.Tensor, mode: str, n_sites: int) -> None:
        self.mod, self.mode, self.n_sites = mod, mode, n_sites

    def graph_parts(self) -> tuple[tuple[torch.Tensor], tuple[str, int]]:
        """The tensors a CUDA graph takes as inputs, and the rest of the hook (hashable)."""
        return (self.mod,), (self.mode, self.n_sites)

    @classmethod
    def from_graph_parts(cls, tensors: tuple[torch.Tensor, ...], spec: tuple[str, int]) -> SiteModulation:
        """The same hook around ``tensors`` (a graph's static copies of :meth:`graph_parts`'s)."""
        (mod,) = tensors
        return cls(mod, *spec)

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i >= self.n_sites:
            return x
        m = self.mod[:, :, i].to(x.dtype)  # [B, S or 1, 1 or 2, C]
        if self.mode == "film":
            return x * (1 + m[:, :, 0]) + m[:, :, 1]
        return x + m[:, :, 0]
