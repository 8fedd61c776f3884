"""Opt-in compilation of the RWKV-7 backbone, applied from outside the model like DDP or activation checkpointing:
every block through ``torch.compile`` (:func:`compile_blocks`, the fast training path) or only the blocks'
elementwise regions (:func:`compile_regions`), and the Inductor setting both need (:func:`inductor_guard`)."""

from __future__ import annotations

import os
from dataclasses import fields
from functools import cache

import torch
from torch import nn

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.models.rwkv7 import Block, ChannelMix, TimeMix
from rwkv_diffusion_rnn.models.rwkv7_regions import PLAIN, Regions


def inductor_guard() -> None:
    """Switch off Inductor's "mix-order reduction" (CUDA/Triton only) process-wide before anything here is compiled;
    the compiled blocks turn it back on for their own graphs (:func:`block_compile_options`), the only graphs a GPU
    has checked it on. The pass fuses the per-channel gradient sums of a backward with the row-wise work over the
    same rows. From torch 2.10 it once broke our blocks' backward (an H200, torch 2.11: "got [768] but expected shape
    compatible with [1, 1, 768]" for a ``[1, 1, C]`` mix vector, the shape of pytorch/pytorch#178080), and
    pytorch/pytorch#193061 reports silently wrong gradients from it in other graphs; on an H100 with torch 2.11
    (2026-12-07) every parameter's gradient of today's blocks matched eager (``bench/gpu_check_compiled.py``).
    ``DIFFRWKV_MIX_ORDER_REDUCTION=1`` leaves Inductor's setting alone everywhere (for measuring);
    ``DIFFRWKV_MIX_ORDER_REDUCTION=0`` keeps it off in the blocks too. A no-op where the option does not exist."""
    import torch._inductor.config as inductor_config

    if os.environ.get("DIFFRWKV_MIX_ORDER_REDUCTION") == "1":
        return
    if hasattr(inductor_config.triton, "mix_order_reduction"):
        inductor_config.triton.mix_order_reduction = False


def block_compile_options() -> dict:
    """Inductor options for the compiled blocks (``torch.compile(options=)``: patched for their graphs only, the
    backward's included). Each only where this torch has it; Triton kernels only (a CPU graph is unchanged).

    ``combo_kernels``: independent kernels of a graph run as one launch (horizontal fusion) - the casts of a block's
    weights, their gradients' casts back to fp32, the per-channel sums of the mix vectors' gradients, ~25 kernels of
    a few microseconds a block each way. On an H100 (2026-12-06) the 0.1B / 0.4B LM step went from 2,031 / 4,058 to
    1,344 / 2,651 launches and from 45.1 / 99.2 to 43.4 / 98.1 ms of kernels, the same first-step loss.

    ``triton.mix_order_reduction`` (unless ``DIFFRWKV_MIX_ORDER_REDUCTION=0``; see :func:`inductor_guard`): on an
    H100 (2026-12-07) the 0.1B / 0.4B LM step took 41.8 / 93.4 ms of kernels with it against 43.2 / 94.9 without,
    its gradients checked against eager (docs/RESULTS.md)."""
    import torch._inductor.config as inductor_config

    options = {}
    if hasattr(inductor_config, "combo_kernels"):
        options["combo_kernels"] = True
    if hasattr(inductor_config.triton, "mix_order_reduction") and os.environ.get("DIFFRWKV_MIX_ORDER_REDUCTION") != "0":
        options["triton.mix_order_reduction"] = True
    return options


@cache
def compiled_regions() -> Regions:
    """:class:`Regions` with every function through ``torch.compile`` (one compiled copy per process, shared by all
    blocks; ``fullgraph``: the regions are pure tensor code, so a graph break would be a bug, not a fallback)."""
    inductor_guard()
    return Regions(**{f.name: torch.compile(getattr(PLAIN, f.name), fullgraph=True) for f in fields(Regions)})


def compile_regions(model: nn.Module, enable: bool = True) -> int:
    """Run the elementwise regions of every RWKV-7 block inside ``model`` compiled (``enable``) or plain.

    Applied from outside the model code, like DDP or activation checkpointing; the matmuls, the WKV kernel (fla's
    Triton kernels are not traced) and everything around the blocks stay eager. Returns the number of modules
    switched. Numerics: the same operations, fused; fp32 results agree to rounding (the compiled kernels may
    reassociate a reduction)."""
    if enable:
        inductor_guard()  # also when the compiled regions were built earlier (cached) and the setting changed since
    regions = compiled_regions() if enable else PLAIN
    n = 0
    for module in model.modules():
        if isinstance(module, (TimeMix, ChannelMix)):
            module.regions = regions
            n += 1
    return n


def compile_blocks(model: nn.Module, memory_budget: float | None = None) -> int:
    """``torch.compile`` every RWKV-7 :class:`Block` inside ``model`` in place (the torchtitan recipe: one block at a
    time, so all blocks of one kind share one compiled graph). The WKV call is excluded from tracing
    (:func:`~rwkv_diffusion_rnn.models.wkv7.wkv7` is ``torch.compiler.disable``), so a block compiles into the part
    before it (ln1, token shift, projections, low-rank paths, kernel inputs) and the part after it (GroupNorm, bonus,
    gate, output projection, residual, ln2, FFN), each fused with its matmuls' prologues and epilogues; LoRA hooks
    are traced along. Wider than :func:`compile_regions` (use one or the other). Idempotent (a trainer may call it
    again after unfreezing). Returns the number of blocks.

    ``memory_budget`` in (0, 1]: the share of a compiled block's saved activations the partitioner may keep for the
    backward (``torch._functorch.config.activation_memory_budget``; it recomputes the cheapest rest in the backward).
    Process-wide and read when a graph is first compiled; compiled graphs do not key on it (every block shares one
    ``forward``), so a budget different from the one in force also drops dynamo's cached graphs, and the next call
    compiles under the new one. None leaves the setting as it is (1 is torch's default). On an H200 the 0.4B LM
    step's peak went 19.3 -> 13.6 GiB at 0.5 for 3 % of its speed (docs/RESULTS.md, 2026-11-27)."""
    if memory_budget is not None:
        if not 0 < memory_budget <= 1:
            raise DiffRwkvError(f"memory budget must be in (0, 1]; got {memory_budget}")
        import torch._functorch.config as functorch_config

        if functorch_config.activation_memory_budget != float(memory_budget):
            functorch_config.activation_memory_budget = float(memory_budget)
            torch._dynamo.reset()  # graphs partitioned under the old budget would be reused otherwise
    inductor_guard()
    # one graph per (first layer or not) x (grad or no grad) x (shape kind): well under 8, but a training run that
    # also evaluates at other lengths should not fall back to eager for good after the 8th variant
    if getattr(torch._dynamo.config, "recompile_limit", 64) < 64:
        torch._dynamo.config.recompile_limit = 64
    n = 0
    for module in model.modules():
        if isinstance(module, Block):
            if getattr(module, "_compiled_call_impl", None) is None:
                # static shapes: a new length or width compiles a graph of its own. Left to torch's automatic
                # dynamic shapes, the second training shape a block saw (a batch of another length, the next row of
                # a benchmark) recompiled it with symbolic sizes, that graph was looked up first from then on, and
                # its kernels ran the 0.4B step 12 % slower on an H100 (docs/RESULTS.md, 2026-12-06, "one process,
                # one shape"). The price: sampling in the same process compiles each new length it meets
                module.compile(dynamic=False, options=block_compile_options())
            n += 1
    return n
