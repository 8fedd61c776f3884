"""The compiled elementwise regions of the RWKV-7 blocks (``compile_regions``) against the plain functions."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from rwkv_diffusion_rnn.models.rwkv7 import ChannelMix, TimeMix
from rwkv_diffusion_rnn.models.rwkv7_compile import compile_blocks, compile_regions, compiled_regions
from rwkv_diffusion_rnn.models.rwkv7_regions import PLAIN
from tests.conftest import random_rwkv7


def _loss_and_grads(model, ids, mask, targets, bf16=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        logits = model(ids, attention_mask=mask).float()
    loss = torch.nn.functional.cross_entropy(logits[mask.bool()], targets[mask.bool()])
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.slow  # two torch.compile graphs per region (forward, backward): ~30 s per case on 2 cores
@pytest.mark.parametrize("bf16,tol", [(False, 1e-5), (True, 2e-2)])  # bf16: the fused kernels round differently
def test_compiled_regions_match_plain_forward_and_backward(bf16, tol):
    seed = 107
    torch.manual_seed(seed)
    model = random_rwkv7(2, 128, vocab_size=300, seed=seed).train()
    B, T = 3, 19
    ids = torch.randint(0, 300, (B, T))
    targets = torch.randint(0, 300, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 11:] = 0  # a right-padded row: the padding path goes through the same regions
    ref_logits, ref_grads = _loss_and_grads(model, ids, mask, targets, bf16)

    assert compile_regions(model) == 4  # 2 layers x (time-mix, channel-mix)
    assert all(m.regions is compiled_regions() for m in model.modules() if isinstance(m, (TimeMix, ChannelMix)))
    logits, grads = _loss_and_grads(model, ids, mask, targets, bf16)
    compile_regions(model, enable=False)
    assert all(m.regions is PLAIN for m in model.modules() if isinstance(m, (TimeMix, ChannelMix)))

    assert ref_logits.abs().max() > 1.0  # not a comparison of near-zero tensors
    assert _rel(logits, ref_logits) < tol, f"seed {seed}"
    assert set(grads) == set(ref_grads) and len(grads) > 20
    worst = max(grads, key=lambda n: _rel(grads[n], ref_grads[n]))
    assert _rel(grads[worst], ref_grads[worst]) < 10 * tol, f"seed {seed}: {worst}"
    print(
        f"relative error: logits {_rel(logits, ref_logits):.2e}, worst gradient {worst} "
        f"{_rel(grads[worst], ref_grads[worst]):.2e}"
    )


@pytest.mark.slow  # torch.compile of a whole block (forward, backward): ~40 s per case on 2 cores
@pytest.mark.parametrize("bf16,tol", [(False, 1e-5), (True, 2e-2)])
def test_compiled_blocks_match_plain_forward_and_backward(bf16, tol):
    seed = 108
    torch.manual_seed(seed)
    model = random_rwkv7(2, 128, vocab_size=300, seed=seed).train()
    compiled = copy.deepcopy(model)
    B, T = 3, 19
    ids = torch.randint(0, 300, (B, T))
    targets = torch.randint(0, 300, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 11:] = 0
    ref_logits, ref_grads = _loss_and_grads(model, ids, mask, targets, bf16)
    assert compile_blocks(compiled) == 2
    for _ in range(2):  # the second call runs the cached graphs (where torch 2.13 once replayed views wrongly)
        logits, grads = _loss_and_grads(compiled, ids, mask, targets, bf16)
    assert ref_logits.abs().max() > 1.0
    assert _rel(logits, ref_logits) < tol, f"seed {seed}"
    assert set(grads) == set(ref_grads) and len(grads) > 20
    worst = max(grads, key=lambda n: _rel(grads[n], ref_grads[n]))
    assert _rel(grads[worst], ref_grads[worst]) < 10 * tol, f"seed {seed}: {worst}"
    # the recurrent state carried out of a compiled block is the plain one
    with torch.no_grad():
        _, s_ref = model(ids, attention_mask=mask, return_state=True)
        _, s_cmp = compiled(ids, attention_mask=mask, return_state=True)
    for x, y in zip((s_cmp.att_x, s_cmp.wkv, s_cmp.ffn_x), (s_ref.att_x, s_ref.wkv, s_ref.ffn_x), strict=True):
        assert _rel(x, y) < tol


@pytest.mark.slow  # ~30 s of torch.compile on 2 cores
def test_compiled_blocks_in_the_denoiser_with_lora_and_reverse_pass():
    """The denoiser's path through compiled blocks: bidirectional context (the reversed pass reuses the compiled
    block), LoRA forward hooks (traced into the graph), FiLM before every block, a right-padded row."""
    from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, RWKVDenoiser

    seed = 109

    def make() -> RWKVDenoiser:
        torch.manual_seed(seed)
        cfg = DenoiserConfig(context="bidirectional", lora_rank=4, film_every_block=True)
        den = RWKVDenoiser(random_rwkv7(2, 64, vocab_size=200, seed=seed), cfg)
        with torch.no_grad():  # every zero-initialised path (FiLM, LoRA B, latent head) non-zero
            for p in den.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return den.train()

    plain, compiled = make(), make()  # not deepcopy: the LoRA hooks close over their own adapters
    assert compile_blocks(compiled) == 2
    B, T = 3, 12
    ids = torch.randint(0, 200, (B, T))  # real tokens only: 200 is the <mask> id, not a target
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 7:] = 0
    z, t = torch.randn(B, 32), torch.rand(B)
    sel = (torch.rand(B, T) < 0.5) & mask.bool()
    sel[0, 0] = True
    results = []
    for den in (plain, compiled):
        out = den(ids, mask, z, t, t, text_select=sel)
        loss = torch.nn.functional.cross_entropy(out.text_logits, ids[sel]) + out.latent.pow(2).mean()
        loss.backward()
        results.append((out, {n: p.grad for n, p in den.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (got, grads) = results
    assert _rel(got.text_logits, ref.text_logits) < 1e-5 and _rel(got.latent, ref.latent) < 1e-5, f"seed {seed}"
    assert set(grads) == set(ref_grads) and any(n.startswith("lora.") for n in grads)
    worst = max(grads, key=lambda n: _rel(grads[n], ref_grads[n]))
    assert _rel(grads[worst], ref_grads[worst]) < 1e-4, f"seed {seed}: {worst}"


def test_mix_order_reduction_is_on_in_the_blocks_only():
    """compile_blocks / compile_regions switch Inductor's mix-order reduction off process-wide (it broke a backward of
    ours once; see inductor_guard), and the compiled blocks turn it on for their own graphs, unless
    ``DIFFRWKV_MIX_ORDER_REDUCTION=0``; ``=1`` leaves the process-wide setting alone."""
    import torch._inductor.config as inductor_config

    from rwkv_diffusion_rnn.models.rwkv7_compile import block_compile_options

    if not hasattr(inductor_config.triton, "mix_order_reduction"):
        pytest.skip("this torch has no mix-order reduction")
    # saved and restored by hand: pytest's monkeypatch undo breaks Inductor's config proxy (the option "does not
    # exist" for every later compile in the process)
    before = inductor_config.triton.mix_order_reduction
    try:
        for switch in (lambda m: compile_blocks(m), lambda m: compile_regions(m)):
            inductor_config.triton.mix_order_reduction = True
            switch(random_rwkv7(1, 64, vocab_size=256, seed=110))
            assert inductor_config.triton.mix_order_reduction is False
        assert block_compile_options()["triton.mix_order_reduction"] is True
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DIFFRWKV_MIX_ORDER_REDUCTION", "0")
            assert "triton.mix_order_reduction" not in block_compile_options()
            mp.setenv("DIFFRWKV_MIX_ORDER_REDUCTION", "1")  # the measuring switch leaves Inductor's setting alone
            inductor_config.triton.mix_order_reduction = True
            compile_blocks(random_rwkv7(1, 64, vocab_size=256, seed=110))
            assert inductor_config.triton.mix_order_reduction is True
    finally:
        inductor_config.triton.mix_order_reduction = before


@pytest.mark.slow  # ~20 s of torch.compile on 2 cores
def test_compiled_blocks_share_graphs_across_layers():
    """compile_blocks compiles a block once for layer 0 and once for the rest, whatever the depth: a guard on the
    layer index compiled every layer anew, and past Dynamo's recompile limit (8) the deeper blocks ran eager (seen on
    an H200: 12 layers, blocks 8-11 uncompiled)."""
    from torch._dynamo.utils import counters

    graphs = {}
    for n_layer in (2, 5):
        torch._dynamo.reset()
        counters.clear()
        model = random_rwkv7(n_layer, 64, vocab_size=100, seed=111).train()
        assert compile_blocks(model) == n_layer
        model(torch.randint(0, 100, (2, 9))).float().pow(2).mean().backward()
        graphs[n_layer] = counters["stats"]["unique_graphs"]
    assert graphs[2] > 0 and graphs[5] == graphs[2], graphs


def test_compiled_blocks_keep_static_shapes_across_lengths():
    """A block compiled by compile_blocks never turns symbolic: each new length is a static graph of its own
    (torch's automatic dynamic shapes would recompile the second length with a symbolic time axis and serve every
    later length from it, with slower kernels). Three lengths: three graphs, each with concrete sizes only."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = random_rwkv7(1, 64, vocab_size=50, seed=3).eval()
    compile_blocks(model)
    graphs = []
    with torch.no_grad():
        for T in (6, 7, 9):
            model(torch.randint(0, 50, (1, T), generator=torch.Generator().manual_seed(T)))
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == 2 * graphs[0] and graphs[2] == 3 * graphs[0], graphs
    torch._dynamo.reset()


