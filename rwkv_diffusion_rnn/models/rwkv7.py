"""RWKV-7 ("Goose", x070) in PyTorch, with BlinkDL's parameter names.

A g1 ``.pth`` checkpoint loads into :class:`RWKV7` with ``load_state_dict`` and no renaming; the sizes (layers,
width, head size, FFN width and the four low-rank widths) are read from the checkpoint's shapes
(:meth:`RWKV7Config.from_state_dict`). The computation follows BlinkDL's ``RWKV_x070`` (``rwkv`` package), which the
tests use as the oracle.

Shapes: B batch, T time, C = n_embd, H heads, N = head size (64), L layers, V vocabulary.

The model takes and returns a recurrent :class:`RWKV7State`, so a sequence processed in pieces equals one pass.
Right-padded batches are handled through ``attention_mask`` (1 = token, 0 = padding at the end of a row): padding
leaves the state untouched, so the returned state is each row's state after its last real token.

Speed: on a GPU the blocks' elementwise work (token shift, six mixes, decay / key / value-residual
arithmetic, GroupNorm, bonus, gate, squared ReLU; ~200 kernels per layer and step in eager mode) moves more bytes
than the matmuls at the g1 sizes. ``compile_blocks`` (each block through ``torch.compile``, the WKV kernel
excluded) or the narrower ``compile_regions`` fuse it (both in models/rwkv7_compile.py); both are opt-in, applied
from outside the model, and tested against the eager code (tests/models/test_rwkv7_regions.py);
bench/throughput.py measures them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.models import ffn, wkv7_cuda
from rwkv_diffusion_rnn.models.rwkv7_init import init_like_blinkdl
from rwkv_diffusion_rnn.models.rwkv7_regions import PLAIN, matmul_dtype
from rwkv_diffusion_rnn.models.wkv7 import resolve_backend, wkv7


def default_lora_dims(n_embd: int) -> dict[str, int]:
    """Low-rank widths BlinkDL's trainer uses for a new model of width C (g1 0.1B: 64 / 64 / 32 / 128)."""
    root = n_embd**0.5

    def r32(x: float) -> int:
        return max(32, int(round(x / 32) * 32))

    return {"d_decay": r32(2.5 * root), "d_aaa": r32(2.5 * root), "d_mv": r32(1.7 * root), "d_gate": r32(5 * root)}


