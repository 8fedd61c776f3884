"""The denoiser: an RWKV-7 backbone reading ``[latent prefix x P] [text x T] [latent readout x R]``.

* Prefix: the noisy latent ``z_t`` (standardised, ``[B, D]``) projected to P embeddings; every text position reads it.
* Text: token embeddings; ``<mask>`` (id = vocabulary size) is a new trainable row, trained even when the backbone
  is frozen.
* Readout: the same noisy latent projected to R embeddings placed right AFTER each row's real text, so that even a
  causal backbone has read the whole text before the latent head reads these positions. (Reading the latent off the
  prefix, as the upstream code did, makes text->latent independent of the text.)
* Rows are laid out without gaps: ``prefix, real text, readout`` then right padding, so a padded row computes
  exactly what it computes alone.

``context`` (docs/design.md, "The denoiser"): ``causal`` runs the sequence once; ``twice`` feeds each row's
sequence two times in one pass and reads every output from the second copy (every position has then seen
everything, with unchanged pretrained weights, at 2x cost); ``bidirectional`` makes each time-mix also read the
sequence in reverse (shared weights; needs training).

Heads: a fresh text head (``use_rwkv_lm_head=False``) reads text position i at sequence position i; BlinkDL's LM
head predicts the NEXT token, so with it position i is read one step earlier (the prefix supplies position -1). The
latent head is an MLP on the readout states; its output is the prediction in the latent diffusion's
parameterisation (eps, x0 or v).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.models.chunked_ce import linear_cross_entropy
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7State, _gather_time
from rwkv_diffusion_rnn.time_conditioning import SiteModulation, TimeConditioner

CONTEXTS = ("causal", "twice", "bidirectional")
#: training's masked-position head runs on a multiple of this many rows (see ``RWKVDenoiser._read``)
HEAD_ROWS = 512


@dataclass
class DenoiserConfig:
    """Denoiser options; the names match the ``model.*`` config keys."""

    latent_dim: int = 32  # D: size of the sentence latent
    latent_prefix_len: int = 1  # P: latent embeddings before the text
    latent_readout_len: int = 1  # R: latent embeddings after the text, read by the latent head
    context: str = "causal"  # causal | twice | bidirectional
    time_conditioning: str = "film"  # film | add
    film_every_block: bool = False  # modulate every block's input, not only block 0's
    latent_film: bool = False  # the noisy latent also feeds the FiLM MLP (each position sees it, not only the prefix)
    time_embed_dim: int = 128  # sinusoidal features per time
    use_rwkv_lm_head: bool = False  # reuse the backbone's (next-token) LM head instead of a fresh one
    latent_head_hidden: int = 0  # 0: the backbone width
    lora_rank: int = 0  # > 0: LoRA adapters on the backbone's linear layers matching lora_targets
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("blocks.*.att.receptance", "blocks.*.att.key", "blocks.*.att.value",
                                     "blocks.*.att.output", "blocks.*.ffn.key", "blocks.*.ffn.value")  # fmt: skip


@dataclass
class DenoiserOutput:
    text_hidden: torch.Tensor  # [B, T, C] after ln_out, aligned with the text positions (apply text_logits)
    latent: torch.Tensor  # [B, D] latent prediction (eps / x0 / v)
    text_logits: torch.Tensor | None = None  # [N, V] at the positions of ``text_select`` (when given)
    # with ``text_targets`` instead of logits (models/chunked_ce.py): per-position cross-entropy [N] and argmax [N]
    text_ce: torch.Tensor | None = None
    text_pred: torch.Tensor | None = None


@dataclass
class PrefixCache:
    """What :meth:`RWKVDenoiser.prefill` keeps: the recurrent state after the committed part and its last hidden
    output (``[B, 1, C]``, needed by the next-token LM head). Both None when there was nothing to read."""

    state: RWKV7State | None
    last_hidden: torch.Tensor | None


@dataclass
class Layout:
    """Where everything sits in the backbone's input sequence (built once per batch by :meth:`RWKVDenoiser.layout`).

    source: ``[B, S]`` index into ``cat(prefix, text, readout)`` (length P + T + R); mask: ``[B, S]``;
    text_pos: ``[B, T]`` sequence position whose output predicts text position i; readout_pos: ``[B, R]``.
    """

    source: torch.Tensor
    mask: torch.Tensor
    text_pos: torch.Tensor
    readout_pos: torch.Tensor


class LoRAAdapter(nn.Module):
    """Low-rank update ``scale * B(A(x))`` added to a frozen linear layer's output (Hu et al. 2021); B starts at 0."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype) * self.scale