def test_compile_blocks_sets_the_partitioners_memory_budget_or_refuses_it():
    """``compile_blocks(model, memory_budget)`` hands the share to the partitioner (read when a block first compiles,
    so nothing compiles here) and refuses a share outside (0, 1] before touching the model; the config refuses a
    budget without compiled blocks. (torch's own ``patch`` restores the setting: pytest's monkeypatch deletes a
    torch config entry on undo.)"""
    import torch._functorch.config as functorch_config

    from rwkv_diffusion_rnn.config import TrainConfig, validate
    from rwkv_diffusion_rnn.errors import DiffRwkvError

    budget = round(random.Random(8).uniform(0.05, 0.95), 3)
    with functorch_config.patch(activation_memory_budget=1.0):
        model = random_rwkv7(2, 64, vocab_size=50, seed=0)
        assert compile_blocks(model, budget) == 2 and functorch_config.activation_memory_budget == budget
        for bad in (0.0, 1.5, -0.2):
            fresh = random_rwkv7(1, 64, vocab_size=50, seed=0)
            with pytest.raises(DiffRwkvError, match="memory budget must be in"):
                compile_blocks(fresh, bad)
            assert all(getattr(b, "_compiled_call_impl", None) is None for b in fresh.blocks)
            assert functorch_config.activation_memory_budget == budget
    assert functorch_config.activation_memory_budget == 1.0
    cfg = TrainConfig()
    cfg.training.memory_budget = 0.5
    with pytest.raises(DiffRwkvError, match="set training.compile_blocks=true"):
        validate(cfg)
    cfg.training.compile_blocks = True
    validate(cfg)
    cfg.training.memory_budget = 1.2
    with pytest.raises(DiffRwkvError, match=r"training.memory_budget must be in \(0, 1\]"):
        validate(cfg)


