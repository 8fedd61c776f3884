"""RWKV-7 backbone against BlinkDL's reference implementation, state carrying, padding, gradients."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from rwkv_diffusion_rnn import load_tokenizer
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7State
from rwkv_diffusion_rnn.models.wkv7 import wkv7_reference
from rwkv_diffusion_rnn.pretrained_rwkv import load_rwkv_model, save_pth
from tests.conftest import REPO, random_rwkv7, real_text_lines, sample_text

pytest.importorskip("rwkv", reason="BlinkDL's rwkv package is the oracle (pip install 'diffrwkv[test]')")


def _oracle(model_path, ids, tmp_path) -> dict:
    ids_file, out = tmp_path / "ids.json", tmp_path / "oracle.pt"
    ids_file.write_text(json.dumps(ids))
    subprocess.run(
        [sys.executable, str(REPO / "tests" / "_rwkv_oracle.py"), str(model_path), str(ids_file), str(out)],
        check=True,
        capture_output=True,
    )
    return torch.load(out)


def _real_ids(n_min: int = 32) -> list[int]:
    tok = load_tokenizer("rwkv-world")
    try:
        lines = real_text_lines()
        rng = random.Random(7)
        text = " ".join(rng.sample(lines, 4))
    except pytest.skip.Exception:
        text = sample_text()
    ids = tok.encode(text)
    assert len(ids) >= n_min, text
    return ids


@pytest.mark.parametrize("n_layer,n_embd", [(2, 128), (3, 192)])  # 192: not a power of two (3 heads)
def test_logits_match_blinkdl_rwkv_package(tmp_path, n_layer, n_embd):
    seed = 104
    model = random_rwkv7(n_layer, n_embd, seed=seed)
    path = tmp_path / "model.pth"
    save_pth(model.state_dict(), path)
    ids = _real_ids()
    ref = _oracle(path, ids, tmp_path)

    ours = load_rwkv_model(path)
    with torch.no_grad():
        logits, state = ours(torch.tensor([ids]), return_state=True)
    diff = (logits[0] - ref["logits"]).abs().max().item()
    assert diff <= 1e-4, f"seed {seed}: max |logit diff| {diff}"
    assert ref["logits"].abs().max() > 1.0  # the comparison is not between near-zero tensors

    # the recurrent state agrees too (BlinkDL keeps the WKV matrix as S[v, k]; we keep S[k, v])
    for layer in range(n_layer):
        att_x, wkv, ffn_x = ref["state"][3 * layer : 3 * layer + 3]
        torch.testing.assert_close(state.att_x[layer, 0], att_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.wkv[layer, 0], wkv.transpose(-1, -2), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state.ffn_x[layer, 0], ffn_x, atol=1e-5, rtol=1e-5)


def test_three_pieces_with_state_equal_one_pass():
    model = random_rwkv7(2, 128, vocab_size=1000, seed=105)
    ids = torch.randint(1, 1000, (3, 41))
    with torch.no_grad():
        full, full_state = model(ids, return_state=True)
        state, parts = None, []
        for chunk in (ids[:, :7], ids[:, 7:8], ids[:, 8:]):
            logits, state = model(chunk, state=state, return_state=True)
            parts.append(logits)
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-5
    for a, b in zip(
        (state.att_x, state.wkv, state.ffn_x), (full_state.att_x, full_state.wkv, full_state.ffn_x), strict=True
    ):
        assert (a - b).abs().max() <= 1e-5


def test_right_padded_batch_equals_rows_alone():
    model = random_rwkv7(2, 128, vocab_size=1000, seed=106)
    lengths = [13, 5, 9, 1]
    rows = [torch.randint(1, 1000, (n,)) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    # the state carried into the batch differs per row, and must survive padding
    start = RWKV7State.zeros(model.cfg, len(rows))
    start = RWKV7State(torch.randn_like(start.att_x), torch.randn_like(start.wkv) * 0.1, torch.randn_like(start.ffn_x))
    with torch.no_grad():
        batch_logits, batch_state = model(ids, state=start, attention_mask=mask, return_state=True)
        for i, r in enumerate(rows):
            one = start.index_select(torch.tensor([i]))
            logits, state = model(r[None], state=one, return_state=True)
            assert (batch_logits[i, : len(r)] - logits[0]).abs().max() <= 1e-5
            for a, b in zip(
                (state.att_x, state.wkv, state.ffn_x),
                (batch_state.att_x, batch_state.wkv, batch_state.ffn_x),
                strict=True,
            ):
                assert (a[:, 0] - b[:, i]).abs().max() <= 1e-5


def test_left_padding_is_refused():
    model = random_rwkv7(1, 64, vocab_size=100)
    from rwkv_diffusion_rnn.errors import DiffRwkvError

    with pytest.raises(DiffRwkvError, match="right-padded"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]]))


def test_wkv_reference_matches_blinkdl_layout_recurrence():
    """The op against a literal transcription of BlinkDL's per-step update (S[v, k] layout), random inputs."""
    B, T, H, N = 2, 9, 3, 8
    r, k, v, kk = (torch.randn(B, T, H, N) for _ in range(4))
    kk = torch.nn.functional.normalize(kk, dim=-1)
    a_gate = torch.rand(B, T, H, N)
    w = -torch.rand(B, T, H, N) * 0.6
    s0 = torch.randn(B, H, N, N)
    o, s = wkv7_reference(r, w, k, v, -kk, kk * a_gate, s0)
    S = s0.transpose(-1, -2).clone()  # [v, k]
    for t in range(T):
        ab = (-kk[:, t]).unsqueeze(-1) @ (kk[:, t] * a_gate[:, t]).unsqueeze(-2)
        S = S * torch.exp(w[:, t]).unsqueeze(-2) + S @ ab + v[:, t].unsqueeze(-1) @ k[:, t].unsqueeze(-2)
        torch.testing.assert_close(o[:, t], (S @ r[:, t].unsqueeze(-1)).squeeze(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, S.transpose(-1, -2), atol=1e-5, rtol=1e-5)


def test_backward_reaches_every_parameter():
    model = random_rwkv7(2, 64, vocab_size=200).train()
    ids = torch.randint(0, 200, (2, 10))
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 200), ids[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bf16_close_to_fp32(tmp_path):
    model = random_rwkv7(2, 128, vocab_size=1000)
    save_pth(model.state_dict(), tmp_path / "m.pth")
    ids = torch.randint(1, 1000, (2, 16))
    with torch.no_grad():
        ref = load_rwkv_model(tmp_path / "m.pth")(ids)
        low = load_rwkv_model(tmp_path / "m.pth", dtype="bf16")(ids).float()
    rel = (low - ref).norm() / ref.norm()
    assert rel < 3e-2, rel


def test_hidden_states_feed_the_head():
    model = random_rwkv7(1, 64, vocab_size=300)
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        h = model.hidden_states(ids)
        assert h.shape == (2, 7, 64)
        torch.testing.assert_close(model.head(h), model(ids))


def test_random_checkpoint_is_a_function_of_its_seed():
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config
    from rwkv_diffusion_rnn.models.rwkv7 import random_rwkv7 as make

    cfg = RWKV7Config.for_shape(2, 64, 100)
    a, b, c = make(cfg, seed=3).state_dict(), make(cfg, seed=3).state_dict(), make(cfg, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.1.att.receptance.weight"], c["blocks.1.att.receptance.weight"])


def _bf16_residual_run(model, ids, targets, autocast: bool):
    model.zero_grad(set_to_none=True)
    dtypes = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: dtypes.append(out[0].dtype)) for b in model.blocks]
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        logits = model(ids).float()
    for h in hooks:
        h.remove()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, dtypes


