"""Bytes a token that the compiled RWKV-7 blocks' fused kernels move, by graph and by kernel, on the CPU (or a GPU).

The blocks' elementwise work is memory-bound on a GPU, so the bytes Inductor's kernels read and write are a proxy
for their time that can be had without a GPU. This script compiles a small model of the width asked for
(``compile_blocks``, bf16 autocast, the memory budget asked for), runs one training step at two sequence lengths,
and takes Inductor's own count (``GraphLowering.count_bytes``: reads + writes of every scheduler node) from each
compiled graph. The difference of the two lengths gives the bytes a token; what does not grow with the length
(weights' casts, per-channel gradients) is reported apart. Matmuls and the WKV operator are extern kernels and are
left out. The WKV kernel itself is a stub that writes zeros (the CPU cannot run it; Inductor sees only its
operands). CPU and GPU fuse differently, so the figures rank settings against each other; they do not predict a
GPU's milliseconds; ``--device cuda`` counts Triton's own fusion (with the real kernel) where a GPU is at hand.
The memory budget did not move the CPU count (0.5, 0.7 and 1.0 gave the same bytes, 2026-12-06),
though on a GPU it decides what the backward recomputes: what it costs is for a GPU to say.

    python bench/block_bytes.py                                  # 0.4B width (1024), the default settings
    python bench/block_bytes.py --no-bf16-residual --no-in-graph # an fp32 stream, the WKV operator behind a break
    python bench/block_bytes.py --width 768 --top 30             # 0.1B width; the 30 largest kernels
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_diffusion_rnn.models import wkv7 as wkv7_mod  # noqa: E402
from rwkv_diffusion_rnn.models import wkv7_cuda as wc  # noqa: E402
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7, set_bf16_residual  # noqa: E402
from rwkv_diffusion_rnn.models.rwkv7_compile import compile_blocks  # noqa: E402
from rwkv_diffusion_rnn.optimizer import build_optimizer  # noqa: E402


class _ZeroKernels:
    """Stands in for the CUDA extension: the operators' outputs, zero-filled."""

    @staticmethod
    def forward(r, w, k, v, a, b, o, sa, ckpt, save, split):
        o.zero_()
        ckpt.zero_()
        if save:
            sa.zero_()

    @staticmethod
    def backward(r, w, k, v, a, b, do, sa, ckpt, dht, dr, dw, dk, dv, da, db, split):
        for g in (dr, dw, dk, dv, da, db):
            g.zero_()


def _collect(records: list):
    """Wraps ``GraphLowering.count_bytes`` (Inductor calls it per graph when its metrics log is on) to keep, per
    scheduler node: name, extern or fused, bytes, and the aten operators it covers."""
    from torch._guards import CompileContext
    from torch._inductor.graph import GraphLowering

    original = GraphLowering.count_bytes

    def count_bytes(self):
        out = original(self)
        rows = []
        for node in self.scheduler.nodes:
            ops = set()
            for n in node.get_nodes():
                for o in getattr(n.node, "origins", ()) or ():
                    ops.add(str(o.target).replace("aten.", "").replace(".default", ""))
            extern = type(node).__name__ == "ExternKernelSchedulerNode"
            rows.append((node.get_name(), extern, node.get_read_write_buffers_sizes(), sorted(ops)))
        graph = f"{CompileContext.current_compile_id()}{' backward' if getattr(self, 'is_backward', False) else ''}"
        records.append((graph, rows))
        return out

    GraphLowering.count_bytes = count_bytes


