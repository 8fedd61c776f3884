"""The compiled elementwise regions of the RWKV-7 blocks (``compile_regions``) against the plain functions."""

from __future__ import annotations

import random

import pytest
import torch

from rwkv_diffusion_rnn.models.rwkv7 import PLAIN, ChannelMix, TimeMix, compile_regions, compiled_regions
from tests.conftest import random_rwkv7


def _loss_and_grads(model, ids, mask, targets):
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask)
    loss = torch.nn.functional.cross_entropy(logits[mask.bool()], targets[mask.bool()])
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.slow  # two torch.compile graphs per region (forward, backward): ~1 min on 2 cores
def test_compiled_regions_match_plain_forward_and_backward():
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    model = random_rwkv7(2, 128, vocab_size=300, seed=seed).train()
    B, T = 3, 19
    ids = torch.randint(0, 300, (B, T))
    targets = torch.randint(0, 300, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 11:] = 0  # a right-padded row: the padding path goes through the same regions
    ref_logits, ref_grads = _loss_and_grads(model, ids, mask, targets)

    assert compile_regions(model) == 4  # 2 layers x (time-mix, channel-mix)
    assert all(m.regions is compiled_regions() for m in model.modules() if isinstance(m, (TimeMix, ChannelMix)))
    logits, grads = _loss_and_grads(model, ids, mask, targets)
    compile_regions(model, enable=False)
    assert all(m.regions is PLAIN for m in model.modules() if isinstance(m, (TimeMix, ChannelMix)))

    assert ref_logits.abs().max() > 1.0  # not a comparison of near-zero tensors
    assert _rel(logits, ref_logits) < 1e-5, f"seed {seed}"
    assert set(grads) == set(ref_grads) and len(grads) > 20
    worst = max(grads, key=lambda n: _rel(grads[n], ref_grads[n]))
    assert _rel(grads[worst], ref_grads[worst]) < 1e-4, f"seed {seed}: {worst}"