def test_bf16_residual_rounds_only_the_stream_under_bf16_autocast():
    """set_bf16_residual: under bf16 autocast every block hands a bf16 stream on (off: fp32), the logits and every
    gradient stay close to the fp32 stream's, and the weights' gradients stay fp32; without autocast it changes
    nothing at all."""
    from rwkv_diffusion_rnn.models.rwkv7 import set_bf16_residual

    model = random_rwkv7(3, 128, vocab_size=200, seed=21).train()
    g = torch.Generator().manual_seed(21)
    ids, targets = torch.randint(0, 200, (2, 24), generator=g), torch.randint(0, 200, (2, 24), generator=g)
    plain = {}
    for on in (False, True):
        set_bf16_residual(model, on)
        plain[on] = _bf16_residual_run(model, ids, targets, autocast=False)
    assert torch.equal(plain[False][0], plain[True][0])  # no autocast: bit-identical
    assert all(torch.equal(plain[False][1][n], plain[True][1][n]) for n in plain[False][1])
    set_bf16_residual(model, False)
    logits32, grads32, dtypes32 = _bf16_residual_run(model, ids, targets, autocast=True)
    assert set_bf16_residual(model, True) == 3
    logits16, grads16, dtypes16 = _bf16_residual_run(model, ids, targets, autocast=True)
    assert dtypes32 == [torch.float32] * 3 and dtypes16 == [torch.bfloat16] * 3
    assert logits32.abs().max() > 1.0
    assert _rel(logits16, logits32) < 2e-2
    assert all(g.dtype == torch.float32 for g in grads16.values())
    worst = max(grads32, key=lambda n: _rel(grads16[n], grads32[n]))
    print(f"logits {_rel(logits16, logits32):.2e}, worst gradient {worst} {_rel(grads16[worst], grads32[worst]):.2e}")
    assert _rel(grads16[worst], grads32[worst]) < 0.1, worst  # bf16 rounding of the stream's gradients
    assert not all(torch.equal(grads16[n], grads32[n]) for n in grads32)  # the setting did act


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_bf16_residual_trains_like_the_fp32_stream():
    """Forty AdamW steps of a small model on a fixed batch (bf16 autocast, fp32 weights): the loss curve with the
    bf16 stream follows the fp32 stream's (BlinkDL trains in bf16 throughout)."""
    from rwkv_diffusion_rnn.models.rwkv7 import set_bf16_residual

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 120, (4, 33), generator=g)
    curves = {}
    for on in (False, True):
        torch.manual_seed(5)
        model = random_rwkv7(2, 64, vocab_size=120, seed=5).train()
        set_bf16_residual(model, on)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(40):
            with torch.autocast("cpu", torch.bfloat16):
                logits = model(ids[:, :-1]).float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[on] = losses
    first, last32, last16 = curves[False][0], curves[False][-1], curves[True][-1]
    print(f"loss {first:.3f} -> fp32 stream {curves[False][::8]}, bf16 stream {curves[True][::8]}")
    assert last32 < 0.5 * first  # the batch is being learned
    assert abs(last16 - last32) < 0.05 * first, (curves[False][::8], curves[True][::8])
    assert curves[True] != curves[False]  # the setting did act
