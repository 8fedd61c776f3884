"""The CUDA-graph switch (models/graphs.py) on CPU: the stateless block path it captures equals the stateful one,
and everything around it stays eager and exact where no graph can run. The graphs themselves are checked on a GPU
by bench/gpu_check_graphs.py (CI has no GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.models.graphs import BlockGraphs, GraphableHook, _Stack, enable_cuda_graphs
from rwkv_diffusion_rnn.models.rwkv7 import FLIP, run_blocks
from rwkv_diffusion_rnn.models.wkv7 import resolve_backend
from rwkv_diffusion_rnn.time_conditioning import SiteModulation
from tests.conftest import random_rwkv7


@pytest.mark.parametrize("bidirectional", [False, True])
def test_stateless_path_equals_the_stateful_one(bidirectional):
    """forward_embeds(need_state=False) (what a graph captures) gives the same hidden states and gradients as the
    path that builds the state: FiLM on every block, a right-padded row, causal or bidirectional."""
    seed = 11 + bidirectional
    torch.manual_seed(seed)
    L, C, V, B, T = 3, 64, 200, 3, 11
    model = random_rwkv7(L, C, vocab_size=V, seed=seed).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mod = 0.1 * torch.randn(B, 1, L, 2, C)
    g_out = torch.randn(B, T, C)
    results = []
    for need_state in (True, False):
        model.zero_grad(set_to_none=True)
        m = mod.clone().requires_grad_()
        h, state = model.forward_embeds(model.emb(ids), None, mask, pre_block=SiteModulation(m, "film", L),
                                        bidirectional=bidirectional, need_state=need_state)  # fmt: skip
        assert (state is None) == (not need_state)
        (h * g_out).sum().backward()
        results.append((h.detach(), m.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (h0, m0, g0), (h1, m1, g1) = results
    assert h0.abs().max() > 0.1
    torch.testing.assert_close(h1, h0, rtol=1e-6, atol=1e-6, msg=f"seed {seed}")
    torch.testing.assert_close(m1, m0, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")
    assert set(g0) == set(g1) and len(g0) > 20
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=f"seed {seed}: {n}")


@pytest.mark.parametrize("rev", [None, "flip"])
def test_captured_stack_rebuilds_the_hook_from_its_graph_parts(rev):
    """What a graph captures (the block stack, with the hook rebuilt from the tensors and spec of its graph_parts)
    gives the eager pass's hidden states: the graph code knows the hook only through that protocol."""
    torch.manual_seed(15)
    L, C, B, T = 2, 64, 2, 7
    model = random_rwkv7(L, C, vocab_size=50, seed=15).train()
    x, pad = torch.randn(B, T, C), torch.zeros(B, T, 1, dtype=torch.bool)
    pad[1, 5:] = True
    hook = SiteModulation(0.1 * torch.randn(B, 1, L, 2, C), "film", L)
    assert isinstance(hook, GraphableHook) and not isinstance(lambda i, x: x, GraphableHook)
    tensors, spec = hook.graph_parts()
    stack = _Stack(model, True, rev, (type(hook), spec, len(tensors)))
    backend = resolve_backend(model.wkv_backend, x.device)
    want = run_blocks(model.blocks, x, pad, FLIP if rev else None, hook, backend)
    torch.testing.assert_close(stack(x, pad, *(t.clone() for t in tensors)), want, rtol=0, atol=0)


def test_graphs_stay_off_where_they_cannot_run():
    """On CPU, in eval mode or without gradients the switched model runs eager (no capture, no replay), with the same
    logits; a copy of the model (EMA, deepcopy) starts without captured graphs."""
    torch.manual_seed(12)
    model = random_rwkv7(2, 64, vocab_size=100, seed=12).train()
    ids = torch.randint(0, 100, (2, 9))
    ref = model(ids)
    assert enable_cuda_graphs(model) == 1 and isinstance(model.graphs, BlockGraphs)
    torch.testing.assert_close(model(ids), ref)
    with torch.no_grad():
        model(ids)
    assert model.graphs.replays == 0 and not model.graphs.graphs
    model.graphs.replays = 5
    twin = copy.deepcopy(model)
    assert isinstance(twin.graphs, BlockGraphs) and twin.graphs.replays == 0 and twin.graphs is not model.graphs


def test_trainer_refuses_cuda_graphs_without_a_gpu(tmp_path):
    from rwkv_diffusion_rnn.improved_trainer import Trainer
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config
    from rwkv_diffusion_rnn.models.rwkv7 import random_rwkv7 as new_rwkv7
    from rwkv_diffusion_rnn.pretrained_rwkv import save_pth
    from tests.data_helpers import make_dataset
    from tests.train_helpers import make_cfg

    paths = make_dataset(tmp_path / "ds", n=16, seed=13)
    save_pth(new_rwkv7(RWKV7Config.for_shape(2, 64), seed=0).state_dict(), tmp_path / "bb.pth")
    cfg = make_cfg((tmp_path, paths), tmp_path / "run", training__cuda_graphs=True, training__device="cpu")
    with pytest.raises(DiffRwkvError, match="training.cuda_graphs needs one process on a CUDA device"):
        Trainer(cfg)
    for section, key, value in (("model", "lora_rank", 4), ("training", "activation_checkpointing", True)):
        bad = make_cfg((tmp_path, paths), tmp_path / "run", training__cuda_graphs=True, **{f"{section}__{key}": value})
        # LoRA adapters sit outside the blocks and would silently get no gradient from a graph of the blocks
        with pytest.raises(DiffRwkvError, match="training.cuda_graphs cannot be combined with model.lora_rank"):
            Trainer(bad)