class RWKVDenoiser(nn.Module):
    def __init__(self, backbone: RWKV7, cfg: DenoiserConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or DenoiserConfig()
        if cfg.context not in CONTEXTS:
            raise DiffRwkvError(f"model.context must be one of {', '.join(CONTEXTS)}; got '{cfg.context}'")
        if cfg.latent_prefix_len < 0 or cfg.latent_readout_len < 1:
            raise DiffRwkvError("model.latent_prefix_len must be >= 0 and model.latent_readout_len >= 1")
        if cfg.use_rwkv_lm_head and cfg.latent_prefix_len < 1:
            raise DiffRwkvError("model.use_rwkv_lm_head needs model.latent_prefix_len >= 1 (it reads one step early)")
        self.cfg = cfg
        self.backbone = backbone
        C, D = backbone.cfg.n_embd, cfg.latent_dim
        P, R = cfg.latent_prefix_len, cfg.latent_readout_len
        self.vocab_size = backbone.cfg.vocab_size
        self.mask_id = self.vocab_size
        emb_std = (
            float(backbone.emb.weight.detach().float().std()) if backbone.emb.weight.device.type != "meta" else 0.02
        )
        self.mask_emb = nn.Parameter(torch.randn(C) * emb_std)
        self.prefix_proj = nn.Linear(D, max(P, 1) * C)
        self.prefix_pos = nn.Parameter(torch.randn(max(P, 1), C) * 0.02)
        self.readout_proj = nn.Linear(D, R * C)
        self.readout_pos = nn.Parameter(torch.randn(R, C) * 0.02)
        self.time = TimeConditioner(
            C, backbone.cfg.n_layer, cfg.time_conditioning, cfg.film_every_block, cfg.time_embed_dim,
            latent_dim=D if cfg.latent_film else 0,
        )  # fmt: skip
        if not cfg.use_rwkv_lm_head:
            self.text_head = nn.Linear(C, self.vocab_size, bias=False)
            nn.init.normal_(self.text_head.weight, std=0.5 / math.sqrt(C))
        hidden = cfg.latent_head_hidden or C
        self.latent_head = nn.Sequential(nn.Linear(R * C, hidden), nn.SiLU(), nn.Linear(hidden, D))
        nn.init.zeros_(self.latent_head[2].weight)
        nn.init.zeros_(self.latent_head[2].bias)
        self.lora = nn.ModuleDict()
        if cfg.lora_rank > 0:
            self._add_lora(cfg)
        # the backbone's LM head takes no part with a fresh text head: keep it out of training (and of DDP)
        self.unused_backbone = () if cfg.use_rwkv_lm_head else ("head.weight",)
        for name in self.unused_backbone:
            self.backbone.get_parameter(name).requires_grad_(False)
        self.compiled_regions = False  # see compile_denoiser_regions

    # ------------------------------------------------------------------ parameters
    def _add_lora(self, cfg: DenoiserConfig) -> None:
        for name, module in self.backbone.named_modules():
            if isinstance(module, nn.Linear) and any(fnmatch.fnmatch(name, p) for p in cfg.lora_targets):
                adapter = LoRAAdapter(module.in_features, module.out_features, cfg.lora_rank, cfg.lora_alpha)
                self.lora[name.replace(".", "_")] = adapter
                module.register_forward_hook(lambda mod, args, out, a=adapter: out + a(args[0]))
        if not self.lora:
            raise DiffRwkvError(f"model.lora_targets {list(cfg.lora_targets)} match no linear layer of the backbone")

    def set_backbone_trainable(self, patterns: tuple[str, ...] | None = None, trainable: bool = True) -> list[str]:
        """Set ``requires_grad`` on backbone parameters matching ``patterns`` (fnmatch on BlinkDL names, e.g.
        ``blocks.1[01].*``; None = all). Returns the names changed."""
        changed = []
        for name, p in self.backbone.named_parameters():
            if name in self.unused_backbone:
                continue
            if patterns is None or any(fnmatch.fnmatch(name, pat) for pat in patterns):
                if p.requires_grad != trainable:
                    p.requires_grad_(trainable)
                    changed.append(f"backbone.{name}")
        return changed

    # ------------------------------------------------------------------ layout
    def layout(self, attention_mask: torch.Tensor) -> Layout:
        """Index tensors placing ``prefix, real text, readout`` contiguously per row (twice: two copies)."""
        P, R = self.cfg.latent_prefix_len, self.cfg.latent_readout_len
        B, T = attention_mask.shape
        dev = attention_mask.device
        lengths = attention_mask.long().sum(1)  # [B]
        n = P + lengths + R  # real length of one copy, [B]
        copies = 2 if self.cfg.context == "twice" else 1
        S = copies * (P + T + R)
        j = torch.arange(S, device=dev).unsqueeze(0)  # [1, S]
        jj = j % n.unsqueeze(1) if copies == 2 else j  # position within the copy
        in_text = jj < (P + lengths).unsqueeze(1)
        source = torch.where(in_text, jj, P + T + (jj - P - lengths.unsqueeze(1)))
        mask = j < copies * n.unsqueeze(1)
        source = torch.where(mask, source, torch.zeros_like(source)).clamp(max=P + T + R - 1)
        offset = (n if copies == 2 else torch.zeros_like(n)).unsqueeze(1)  # read from the last copy
        i = torch.arange(T, device=dev).unsqueeze(0)
        shift = 1 if self.cfg.use_rwkv_lm_head else 0
        text_pos = (offset + P + i - shift).clamp(max=S - 1)
        readout_pos = offset + (P + lengths).unsqueeze(1) + torch.arange(R, device=dev).unsqueeze(0)
        return Layout(source, mask.long(), text_pos, readout_pos)

    # ------------------------------------------------------------------ forward
    def embed_inputs(self, noisy_ids: torch.Tensor, attention_mask: torch.Tensor, z_t: torch.Tensor) -> tuple:
        """Backbone input embeddings ``[B, S, C]``, their mask and the :class:`Layout`."""
        if noisy_ids.shape != attention_mask.shape or z_t.shape != (noisy_ids.shape[0], self.cfg.latent_dim):
            raise DiffRwkvError(
                f"expected noisy_ids/attention_mask [B, T] and z_t [B, {self.cfg.latent_dim}]; got "
                f"{list(noisy_ids.shape)}, {list(attention_mask.shape)}, {list(z_t.shape)}"
            )
        B, C = noisy_ids.shape[0], self.backbone.cfg.n_embd
        P, R = self.cfg.latent_prefix_len, self.cfg.latent_readout_len
        dtype = self.backbone.emb.weight.dtype
        is_mask = noisy_ids == self.mask_id
        text = self.backbone.emb(noisy_ids.masked_fill(is_mask, 0))
        text = torch.where(is_mask.unsqueeze(-1), self.mask_emb.to(text.dtype), text)
        z = z_t.to(self.readout_proj.weight.dtype)
        readout = (self.readout_proj(z).view(B, R, C) + self.readout_pos).to(dtype)
        parts = [text, readout]
        if P:
            parts.insert(0, (self.prefix_proj(z).view(B, P, C) + self.prefix_pos).to(dtype))
        lay = self.layout(attention_mask)
        x = _gather_time(torch.cat(parts, dim=1), lay.source)
        return x, lay

    def forward(
        self,
        noisy_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        z_t: torch.Tensor,
        t_text: torch.Tensor,
        t_latent: torch.Tensor,
        text_select: torch.Tensor | None = None,
        text_targets: torch.Tensor | None = None,
    ) -> DenoiserOutput:
        """noisy_ids ``[B, T]`` (``<mask>`` = vocab size), attention_mask ``[B, T]`` (right padding), z_t ``[B, D]``
        standardised noisy latent, t_latent ``[B]`` in [0, 1], t_text ``[B]`` or ``[B, T]``.

        A per-position ``t_text`` ``[B, T]`` is what semi-autoregressive sampling feeds (committed tokens at 0, the
        active block at its time); the latent prefix then gets t = 0 and the readout the row's largest t, so that
        everything before the active block is conditioned on fixed times and can be cached (:meth:`prefill`).

        ``text_select`` ``[B, T]`` bool, or the same positions as a flat index into ``B x T`` (row-major): also return
        logits at those positions only, in that order (training uses the masked ones: the head is most of the FLOPs
        at 65k classes; computing it inside ``forward`` keeps DDP's gradient hooks in charge of every parameter).
        ``text_targets`` ``[N]`` (with ``text_select``): return the cross-entropy against them and the argmax instead
        of the logits, computed in row chunks that never hold all ``[N, V]`` logits (models/chunked_ce.py)."""
        fast = self.compiled_regions and self.training and torch.is_grad_enabled()  # the training forward only
        x, lay = (_region("embed_inputs") if fast else RWKVDenoiser.embed_inputs)(self, noisy_ids, attention_mask, z_t)
        if t_text.dim() == 2:
            B, P, R = t_text.shape[0], self.cfg.latent_prefix_len, self.cfg.latent_readout_len
            t_pos = torch.cat([t_text.new_zeros(B, P), t_text, t_text.amax(1, keepdim=True).expand(B, R)], 1)
            t_text = t_pos.gather(1, lay.source)  # [B, S]: the time of every sequence position
        mod = (_region("modulation") if fast else TimeConditioner.modulation)(self.time, t_text, t_latent, z_t)
        h, _ = self.backbone.forward_embeds(
            x,
            None,
            lay.mask,
            pre_block=SiteModulation(mod, self.time.mode, self.time.n_sites),
            bidirectional=self.cfg.context == "bidirectional",
            need_state=False,
            trusted_mask=True,  # right-padded by construction (layout)
        )
        dense = (_region("read_dense") if fast else RWKVDenoiser.read_dense)(self, h, lay.text_pos, lay.readout_pos)
        return self._read(*dense, text_select, text_targets)

    def read_dense(self, h, text_pos, readout_pos) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm at the text positions ``[B, T, C]`` and the latent head's output ``[B, D]`` (its weights'
        dtype) from the backbone's hidden states ``h``."""
        ln_out = self.backbone.ln_out
        text_hidden = ln_out(_gather_time(h, text_pos))
        readout = ln_out(_gather_time(h, readout_pos))  # [B, R, C]
        return text_hidden, self.latent_head(readout.flatten(1).to(self.latent_head[0].weight.dtype))

    def _read(self, text_hidden, latent, text_select, text_targets=None) -> DenoiserOutput:
        """The output from :meth:`read_dense`'s ``(text_hidden, latent)``, with the selected positions' logits (or
        cross-entropy against ``text_targets``)."""
        logits = None
        if text_select is not None:
            if text_select.dtype == torch.bool:  # [B, T] mask, or a flat index into B x T (no second host sync)
                rows = text_hidden[text_select]  # [N, C], N = the number of selected positions: new every step
            else:
                rows = text_hidden.flatten(0, 1).index_select(0, text_select)
            n = rows.shape[0]
            if text_targets is not None:  # chunks of one shape; no [N, V] logits kept
                head = self.backbone.head if self.cfg.use_rwkv_lm_head else self.text_head
                ce, pred = linear_cross_entropy(rows, head.weight, text_targets)
                return DenoiserOutput(text_hidden, latent.float(), None, ce, pred)
            # the head's matmuls at N rounded up to a multiple of HEAD_ROWS: cuBLAS plans each new shape on the host
            # (~3-5 ms per matmul on an H200), and N is new every training step; the zero rows get no gradient
            pad = -n % HEAD_ROWS
            logits = self.text_logits(F.pad(rows, (0, 0, 0, pad)) if pad else rows)[:n]
        return DenoiserOutput(text_hidden, latent.float(), logits)

    # ------------------------------------------------------------------ cached (semi-autoregressive) decoding
    def prefill(
        self, z_t: torch.Tensor, committed_ids: torch.Tensor, t_latent: torch.Tensor, cache: PrefixCache | None = None
    ) -> PrefixCache:
        """Run ``[latent prefix][committed text]`` once (causal context only) with the committed part clean
        (t_text = 0) and return the recurrent state, so later blocks need not re-read it. With ``cache`` (what an
        earlier call returned for the same rows) only ``committed_ids`` is read, continuing from that state: the
        text committed since, so a left-to-right decoder reads each token once (the recurrence in pieces equals one
        pass).

        z_t ``[B, D]``, committed_ids ``[B, K]`` (K may be 0; no padding), t_latent ``[B]``."""
        if self.cfg.context != "causal":
            raise DiffRwkvError(f"prefix caching needs model.context=causal (got '{self.cfg.context}')")
        B, K = committed_ids.shape
        P, C = self.cfg.latent_prefix_len, self.backbone.cfg.n_embd
        parts = [self.backbone.emb(committed_ids)]
        if P and cache is None:
            z = z_t.to(self.prefix_proj.weight.dtype)
            parts.insert(0, (self.prefix_proj(z).view(B, P, C) + self.prefix_pos).to(parts[0].dtype))
        x = torch.cat(parts, 1)
        if x.shape[1] == 0:
            return cache if cache is not None else PrefixCache(None, None)
        times = x.new_zeros(B, x.shape[1], dtype=torch.float32)
        state = cache.state if cache is not None else None
        h, state = self.backbone.forward_embeds(x, state, None, pre_block=self.time(times, t_latent, z_t))
        return PrefixCache(state, h[:, -1:])

    def forward_cached(
        self,
        cache: PrefixCache,
        block_ids: torch.Tensor,
        z_t: torch.Tensor,
        t_block: torch.Tensor,
        t_latent: torch.Tensor,
    ) -> DenoiserOutput:
        """The active block ``[B, Kb]`` (and the readout) continued from :meth:`prefill`'s cache. Equals
        :meth:`forward` on ``committed + block`` with per-position times ``[0]*K + [t_block]*Kb``, at the block."""
        B, Kb = block_ids.shape
        R, C = self.cfg.latent_readout_len, self.backbone.cfg.n_embd
        is_mask = block_ids == self.mask_id
        text = self.backbone.emb(block_ids.masked_fill(is_mask, 0))
        text = torch.where(is_mask.unsqueeze(-1), self.mask_emb.to(text.dtype), text)
        z = z_t.to(self.readout_proj.weight.dtype)
        readout = (self.readout_proj(z).view(B, R, C) + self.readout_pos).to(text.dtype)
        x = torch.cat([text, readout], 1)
        times = t_block.float()[:, None].expand(B, x.shape[1])
        h, _ = self.backbone.forward_embeds(x, cache.state, None, pre_block=self.time(times, t_latent, z_t))
        dev = block_ids.device
        text_pos = torch.arange(Kb, device=dev).expand(B, Kb)
        if self.cfg.use_rwkv_lm_head:  # position i is read one step earlier: the cache's last output for i = 0
            if cache.last_hidden is None:
                raise DiffRwkvError("use_rwkv_lm_head needs at least one position before the block")
            h = torch.cat([cache.last_hidden, h], 1)
            readout_pos = (Kb + 1 + torch.arange(R, device=dev)).expand(B, R)
        else:
            readout_pos = (Kb + torch.arange(R, device=dev)).expand(B, R)
        return self._read(*self.read_dense(h, text_pos, readout_pos), None)

    def sampling_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`text_logits` with the ids in ``sample_banned_ids`` at -inf (e.g. a compact vocabulary's unknown id,
        which is a valid target for likelihoods but must never be generated)."""
        logits = self.text_logits(text_hidden)
        banned = getattr(self, "sample_banned_ids", ())
        if banned:
            logits = logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))
        return logits

    def text_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """``[..., C]`` -> ``[..., V]`` logits over the real vocabulary (the ``<mask>`` class is never predicted)."""
        head = self.backbone.head if self.cfg.use_rwkv_lm_head else self.text_head
        return head(text_hidden.to(head.weight.dtype))


# ------------------------------------------------------------------------------ compiled regions (training speed)
_REGIONS: dict[str, object] = {}


def _region(name: str):
    """The ``torch.compile``d form of one region function (compiled once per process, called with the module as its
    first argument, so a copy of the model runs its own weights through it)."""
    fn = _REGIONS.get(name)
    if fn is None:
        owner = TimeConditioner if name == "modulation" else RWKVDenoiser
        fn = _REGIONS[name] = torch.compile(getattr(owner, name))
    return fn


def compile_denoiser_regions(model: nn.Module) -> int:
    """Compile the denoiser's own work around the backbone's blocks in its training forward, for every
    :class:`RWKVDenoiser` in ``model``: the input embeddings and layout (:meth:`RWKVDenoiser.embed_inputs`), the
    time/latent modulation (:meth:`TimeConditioner.modulation`) and the final norm + latent head
    (:meth:`RWKVDenoiser.read_dense`). Returns how many denoisers were switched.

    Why: with compiled, CUDA-graphed blocks the 0.1B denoiser step is host-bound (43 ms of GPU kernels in a 56 ms
    step on an H200; docs/RESULTS.md, 2026-11-27, "after the fused head"): its forward runs ~140 eager ops outside
    the blocks (a tiny model on the CPU: 137 a step, the LM step's ~10), and their backward as many, each a launch
    from Python. Compiled, each region is a few fused kernels. Numerics: the same operations, fused
    (tests/models/test_rwkv_denoiser.py compares gradients with eager). Only the training forward (module in
    training mode, gradients on) runs them: evaluation and sampling, whose shapes vary, stay eager, so they do not
    use up dynamo's recompile limit. Idempotent; a copy of the model (deepcopy) keeps the switch."""
    from rwkv_diffusion_rnn.models.rwkv7_compile import inductor_guard

    inductor_guard()
    n = 0
    for module in model.modules():
        if isinstance(module, RWKVDenoiser):
            module.compiled_regions = True
            n += 1
    return n