def _fla_like(cast_inside: bool, seen: list):
    """A CPU stand-in for fla's backend: fla's contract (every operand in r's dtype) checked, the reference run."""
    from rwkv_diffusion_rnn.models.wkv7 import wkv7_reference

    def run(r, w, k, v, a, b, state=None):
        if cast_inside:  # what wkv7_fla does with operands of other dtypes
            w, k, v, a, b = (x.to(r.dtype) for x in (w, k, v, a, b))
        seen.append({x.dtype for x in (r, w, k, v, a, b)})
        return wkv7_reference(r, w, k, v, a, b, state)

    return run


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fla_operands_cast_in_the_block_change_no_number(monkeypatch, compiled):
    """With the fla backend the block casts w/k/v/a/b to r's dtype itself (inside the compiled block, where the
    casts fuse): fla's contract holds and the outputs and gradients are those of fla casting them (bitwise eager;
    to compile's rounding when compiled). Other backends get the fp32 operands as before."""
    from rwkv_diffusion_rnn.models import wkv7 as wkv7_module

    seed = 112
    seen_fla, seen_other = [], []
    monkeypatch.setitem(wkv7_module.BACKENDS, "fla", _fla_like(False, seen_fla))
    monkeypatch.setitem(wkv7_module.BACKENDS, "fla_casting_inside", _fla_like(True, seen_other))
    base = random_rwkv7(2, 128, vocab_size=300, seed=seed).train()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    ours.wkv_backend, theirs.wkv_backend = "fla", "fla_casting_inside"
    if compiled:
        compile_blocks(ours)
    B, T = 3, 17
    ids, targets = torch.randint(0, 300, (B, T)), torch.randint(0, 300, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 9:] = 0
    ref_logits, ref_grads = _loss_and_grads(theirs, ids, mask, targets, bf16=True)
    logits, grads = _loss_and_grads(ours, ids, mask, targets, bf16=True)
    assert seen_fla and all(d == {torch.bfloat16} for d in seen_fla), seen_fla  # cast before the backend
    assert seen_other and all(d == {torch.bfloat16} for d in seen_other)
    assert set(grads) == set(ref_grads) and len(grads) > 20
    if not compiled:
        assert torch.equal(logits, ref_logits), f"seed {seed}"
        for n in grads:
            assert torch.equal(grads[n], ref_grads[n]), f"seed {seed}: {n}"
    else:
        assert _rel(logits, ref_logits) < 2e-2, f"seed {seed}"
        worst = max(grads, key=lambda n: _rel(grads[n], ref_grads[n]))
        assert _rel(grads[worst], ref_grads[worst]) < 2e-1, f"seed {seed}: {worst}"
    # "auto" is resolved before the blocks, so a block knows fla will run (here auto's choice is forced to fla)
    from rwkv_diffusion_rnn.models import rwkv7 as rwkv7_module

    seen_fla.clear()
    monkeypatch.setattr(rwkv7_module, "resolve_backend", lambda name, device: "fla")
    auto = copy.deepcopy(base)
    auto.wkv_backend = "auto"
    auto_logits, _ = _loss_and_grads(auto, ids, mask, targets, bf16=True)
    assert seen_fla and all(d == {torch.bfloat16} for d in seen_fla), seen_fla
    assert torch.equal(auto_logits, ref_logits)  # (an eager copy) the same numbers as fla casting itself
    monkeypatch.undo()
    monkeypatch.setitem(wkv7_module.BACKENDS, "fla", _fla_like(False, seen_fla))
    # the reference backend is not fla: it still receives the fp32 log decay
    dtypes = []

    def spy(r, w, k, v, a, b, state=None):
        dtypes.append(w.dtype)
        return wkv7_module.wkv7_reference(r, w, k, v, a, b, state)

    monkeypatch.setitem(wkv7_module.BACKENDS, "reference", spy)
    plain = copy.deepcopy(base)
    plain.wkv_backend = "reference"
    _loss_and_grads(plain, ids, mask, targets, bf16=True)
    assert dtypes and set(dtypes) == {torch.float32}