def test_own_gradients_gives_block_parameters_zero_gradients_of_their_own():
    """Before a step of several micro-batches the trainer gives every trainable block parameter a gradient tensor,
    so autograd adds into it rather than adopting a graph's static buffer (pytorch/pytorch#181723)."""
    from rwkv_diffusion_rnn.models.graphs import own_gradients

    model = random_rwkv7(2, 64, vocab_size=100, seed=14)
    assert own_gradients(model) == 0  # graphs off: nothing to do
    enable_cuda_graphs(model)
    model.blocks[1].requires_grad_(False)
    n = own_gradients(model)
    trainable = [p for p in model.blocks.parameters() if p.requires_grad]
    assert n == len(trainable) > 0
    assert all(p.grad is not None and not p.grad.any() for p in trainable)
    assert all(p.grad is None for p in model.blocks[1].parameters())
    assert model.head.weight.grad is None and own_gradients(model) == 0  # outside the blocks; idempotent


def test_the_graph_key_sees_every_change_a_captured_graph_cannot_follow():
    """parameter_signature (part of a capture's key) stays the same through in-place updates and changes when a
    block tensor moves (p.data = ...), changes dtype, is replaced by another Parameter, or flips requires_grad; it
    lists the same tensors as ``blocks.parameters()``."""
    from rwkv_diffusion_rnn.models.graphs import parameter_signature

    model = random_rwkv7(2, 64, vocab_size=100, seed=15)
    blocks = model.blocks
    sig = parameter_signature(blocks)
    assert sorted(sig, key=lambda s: s[0]) == sorted(
        ((p.data_ptr(), p.dtype, p.requires_grad) for p in blocks.parameters()), key=lambda s: s[0]
    )
    with torch.no_grad():
        blocks[0].att.key.weight.add_(1.0)  # an optimizer step, an EMA swap, a checkpoint load
    assert parameter_signature(blocks) == sig
    w = blocks[0].att.key.weight
    w.data = w.data.clone()
    moved = parameter_signature(blocks)
    assert moved != sig
    w.data = w.data.bfloat16()
    assert parameter_signature(blocks) not in (sig, moved)
    blocks[1].ffn.value.weight = torch.nn.Parameter(blocks[1].ffn.value.weight.detach().clone())
    replaced = parameter_signature(blocks)
    blocks[1].att.x_r.requires_grad_(False)
    assert parameter_signature(blocks) != replaced


def test_run_replays_the_last_graph_first_and_uses_it_only_if_the_checks_pass(monkeypatch):
    """run() replays the graph its input signature used last before it walks the blocks: kept where the parameters
    are where that graph read them, dropped (a new capture replayed instead) where one moved, dropped for eager where
    a block's module has a hook. A stand-in for torch's graph capture counts captures and replays."""
    from rwkv_diffusion_rnn.models.graphs import BlockGraphs

    captured, replays = [], []

    def capture(stack, sample, allow_unused_input):
        n = len(captured)
        captured.append(n)

        def graphed(*inputs):
            replays.append(n)
            return inputs[0] * (n + 2)

        return graphed

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    model = random_rwkv7(2, 64, vocab_size=100, seed=16).train()
    g = BlockGraphs()
    x = torch.ones(2, 3, 64, requires_grad=True)

    def step():
        out = g.run(model, x, None, None, None)
        if out is not None:
            out.sum().backward()  # clears the pending flag, as the training step's backward does
        return out

    assert torch.equal(step(), 2 * x) and (captured, replays) == ([0], [0])  # captured, replayed once
    assert torch.equal(step(), 2 * x) and (captured, replays) == ([0], [0, 0])  # replayed first, kept
    held = g.last[next(iter(g.last))][2]
    w = model.blocks[1].ffn.key.weight
    old_storage = w.data_ptr()
    assert any(t.data_ptr() == old_storage for t in held)  # the storage the graph reads is held
    w.data = w.data.clone()  # moved: graph 0 reads the old storage
    assert torch.equal(step(), 3 * x) and (captured, replays) == ([0, 1], [0, 0, 0, 1])  # 0 dropped, 1 used
    assert g.pending is False and len(g.graphs) == 2
    assert all(t.data_ptr() != old_storage for t in g.last[next(iter(g.last))][2])  # released at that forward
    handle = model.blocks[0].att.register_forward_pre_hook(lambda *a: None)
    assert step() is None and (captured, replays) == ([0, 1], [0, 0, 0, 1, 1])  # replayed, dropped: eager
    assert g.pending is False
    assert step() is None and replays == [0, 0, 0, 1, 1]  # while the hook stays, no replay ahead of the checks
    handle.remove()
    assert torch.equal(step(), 3 * x) and (captured, replays) == ([0, 1], [0, 0, 0, 1, 1, 1])  # graph 1 again
    assert torch.equal(step(), 3 * x) and replays == [0, 0, 0, 1, 1, 1, 1]


def test_usable_refuses_what_no_graph_can_run(monkeypatch):
    from types import SimpleNamespace

    from rwkv_diffusion_rnn.models.graphs import BlockGraphs

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    model = random_rwkv7(2, 64, vocab_size=100, seed=16).train()
    g, x = BlockGraphs(), SimpleNamespace(is_cuda=True)  # usable() reads only x.is_cuda
    assert g.usable(model, x, None)
    assert not g.usable(model, SimpleNamespace(is_cuda=False), None)
    assert not g.usable(model, x, lambda i, h: h)  # a hook that offers no graph parts
    with torch.no_grad():
        assert not g.usable(model, x, None)
    assert not g.usable(model.eval(), x, None)