@dataclass
class RWKV7Config:
    """Sizes of an RWKV-7 model. ``from_state_dict`` reads them from a checkpoint; nothing is assumed."""

    vocab_size: int = 65536
    n_embd: int = 768
    n_layer: int = 12
    head_size: int = 64
    dim_ffn: int = 3072
    d_decay: int = 64  # w1/w2: low-rank width of the data-dependent decay
    d_aaa: int = 64  # a1/a2: in-context learning rate
    d_mv: int = 32  # v1/v2: value residual mix
    d_gate: int = 128  # g1/g2: output gate

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @classmethod
    def for_shape(cls, n_layer: int, n_embd: int, vocab_size: int = 65536, head_size: int = 64) -> RWKV7Config:
        """A new model's config with BlinkDL's defaults (FFN 4x, low-rank widths from :func:`default_lora_dims`)."""
        if n_embd % head_size:
            raise DiffRwkvError(f"n_embd {n_embd} must be a multiple of the head size {head_size}")
        return cls(vocab_size, n_embd, n_layer, head_size, 4 * n_embd, **default_lora_dims(n_embd))

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> RWKV7Config:
        def get(name: str) -> torch.Tensor:
            if name not in sd:
                raise DiffRwkvError(
                    f"{source}: missing tensor '{name}' (not an RWKV-7 checkpoint in BlinkDL's format?)"
                )
            return sd[name]

        vocab_size, n_embd = get("emb.weight").shape
        n_layer = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
        if n_layer == 0:
            raise DiffRwkvError(f"{source}: no 'blocks.N.*' tensors found")
        n_head, head_size = get("blocks.0.att.r_k").shape
        return cls(
            vocab_size=int(vocab_size),
            n_embd=int(n_embd),
            n_layer=n_layer,
            head_size=int(head_size),
            dim_ffn=int(get("blocks.0.ffn.key.weight").shape[0]),
            d_decay=int(get("blocks.0.att.w1").shape[1]),
            d_aaa=int(get("blocks.0.att.a1").shape[1]),
            d_mv=int(sd["blocks.1.att.v1"].shape[1]) if "blocks.1.att.v1" in sd else default_lora_dims(n_embd)["d_mv"],
            d_gate=int(get("blocks.0.att.g1").shape[1]),
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RWKV7State:
    """Recurrent state of every layer.

    att_x: ``[L, B, C]`` last input of each time-mix (token shift); ffn_x: ``[L, B, C]`` same for channel-mix;
    wkv: ``[L, B, H, N, N]`` fp32 WKV matrices in fla's ``S[k, v]`` layout.
    """

    att_x: torch.Tensor
    wkv: torch.Tensor
    ffn_x: torch.Tensor

    @classmethod
    def zeros(cls, cfg: RWKV7Config, batch: int, device=None, dtype=torch.float32) -> RWKV7State:
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        return cls(
            att_x=torch.zeros(L, batch, C, device=device, dtype=dtype),
            wkv=torch.zeros(L, batch, H, N, N, device=device, dtype=torch.float32),
            ffn_x=torch.zeros(L, batch, C, device=device, dtype=dtype),
        )

    def index_select(self, rows: torch.Tensor) -> RWKV7State:
        return RWKV7State(self.att_x[:, rows], self.wkv[:, rows], self.ffn_x[:, rows])

    def detach(self) -> RWKV7State:
        return RWKV7State(self.att_x.detach(), self.wkv.detach(), self.ffn_x.detach())

    @property
    def batch_size(self) -> int:
        return self.att_x.shape[1]


def _last_valid(x: torch.Tensor, prev: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Each row's input at its last real position (``prev`` for an empty row): the token-shift state to carry."""
    if lengths is None:
        return x[:, -1]
    idx = (lengths - 1).clamp(min=0)
    last = x[torch.arange(x.shape[0], device=x.device), idx]
    return torch.where((lengths > 0).unsqueeze(-1), last, prev)


@torch.compiler.disable
def _wkv7_channels(r, w, k, v, a, b, state, backend: str | None, n_head: int, keep_states: bool | None = None):
    """:func:`wkv7` on ``[B, T, C]`` operands (split into heads here), returning ``o`` ``[B, T, C]`` and the state.

    The split happens outside any compiled graph on purpose: with :func:`compile_blocks` the WKV call is a graph
    break, and handing views across a break makes AOTAutograd regenerate them, which torch 2.13 got wrong
    (garbage shapes at random)."""
    B, T, C = r.shape
    o, state = wkv7(*(x.view(B, T, n_head, C // n_head) for x in (r, w, k, v, a, b)), state, backend, keep_states)
    return o.reshape(B, T, C), state


class TimeMix(nn.Module):
    """RWKV-7 time mixing (attention replacement) of one layer."""

    def __init__(self, cfg: RWKV7Config, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        # the one place a layer's code differs: a bool, so torch.compile specialises 2 graphs, not one per layer (an
        # int guard on layer_id recompiled every block and, past Dynamo's recompile limit of 8, left the rest eager)
        self.first = layer_id == 0
        self.regions = PLAIN
        # whether the WKV kernel keeps its states for the backward (memory) or rebuilds them (time); None: the
        # backend's default. Set for a model's layers with set_wkv_keep_states.
        self.keep_wkv_states: bool | None = None
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.n_head, self.head_size = H, N
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        self.w1, self.w2 = nn.Parameter(torch.empty(C, cfg.d_decay)), nn.Parameter(torch.empty(cfg.d_decay, C))
        self.a1, self.a2 = nn.Parameter(torch.empty(C, cfg.d_aaa)), nn.Parameter(torch.empty(cfg.d_aaa, C))
        if layer_id > 0:  # layer 0 defines v_first; BlinkDL's files may still carry unused blocks.0.att.v0/v1/v2
            self.v0 = nn.Parameter(torch.empty(1, 1, C))
            self.v1, self.v2 = nn.Parameter(torch.empty(C, cfg.d_mv)), nn.Parameter(torch.empty(cfg.d_mv, C))
        self.g1, self.g2 = nn.Parameter(torch.empty(C, cfg.d_gate)), nn.Parameter(torch.empty(cfg.d_gate, C))
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=N * 1e-5)

    def forward(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        wkv_state: torch.Tensor | None,
        v_first: torch.Tensor | None,
        pad: torch.Tensor | None,
        backend: str | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[B, T, C]`` (after ln1), shift ``[B, C]``, wkv_state ``[B, H, N, N]`` (None: zeros), pad ``[B, T, 1]``
        bool or None.

        Returns the output ``[B, T, C]``, the new WKV state and ``v_first`` (layer 0's values, mixed into later layers).
        """
        H = self.n_head
        ops, mm_dtype = self.regions, matmul_dtype(x)
        xr, xw, xk, xv, xa, xg = ops.tm_mix(
            x, shift, self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g, mm_dtype
        )

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        w, k, neg_kk, b = ops.tm_kernel_inputs(
            k, torch.tanh(xw @ self.w1) @ self.w2, (xa @ self.a1) @ self.a2, self.w0, self.a0, self.k_k, self.k_a, H
        )
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        if self.first:
            v_first = v
        else:
            v = ops.tm_value_mix(v, v_first, self.v0, (xv @ self.v1) @ self.v2)

        if pad is not None:
            # padding must not touch the state: decay 1 (log 0), no write (k = 0), no transition term (b = 0)
            w = w.masked_fill(pad, 0.0)
            k = k.masked_fill(pad, 0.0)
            b = b.masked_fill(pad, 0.0)

        kernel_in = (w, k, v, neg_kk, b)
        if backend == "fla" and r.dtype != torch.float32:
            # fla takes all six operands in r's dtype (it would cast the fp32 ones itself). Cast here, inside the
            # compiled block, so Inductor fuses the casts into the kernels that produce w/k/v/a/b (and the backward
            # casts into their consumers) instead of five copy kernels each way at the WKV graph break. The same
            # roundings as fla's own: the numbers do not change. k and v stay fp32 for the bonus term below.
            kernel_in = tuple(x.to(r.dtype) for x in kernel_in)
        elif backend == "cuda" and r.dtype == torch.bfloat16 and wkv_state is None and self.head_size == 64:
            # the same for our CUDA kernel, which rounds k, v, a, b to bf16 and keeps w in fp32
            # (wkv7_cuda.kernel_dtypes): the casts fused here instead of four copy kernels each way per layer, and
            # the two gradients of k and of v summed inside the compiled backward. Calls the kernel does not take
            # (a state, another head size) keep their fp32 operands for the fallback backend.
            kernel_in = (w, *(x.to(r.dtype) for x in kernel_in[1:]))
        if backend == "cuda" and wkv_state is None and self.head_size == 64 and r.shape[1] > 0 and wkv7_cuda.IN_GRAPH:
            # the kernel traced into the compiled block (no graph break), where the call is one it takes
            B, T, C = r.shape
            heads = (x.view(B, T, H, self.head_size) for x in (r, *kernel_in))
            o, wkv_state = wkv7_cuda.wkv7_cuda_in_graph(*heads, keep_states=self.keep_wkv_states)
            o = o.reshape(B, T, C)
        else:
            o, wkv_state = _wkv7_channels(r, *kernel_in, wkv_state, backend, H, self.keep_wkv_states)
        o = ops.tm_output(o, self.ln_x.weight, self.ln_x.bias, self.ln_x.eps, r, k, v, self.r_k, g, H, mm_dtype)
        return self.output(o), wkv_state, v_first


def set_wkv_keep_states(model: nn.Module, fraction: float | None) -> int:
    """Which RWKV-7 layers inside ``model`` keep their WKV states for the backward: the first ``round(fraction *
    L)`` of its ``L`` time-mix layers keep them, the rest rebuild them in the backward with a second forward (WKV
    backend ``cuda``; the others always keep what they need). Keeping costs memory (the state after every 16th step
    and one vector a step: ~150 MiB a layer at 0.4B, B16 T512) and saves one WKV forward a layer in the backward, so
    a fraction trades memory for time (0.4B on an H100: 17.5 GiB and 99.1 ms of kernels keeping them all, 15.7 and
    102.4 keeping half, 14.0 and 105.7 keeping none; docs/RESULTS.md, 2026-12-06). None: every layer follows the
    backend's default (``DIFFRWKV_WKV_CUDA_RECOMPUTE``). Returns the number of layers set to keep them (0 for
    None)."""
    if fraction is not None and not 0 <= fraction <= 1:
        raise DiffRwkvError(f"wkv_keep_states must be in [0, 1]; got {fraction}")
    layers = [m for m in model.modules() if isinstance(m, TimeMix)]
    n = len(layers) if fraction is None else round(fraction * len(layers))
    for i, layer in enumerate(layers):
        layer.keep_wkv_states = None if fraction is None else i < n
    return 0 if fraction is None else n


def set_bf16_residual(model: nn.Module, on: bool) -> int:
    """Run the residual stream of every RWKV-7 block inside ``model`` in bf16 where bf16 autocast is on, as
    BlinkDL's trainer runs it (his module weights are bf16): each block's input, its LayerNorm outputs and the sums
    it adds to the stream are bf16, and so are their gradients. The weights, their gradients and the optimizer stay
    fp32, and so does every norm's and the decay's arithmetic inside its kernel; only what is written to memory
    between operations is rounded. Off (a new model's setting; the trainer turns it on with ``training.dtype=bf16``
    unless ``training.bf16_residual=false``), the stream keeps the weights' dtype (fp32) and autocast rounds only the
    matmuls' inputs. Without autocast, or under fp16 autocast, it changes nothing. Why: the blocks' elementwise
    work is memory-bound and most of its bytes are the stream's activations and their gradients (Inductor's count for
    a compiled 0.4B-width block, CPU: 13.5 % fewer bytes a token; on an H100 the 0.4B step 98.5 -> 95.1 ms of kernels;
    docs/RESULTS.md, 2026-12-06). Returns the number of blocks set."""
    n = 0
    for module in model.modules():
        if isinstance(module, Block):
            module.bf16_residual = bool(on)
            n += 1
    return n


class ChannelMix(nn.Module):
    """RWKV-7 channel mixing (squared-ReLU FFN with token shift)."""

    def __init__(self, cfg: RWKV7Config) -> None:
        super().__init__()
        self.regions = PLAIN
        self.x_k = nn.Parameter(torch.empty(1, 1, cfg.n_embd))
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        ops = self.regions
        mm_dtype = matmul_dtype(x)
        xk = ops.cm_mix(x, shift, self.x_k, mm_dtype)
        wk, wv = self.key.weight, self.value.weight
        if ffn.applies(xk, wk, wv, mm_dtype) and self._plain_linears():
            return ffn.ffn(xk, wk, wv)  # the activation inside the matmuls (models/ffn.py)
        return self.value(ops.sq_relu(self.key(xk)))

    def _plain_linears(self) -> bool:
        """key and value are bias-free ``nn.Linear`` s with no hook (a LoRA adapter hooks them) on this module."""
        k, v = self.key, self.value  # plain boolean tests (no generator): traced without a graph break
        return (
            type(k) is nn.Linear
            and type(v) is nn.Linear
            and k.bias is None
            and v.bias is None
            and not (k._forward_hooks or k._forward_pre_hooks or v._forward_hooks or v._forward_pre_hooks)
        )


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg)
        # the residual stream in bf16 under bf16 autocast (set_bf16_residual); off: it stays in the weights' dtype
        self.bf16_residual = False

    def forward(self, x, att_x, wkv, ffn_x, v_first, pad, lengths, backend, rev=None):
        """One layer. ``v_first`` is a (forward, reversed) pair; ``rev`` (optional) reverses each row's real tokens,
        either a ``[B, T]`` index (:func:`reverse_index`) or :data:`FLIP` (every row full: reverse the time axis):
        the time-mix then also runs over the reversed sequence with the same
        weights (from a zero state) and the two outputs are averaged.

        Returns ``x``, the layer's new (att_x, wkv, ffn_x) and the ``v_first`` pair.
        """
        if self.bf16_residual and matmul_dtype(x) == torch.bfloat16:
            x = x.to(torch.bfloat16)  # a no-op after the first block
        h = self.ln1(x).to(x.dtype)  # autocast computes the norms in fp32; the result joins the stream's dtype
        dx, new_wkv, v_fwd = self.att(h, att_x, wkv, v_first[0], pad, backend)
        v_bwd = None
        if rev is not None:
            h_rev = _reverse_time(h, rev)
            dx_rev, _, v_bwd = self.att(h_rev, torch.zeros_like(att_x), None, v_first[1], pad, backend)
            dx = 0.5 * (dx + _reverse_time(dx_rev, rev))
        new_att_x = _last_valid(h, att_x, lengths)
        x = x + dx  # the projections' outputs are in autocast's dtype: a bf16 stream stays bf16, an fp32 one promotes
        h = self.ln2(x).to(x.dtype)
        x = x + self.ffn(h, ffn_x)
        return x, (new_att_x, new_wkv, _last_valid(h, ffn_x, lengths)), (v_fwd, v_bwd)


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, t]]`` for ``x`` ``[B, T, C]`` and ``index`` ``[B, T]``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


#: ``Block.forward``'s ``rev`` when no row is padded: a plain flip of the time axis (its backward is a flip too,
#: where a gather's backward is a scatter-add)
FLIP = "flip"


def _reverse_time(x: torch.Tensor, rev: torch.Tensor | str) -> torch.Tensor:
    return x.flip(1) if isinstance(rev, str) else _gather_time(x, rev)


def reverse_index(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """``[B, total]`` index reversing the first ``lengths[b]`` positions of each row (the rest map to themselves)."""
    j = torch.arange(total, device=lengths.device).unsqueeze(0)
    n = lengths.unsqueeze(1)
    return torch.where(j < n, n - 1 - j, j)


#: ``pre_block(layer_id, x) -> x``: a hook the denoiser uses to condition every block (e.g. FiLM on time).
PreBlockHook = Callable[[int, torch.Tensor], torch.Tensor]


def run_blocks(blocks, x, pad, rev, pre_block: PreBlockHook | None, backend: str) -> torch.Tensor:
    """``ln0`` and every block from a fresh state; the hidden states only (no state is carried out). The eager
    training pass, and what a CUDA graph of the blocks captures (models/graphs.py)."""
    x = blocks[0].ln0(x)
    zeros = x.new_zeros(x.shape[0], x.shape[-1])
    v_first = (None, None)
    for i, block in enumerate(blocks):
        if pre_block is not None:
            x = pre_block(i, x)
        x, _, v_first = block(x, zeros, None, zeros, v_first, pad, None, backend, rev)
    return x


class RWKV7(nn.Module):
    """RWKV-7 language model: ``emb`` -> ``blocks`` -> ``ln_out`` -> ``head``.

    ``model(input_ids)`` returns logits ``[B, T, V]``; ``model(input_ids, state=s, return_state=True)`` returns
    ``(logits, new_state)``; :meth:`hidden_states` returns the final normalised hidden states ``[B, T, C]`` instead
    of logits; :meth:`forward_embeds` starts from input embeddings (used by the denoiser to add latent positions).
    """

    def __init__(self, cfg: RWKV7Config, wkv_backend: str | None = None, init: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.wkv_backend = wkv_backend
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.graphs = None  # models/graphs.py BlockGraphs when CUDA graphs are on (enable_cuda_graphs)
        if init:  # skipped when weights are about to be loaded (e.g. built on the meta device)
            self.reset_parameters()

    # ------------------------------------------------------------------ forward
    def forward_embeds(
        self,
        x: torch.Tensor,
        state: RWKV7State | None = None,
        attention_mask: torch.Tensor | None = None,
        pre_block: PreBlockHook | None = None,
        bidirectional: bool = False,
        need_state: bool = True,
        trusted_mask: bool = False,
    ) -> tuple[torch.Tensor, RWKV7State | None]:
        """Run the blocks on embeddings ``x`` ``[B, T, C]``; returns the hidden states BEFORE ``ln_out`` and the state.

        ``attention_mask`` ``[B, T]`` (1 = token, 0 = right padding). ``ln0`` is applied here, so ``x`` is the raw
        embedding (``emb(input_ids)``), exactly as in BlinkDL's model. ``pre_block(i, x)`` runs before block ``i``
        (after ``ln0`` for block 0). ``bidirectional``: every time-mix also reads each row's real tokens in reverse
        (see :meth:`Block.forward`); not pretrained semantics, and no state can be carried in or out.
        ``need_state=False`` (no ``state`` given): the state is not built and None is returned in its place; such a
        training pass runs through CUDA graphs when they are on (models/graphs.py). ``trusted_mask``: the caller
        built ``attention_mask`` right-padded itself (the denoiser's layout), so it is not checked (a check is a host
        sync); every other pass checks.
        """
        B, T, _ = x.shape
        carried = state is not None
        if carried and state.batch_size != B:
            raise DiffRwkvError(f"state has batch size {state.batch_size}, input has {B}")
        pad = lengths = None
        graphed = not need_state and not carried and self.graphs is not None and self.graphs.usable(self, x, pre_block)
        if attention_mask is not None:
            mask = attention_mask.bool()
            if mask.shape != (B, T):
                raise DiffRwkvError(f"attention_mask has shape {tuple(mask.shape)}, expected {(B, T)}")
            if trusted_mask:
                # the denoiser's own right-padded layout: no check, so no host sync (a CUDA graph or a training step
                # that never waits); padding stays a tensor even where no row is padded (all-False changes nothing)
                pad, lengths = ~mask.unsqueeze(-1), mask.sum(1)
            elif T > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
                raise DiffRwkvError("attention_mask must be right-padded (ones, then zeros) in every row")
            elif not bool(mask.all()):
                pad, lengths = ~mask.unsqueeze(-1), mask.sum(1)
        rev = None
        if bidirectional:
            if carried:
                raise DiffRwkvError("a bidirectional pass cannot continue from a recurrent state")
            rev = reverse_index(lengths, T) if lengths is not None else FLIP
        # resolved once here: the blocks see auto's choice, so a compiled block knows whether fla runs (TimeMix)
        backend = resolve_backend(self.wkv_backend, x.device)
        if not need_state and not carried:
            h = self.graphs.run(self, x, pad, rev, pre_block) if graphed else None
            if h is None:
                h = run_blocks(self.blocks, x, pad, rev, pre_block, backend)
            return h, None
        if carried:
            att_in, wkv_in, ffn_in = state.att_x, state.wkv, state.ffn_x
        else:  # a fresh sequence: zero token-shift inputs and no WKV state (the kernels' zero state, not read)
            zeros = x.new_zeros(len(self.blocks), B, x.shape[-1])
            att_in, wkv_in, ffn_in = zeros, [None] * len(self.blocks), zeros
        x = self.blocks[0].ln0(x)
        att_x, wkv, ffn_x = [], [], []
        v_first = (None, None)
        for i, block in enumerate(self.blocks):
            if pre_block is not None:
                x = pre_block(i, x)
            x, (ax, s, fx), v_first = block(x, att_in[i], wkv_in[i], ffn_in[i], v_first, pad, lengths, backend, rev)
            att_x.append(ax)
            wkv.append(s)
            ffn_x.append(fx)
        return x, RWKV7State(torch.stack(att_x), torch.stack(wkv), torch.stack(ffn_x))

    def hidden_states(self, input_ids, state=None, attention_mask=None, return_state: bool = False):
        """Final hidden states after ``ln_out``, ``[B, T, C]`` (and the new state if ``return_state``)."""
        h, new_state = self.forward_embeds(self.emb(input_ids), state, attention_mask, need_state=return_state)
        h = self.ln_out(h)
        return (h, new_state) if return_state else h

    def forward(self, input_ids, state=None, attention_mask=None, return_state: bool = False):
        """Logits ``[B, T, V]`` (and the new :class:`RWKV7State` if ``return_state``)."""
        h, new_state = self.forward_embeds(self.emb(input_ids), state, attention_mask, need_state=return_state)
        logits = self.head(self.ln_out(h))
        return (logits, new_state) if return_state else logits

    # ------------------------------------------------------------------ state dict compatibility
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # BlinkDL's files carry blocks.0.att.v0/v1/v2, which layer 0 never uses: drop them quietly.
        for name in ("v0", "v1", "v2"):
            state_dict.pop(f"{prefix}blocks.0.att.{name}", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ init for training from scratch
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise a new model the way BlinkDL's RWKV-7 trainer does (layer-dependent mixes and decay spectrum,
        zero output projections, tiny embeddings), so that training from scratch is well-conditioned."""
        init_like_blinkdl(self)


def random_rwkv7(cfg: RWKV7Config, seed: int = 0, wkv_backend: str | None = None) -> RWKV7:
    """A model with BlinkDL's init plus noise on every tensor, so no path is zero (a fresh init zeroes the output
    projections). For tests, smoke runs and benchmarks that need a checkpoint but have no pretrained weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the base init draws from the global RNG: make it part of the seed
        torch.manual_seed(seed)
        model = RWKV7(cfg, wkv_backend=wkv_backend)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "emb.weight":
                p.copy_(noise)
            elif p.ndim >= 2 and not name.endswith("r_k"):
                p.add_(noise * 0.5 / cfg.n_embd**0.5)
            else:
                p.add_(noise * 0.1)
    return model.eval()
