"""CUDA graphs of the RWKV-7 block stack for training steps, opt-in: ``training.cuda_graphs``.

Why: at the g1 sizes a training step launches ~3,000 small kernels (elementwise work, the low-rank matmuls, fla's
~40 Triton launches per layer); on an H200 the CPU spends ~2x the GPU's time issuing them (torch.profiler, denoiser
L12 D768 T512 B16: 58 ms of GPU work in a 126 ms step). A CUDA graph replays the whole forward, and the whole
backward, of the blocks as one launch each.

What is graphed: ``ln0`` and every block (time mix with the WKV kernel, channel mix, the per-block FiLM hook) from
a fresh state, through ``torch.cuda.make_graphed_callables``; the embedding, the heads, the loss and the optimizer
stay eager. One capture per input signature (shapes, dtypes, padding on/off, autocast, which parameters train), at
most :attr:`BlockGraphs.max_variants`; past that, eager. Graphs are used only where they are exact:

* a training forward with gradients on a CUDA device (evaluation and sampling run eager: they carry states);
* no recurrent state in or out (``forward_embeds(..., need_state=False)``);
* a ``pre_block`` hook that offers ``graph_parts()`` and ``from_graph_parts()`` (:class:`GraphableHook`: its
  tensors become graph inputs and the graph rebuilds the hook around its own copies; the denoiser's time modulation
  does) or none — this module knows nothing else about the hook;
* one process (DDP/FSDP hook into every parameter's gradient; not combined here);
* every trainable tensor the blocks use is a parameter of the blocks (LoRA adapters, held outside them and applied
  by hooks, would get no gradient: the trainer refuses ``model.lora_rank`` with graphs).

Rules the caller keeps (each checked, with a one-line error where it would otherwise give wrong numbers): every
graphed forward is followed by its backward before the next graphed forward (the graph's activations are static
buffers), and autocast runs with ``cache_enabled=False`` (the trainer does so when graphs are on).

Gradient accumulation: the graphed backward hands out the parameters' gradients as views of static buffers that the
next replay overwrites, and autograd adopts such a tensor as ``p.grad`` when ``p.grad`` is None — so a second
micro-batch would overwrite the first one's gradient and then add it to itself (pytorch/pytorch#181723). Before the
first backward of an optimizer step with several micro-batches, :func:`own_gradients` gives each block parameter a
zero gradient of its own, which autograd then adds into (the trainer does so).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Hashable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.models.rwkv7 import FLIP, RWKV7, run_blocks
from rwkv_diffusion_rnn.models.wkv7 import resolve_backend


@runtime_checkable
class GraphableHook(Protocol):
    """A ``pre_block`` hook a CUDA graph of the blocks can take.

    ``graph_parts()`` returns the hook's tensors (each becomes a graph input) and a hashable ``spec`` of everything
    else (part of the capture's key); ``type(hook).from_graph_parts(tensors, spec)`` builds an equal hook around
    other tensors (the graph's static copies).
    """

    def graph_parts(self) -> tuple[tuple[torch.Tensor, ...], Hashable]: ...

    @classmethod
    def from_graph_parts(cls, tensors: tuple[torch.Tensor, ...], spec: Hashable) -> GraphableHook: ...


class _Stack(nn.Module):
    """``ln0`` + the blocks of one :class:`~rwkv_diffusion_rnn.models.rwkv7.RWKV7` with a fixed argument layout."""

    def __init__(self, model: nn.Module, has_pad: bool, rev: str | None, hook: tuple | None) -> None:
        """``hook``: None, or ``(hook class, spec, number of tensors)`` of a :class:`GraphableHook`."""
        super().__init__()
        self.blocks = model.blocks  # the same modules (and parameters), registered here for make_graphed_callables
        self.backend = model.wkv_backend
        self.has_pad, self.rev, self.hook = has_pad, rev, hook

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        rest = list(rest)
        pad = rest.pop(0) if self.has_pad else None
        rev = FLIP if self.rev == "flip" else (rest.pop(0) if self.rev == "index" else None)
        pre_block = None
        if self.hook is not None:
            hook_cls, spec, n = self.hook
            pre_block = hook_cls.from_graph_parts(tuple(rest[:n]), spec)
        return run_blocks(self.blocks, x, pad, rev, pre_block, resolve_backend(self.backend, x.device))


class BlockGraphs:
    """The captured graphs of one model, by input signature. Not a module: it is no part of the model's state, and a
    copy of the model (EMA, deepcopy) starts without graphs."""

    max_variants = 4

    def __init__(self) -> None:
        self.graphs: dict[tuple, nn.Module] = {}
        self.pending = False  # a graphed forward whose backward has not run yet
        self.replays = 0
        self._warned = False
        # by input signature (the key without the parameters): (parameter signature, graph, the parameters' tensors
        # as captured) of the graph replayed last, replayed first next time (run())
        self.last: dict[tuple, tuple] = {}

    def __deepcopy__(self, memo) -> BlockGraphs:
        return BlockGraphs()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state) -> None:
        self.__init__()

    def usable(self, model: nn.Module, x: torch.Tensor, pre_block) -> bool:
        """Whether this forward may go through a graph, as far as can be told without walking the blocks (the
        hooks and the parameters are checked in :meth:`run`, while the GPU runs the graph)."""
        return (
            x.is_cuda
            and model.training
            and torch.is_grad_enabled()
            and (pre_block is None or isinstance(pre_block, GraphableHook))
            and not torch.cuda.is_current_stream_capturing()
        )

    def run(self, model: nn.Module, x: torch.Tensor, pad, rev, pre_block) -> torch.Tensor | None:
        """The blocks' output through a CUDA graph, or None where it must run eager (the caller does): a hook on a
        block's module, or more than :attr:`max_variants` signatures. The caller has checked :meth:`usable`.

        The graph this input signature used last is replayed before the blocks are walked and their parameters
        checked (~1 ms of host time at 0.4B that a step timed alone would otherwise leave the GPU idle for); its
        output is used only if the checks then pass. A replay reads the parameters' storage and writes only the
        graph's own buffers, so a stale one is dropped unseen; the storage it reads is held by :attr:`last`, never
        freed under it (a parameter replaced since then is released at that very forward)."""
        if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
            raise DiffRwkvError(
                "CUDA graphs need autocast without its weight cache: torch.autocast(..., cache_enabled=False)"
            )
        if self.pending:
            raise DiffRwkvError(
                "CUDA graphs: a second training forward before the backward of the first (the graph's activations "
                "are single buffers); run backward after each forward, or switch training.cuda_graphs off"
            )
        rev_kind = None if rev is None else ("flip" if isinstance(rev, str) else "index")
        inputs = [x] + ([pad] if pad is not None else []) + ([rev] if rev_kind == "index" else [])
        hook = None
        if pre_block is not None:
            tensors, spec = pre_block.graph_parts()
            hook = (type(pre_block), spec, len(tensors))
            inputs.extend(tensors)
        signature = (
            tuple((tuple(t.shape), t.stride(), t.dtype, t.requires_grad) for t in inputs),
            rev_kind,
            hook,
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
        )
        last = self.last.get(signature)
        out = last[1](*inputs) if last is not None else None  # the GPU starts; the host checks meanwhile
        modules = tuple(model.blocks.modules())
        # a hook on a block's module (e.g. a LoRA adapter) would run frozen inside the graph: eager instead
        if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
            self.last.pop(signature, None)  # no replay ahead of the checks while the hook stays
            return None
        # where each parameter lives, too: a graph reads the storage it was captured with (in-place updates, EMA
        # swaps and checkpoint loads keep it; module.to(), p.data = ... or load_state_dict(assign=True) do not)
        params = parameter_signature(model.blocks, modules)
        if last is None or last[0] != params:
            out = None  # a stale replay's output, never seen
            graphed = self.graphs.get((signature, params))
            if graphed is None:
                if len(self.graphs) >= self.max_variants:
                    if not self._warned:
                        warnings.warn(
                            f"CUDA graphs: more than {self.max_variants} input signatures; the rest run eager",
                            stacklevel=3,
                        )
                        self._warned = True
                    return None
                stack = _Stack(model, pad is not None, rev_kind, hook).train()
                sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
                graphed = torch.cuda.make_graphed_callables(stack, sample, allow_unused_input=True)
                self.graphs[(signature, params)] = graphed
            self.last[signature] = (params, graphed, tuple(p.detach() for p in model.blocks.parameters()))
            out = graphed(*inputs)
        if out.requires_grad:
            self.pending = True
            out.register_hook(self._clear_pending)
            # an output dropped without a backward (an exception between the two) frees the graph for the next step
            weakref.finalize(out, self._clear_pending)
        self.replays += 1
        return out

    def _clear_pending(self, *_) -> None:
        self.pending = False


def parameter_signature(module: nn.Module, modules: tuple[nn.Module, ...] | None = None) -> tuple:
    """(address, dtype, requires_grad) of every parameter of ``module``, module by module: what a captured graph
    depends on. Read from each submodule's ``_parameters`` (a replaced parameter shows, and a tensor shared by two
    modules counts twice) instead of ``module.parameters()``, whose traversal is most of the cost: this runs at the
    start of every graphed forward (0.71 -> ~0.35 ms of host time at 0.4B on a 2-core CPU).
    ``modules``: ``tuple(module.modules())`` where the caller has just walked them (one walk a step, not two)."""
    return tuple(
        (p.data_ptr(), p.dtype, p.requires_grad)
        for m in (module.modules() if modules is None else modules)
        for p in m._parameters.values()
        if p is not None
    )


def own_gradients(model: nn.Module) -> int:
    """Give every trainable parameter of the graphed block stacks inside ``model`` a zero gradient of its own where
    it has none, so that the next graphed backward adds into it instead of handing over a static buffer (see the
    module notes on gradient accumulation). Returns the number of gradients allocated."""
    n = 0
    for module in model.modules():
        if isinstance(module, RWKV7) and module.graphs is not None:
            for p in module.blocks.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
                    n += 1
    return n


def enable_cuda_graphs(model: nn.Module) -> int:
    """Graph the block stack of every :class:`~rwkv_diffusion_rnn.models.rwkv7.RWKV7` inside ``model`` (in place;
    captured at the first eligible forward). Returns the number of backbones switched."""
    n = 0
    for module in model.modules():
        if isinstance(module, RWKV7):
            if module.graphs is None:
                module.graphs = BlockGraphs()
            n += 1
    return n