def _step(length: int, a) -> None:
    torch._dynamo.reset()
    model = random_rwkv7(RWKV7Config.for_shape(a.layers, a.width, vocab_size=64), seed=0, wkv_backend="cuda")
    model = model.to(a.device).train()
    set_bf16_residual(model, a.bf16_residual)
    if a.master_weights:  # bf16 matmul weights in the model, as training.master_weights leaves them
        build_optimizer(model, 1e-3, master_weights=True)
    compile_blocks(model, memory_budget=a.memory_budget)
    ids = torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(0)).to(a.device)
    with torch.autocast(a.device, dtype=torch.bfloat16, cache_enabled=False):
        out = model(ids)
    out.float().logsumexp(-1).mean().backward()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=1024, help="model width (768: 0.1B, 1024: 0.4B); default 1024")
    p.add_argument("--layers", type=int, default=3, help="blocks (the first differs from the rest); default 3")
    p.add_argument("--memory-budget", type=float, default=0.5, help="compile_blocks' budget; default 0.5")
    p.add_argument("--bf16-residual", action=argparse.BooleanOptionalAction, default=True,
                   help="the residual stream in bf16 (training.bf16_residual; the default under bf16)")  # fmt: skip
    p.add_argument("--in-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="the WKV operator traced into the block (IN_GRAPH; the default)")  # fmt: skip
    p.add_argument("--master-weights", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 matmul weights in the model (training.master_weights, on by default on CUDA): no weight "
                   "casts in the blocks ('fixed MB')")  # fmt: skip
    p.add_argument("--top", type=int, default=0, help="also list the N fused kernels moving the most a token")
    p.add_argument("--out", help="write every kernel's row as JSON here")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cpu (WKV kernel stubbed) or cuda (Triton's fusion)"
    )
    a = p.parse_args(argv)
    if a.width % 64 or a.width <= 0:
        print(f"--width {a.width}: expected a positive multiple of the head size 64")
        return 2
    if a.layers < 2:
        print(f"--layers {a.layers}: expected at least 2 (the first block compiles a graph of its own)")
        return 2
    if not 0 < a.memory_budget <= 1:
        print(f"--memory-budget {a.memory_budget}: expected a share in (0, 1]")
        return 2

    import logging

    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.graph import GraphLowering

    # everything patched here is put back afterwards (a test imports this in a process that compiles more)
    saved = (inductor_config.fx_graph_cache, functorch_config.enable_autograd_cache, wc.extension, wc.IN_GRAPH,
             wkv7_mod.BACKENDS["cuda"], GraphLowering.count_bytes)  # fmt: skip
    handlers = [(h, h.level) for h in logging.getLogger("torch").handlers]
    try:
        inductor_config.fx_graph_cache = False  # a cached graph is not lowered again, so it would not be counted
        functorch_config.enable_autograd_cache = False
        torch._logging.set_logs(inductor_metrics=True)  # what makes Inductor count
        for handler, _ in handlers:  # counted, not printed
            handler.setLevel(logging.WARNING)
        wc.IN_GRAPH = a.in_graph
        if a.device == "cpu":
            wc.extension = lambda: _ZeroKernels
            # behind the graph break the same operator, without the wrapper's CUDA-only checks
            wkv7_mod.BACKENDS["cuda"] = lambda r, w, k, v, a_, b, state=None, keep_states=None: wc.wkv7_cuda_in_graph(
                r, w, k, v, a_, b, keep_states
            )
        records: list = []
        _collect(records)
        runs = []
        for length in (32, 64):
            records.clear()
            _step(length, a)
            runs.append(dict(records))
    finally:
        (inductor_config.fx_graph_cache, functorch_config.enable_autograd_cache, wc.extension, wc.IN_GRAPH,
         wkv7_mod.BACKENDS["cuda"], GraphLowering.count_bytes) = saved  # fmt: skip
        torch._logging.set_logs()
        for handler, level in handlers:
            handler.setLevel(level)
        torch._dynamo.reset()
    short, long_ = runs
    if short.keys() != long_.keys():
        print("the two lengths compiled different graphs; nothing to compare")
        return 1
    rows = []
    for graph, nodes in short.items():
        other = {n[0]: n for n in long_[graph]}
        for name, extern, b32, ops in nodes:
            b64 = other[name][2] if name in other else b32
            per_token = (b64 - b32) / 32
            rows.append({"graph": graph, "node": name, "extern": extern, "bytes_per_token": per_token,
                         "bytes_fixed": b32 - 32 * per_token, "ops": ops})  # fmt: skip
    fused = [r for r in rows if not r["extern"]]
    print(f"width {a.width}, budget {a.memory_budget}, bf16 residual {a.bf16_residual}, in graph {a.in_graph}, "
          f"master weights {a.master_weights}")  # fmt: skip
    print("| graph | fused kernels | KB a token | fixed MB |")
    print("|---|---:|---:|---:|")
    for graph in short:
        g = [r for r in fused if r["graph"] == graph]
        kb, mb = sum(r["bytes_per_token"] for r in g) / 1e3, sum(r["bytes_fixed"] for r in g) / 1e6
        print(f"| {graph} | {len(g)} | {kb:.1f} | {mb:.1f} |")
    # a block after the first runs, of each frame (forward and backward), its newest compilation: frames the first
    # block compiles differently (layer_id 0) were compiled again for it, the others are shared
    later: dict[tuple[str, bool], tuple[int, str]] = {}  # (frame, backward) -> (compilation, graph)
    for graph in short:
        cid, _, kind = graph.partition(" ")
        frame, _, n = cid.partition("/")
        key, entry = (frame, bool(kind)), (int(n.split("_")[0]), graph)
        later[key] = max(later.get(key, entry), entry)
    chosen = {graph for _, graph in later.values()}
    per_block = sum(r["bytes_per_token"] for r in fused if r["graph"] in chosen)
    print(f"a block after the first: {per_block / 1e3:.1f} KB a token ({', '.join(sorted(chosen))})")
    if a.top:
        for r in sorted(fused, key=lambda r: -r["bytes_per_token"])[: a.top]:
            print(f"{r['graph']:>14} {r['bytes_per_token'] / 1e3:7.2f} KB  {','.join(r['ops'])[:140]}")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
