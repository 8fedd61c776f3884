"""The denoiser's layout and conditioning: text->latent reads the text, causality per context mode, padding,
zero-initialised FiLM, a backbone left as loaded. Seeded: every test starts from the same global RNG state."""

from __future__ import annotations

import pytest
import torch

from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, RWKVDenoiser

CONTEXTS = ["causal", "twice", "bidirectional"]


@pytest.fixture(autouse=True)
def _seeded():
    """Inputs and fresh weights draw from the global RNG: seed it per test, and give the caller's state back."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _denoiser(context: str, lm_head: bool = False, prefix: int = 2, readout: int = 2, seed: int = 0,
              latent_film: bool = False):  # fmt: skip
    backbone = random_rwkv7(RWKV7Config.for_shape(2, 64, 300), seed=seed)
    cfg = DenoiserConfig(
        context=context, use_rwkv_lm_head=lm_head, latent_prefix_len=prefix, latent_readout_len=readout,
        latent_film=latent_film,
    )  # fmt: skip
    d = RWKVDenoiser(backbone, cfg).eval()
    with torch.no_grad():  # leave the zero-init regime so every path carries signal
        d.latent_head[2].weight.normal_()
        d.time.out.weight.normal_(0, 0.1)
    return d


def _inputs(B=3, T=9, V=300):
    ids = torch.randint(1, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return ids, mask, torch.randn(B, 32), torch.rand(B), torch.rand(B)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("lm_head", [False, True])
def test_latent_prediction_depends_on_the_text(context, lm_head):
    d = _denoiser(context, lm_head)
    ids, mask, z, t1, t2 = _inputs()
    with torch.no_grad():
        base = d(ids, mask, z, t1, t2).latent
        for pos in (0, 4, 8):  # first, middle and last token of row 0
            other = ids.clone()
            other[0, pos] = other[0, pos] % 299 + 1
            changed = d(other, mask, z, t1, t2).latent
            assert (changed[0] - base[0]).abs().max() > 1e-4, (context, pos)
            torch.testing.assert_close(changed[1:], base[1:])  # other rows untouched


@pytest.mark.parametrize("context", CONTEXTS)
def test_text_causality_per_context(context):
    d = _denoiser(context)
    ids, mask, z, t1, t2 = _inputs()
    with torch.no_grad():
        base = d(ids, mask, z, t1, t2).text_hidden
        other = ids.clone()
        other[0, 6] = other[0, 6] % 299 + 1
        changed = d(other, mask, z, t1, t2).text_hidden
    before = (changed[0, :6] - base[0, :6]).abs().max().item()
    if context == "causal":
        assert before == 0.0  # position i never sees tokens after i
    else:
        assert before > 1e-5  # every position sees the whole row


@pytest.mark.parametrize("context", CONTEXTS)
def test_padded_rows_equal_rows_alone(context):
    d = _denoiser(context)
    ids, mask, z, t1, t2 = _inputs()
    with torch.no_grad():
        out = d(ids, mask, z, t1, t2)
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            alone = d(ids[r : r + 1, :n], mask[r : r + 1, :n], z[r : r + 1], t1[r : r + 1], t2[r : r + 1])
            torch.testing.assert_close(alone.text_hidden[0], out.text_hidden[r, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(alone.latent[0], out.latent[r], atol=1e-5, rtol=1e-5)


def test_mask_token_and_latent_reach_the_output():
    d = _denoiser("causal")
    ids, mask, z, t1, t2 = _inputs()
    with torch.no_grad():
        base = d(ids, mask, z, t1, t2)
        masked = ids.clone()
        masked[0, 3] = d.mask_id
        assert (d(masked, mask, z, t1, t2).text_hidden[0, 3] - base.text_hidden[0, 3]).abs().max() > 1e-4
        z2 = z.clone()
        z2[0] += 1.0
        assert (d(ids, mask, z2, t1, t2).text_hidden[0, 0] - base.text_hidden[0, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("every_block", [False, True])
def test_zero_init_film_leaves_backbone_states_unchanged(every_block):
    backbone = random_rwkv7(RWKV7Config.for_shape(2, 64, 300), seed=1)
    d = RWKVDenoiser(backbone, DenoiserConfig(film_every_block=every_block)).eval()
    ids, mask, z, t1, t2 = _inputs()
    captured = {}
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[0])) for i, b in
             enumerate(backbone.blocks)]  # fmt: skip
    with torch.no_grad():
        d(ids, mask, z, t1, t2)
        inside = dict(captured)
        x, lay = d.embed_inputs(ids, mask, z)
        backbone.forward_embeds(x, None, lay.mask)  # the plain backbone, no time conditioning
    for h in hooks:
        h.remove()
    for i in inside:
        assert torch.equal(inside[i], captured[i]), i


@pytest.mark.parametrize(
    "kw",
    [{}, {"use_rwkv_lm_head": True, "latent_prefix_len": 1}, {"lora_rank": 4},
     {"latent_film": True, "film_every_block": True, "time_conditioning": "film"}],
)  # fmt: skip
def test_building_the_denoiser_leaves_the_backbone_weights_unchanged(kw):
    """A pretrained backbone, frozen or adapted: building the denoiser around it initialises only the new parts
    (heads, time conditioning, LoRA adapters) and freezing it changes no value -- every backbone tensor is bit for bit
    the one loaded."""
    backbone = random_rwkv7(RWKV7Config.for_shape(2, 64, 300), seed=7)
    loaded = {k: v.clone() for k, v in backbone.state_dict().items()}
    d = RWKVDenoiser(backbone, DenoiserConfig(**kw))
    d.set_backbone_trainable(None, False)
    now = {k.removeprefix("backbone."): v for k, v in d.state_dict().items() if k.startswith("backbone.")}
    assert now.keys() == loaded.keys()
    for k, v in loaded.items():
        assert torch.equal(now[k], v), k


def test_lora_adapters_start_as_identity():
    backbone = random_rwkv7(RWKV7Config.for_shape(2, 64, 300), seed=5)
    ids, mask, z, t1, t2 = _inputs()
    with torch.no_grad():
        plain = RWKVDenoiser(backbone, DenoiserConfig()).eval()
        torch.manual_seed(0)
        ref = plain(ids, mask, z, t1, t2).text_hidden
    backbone2 = random_rwkv7(RWKV7Config.for_shape(2, 64, 300), seed=5)
    torch.manual_seed(0)
    lora = RWKVDenoiser(backbone2, DenoiserConfig(lora_rank=4)).eval()
    assert len(lora.lora) == 2 * 6
    lora.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(lora(ids, mask, z, t1, t2).text_hidden, ref)
        next(iter(lora.lora.values())).B.normal_()
        assert (lora(ids, mask, z, t1, t2).text_hidden - ref).abs().max() > 1e-5


@pytest.mark.parametrize("context", CONTEXTS)
def test_latent_film_brings_the_latent_to_every_position_without_a_prefix(context):
    """model.latent_film: with no latent prefix, a causal model's text positions depend on the latent only through
    the FiLM MLP (off: not at all; the other contexts also see the readout); zero-initialised, it starts as the
    identity like the time conditioning."""
    ids, mask, z, t1, t2 = _inputs()
    z2 = z + torch.randn_like(z)
    real = mask.bool()[..., None]
    with torch.no_grad():
        for film in (False, True):
            d = _denoiser(context, prefix=0, latent_film=film)
            diff = d(ids, mask, z2, t1, t2).text_hidden - d(ids, mask, z, t1, t2).text_hidden
            delta = (diff * real).abs().amax((1, 2))
            if film:
                assert (delta > 1e-4).all(), delta  # every row, from its first position on
                assert (d(ids[:, :1], mask[:, :1], z2, t1, t2).text_hidden - d(ids[:, :1], mask[:, :1], z, t1, t2)
                        .text_hidden).abs().max() > 1e-4  # fmt: skip
                d.time.out.weight.zero_()
                same = d(ids, mask, z2, t1, t2).text_hidden - d(ids, mask, z, t1, t2).text_hidden
                if context == "causal":  # zero-initialised output layer: the latent is not yet read there
                    assert (same * real).abs().max() == 0
            elif context == "causal":
                assert delta.max() == 0, delta


@pytest.mark.parametrize("lm_head", [False, True])
@pytest.mark.parametrize("K", [0, 5])
@pytest.mark.parametrize("latent_film", [False, True])
def test_cached_block_equals_rereading_the_committed_text(lm_head, K, latent_film):
    d = _denoiser("causal", lm_head, prefix=1 if lm_head else 2, latent_film=latent_film)
    B, Kb = 3, 4
    committed = torch.randint(1, 300, (B, K))
    block = torch.randint(1, 300, (B, Kb))
    block[:, 1] = d.mask_id
    z, t_lat, t_blk = torch.randn(B, 32), torch.rand(B), torch.rand(B)
    if lm_head and K == 0 and d.cfg.latent_prefix_len == 0:
        pytest.skip("nothing precedes the block")
    with torch.no_grad():
        cached = d.forward_cached(d.prefill(z, committed, t_lat), block, z, t_blk, t_lat)
        t_pos = torch.cat([torch.zeros(B, K), t_blk[:, None].expand(B, Kb)], 1)
        full = d(torch.cat([committed, block], 1), torch.ones(B, K + Kb, dtype=torch.long), z, t_pos, t_lat)
    torch.testing.assert_close(cached.text_hidden, full.text_hidden[:, K:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.latent, full.latent, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("latent_film", [False, True])
def test_prefill_in_pieces_equals_one_prefill(latent_film):
    """A left-to-right decoder commits text piece by piece: continuing the cache with each new piece gives the
    state and last hidden output of reading everything at once."""
    d = _denoiser("causal", False, prefix=2, latent_film=latent_film)
    g = torch.Generator().manual_seed(11)
    B = 3
    committed = torch.randint(1, 300, (B, 7), generator=g)
    z, t_lat = torch.randn(B, 32, generator=g), torch.rand(B, generator=g)
    with torch.no_grad():
        whole = d.prefill(z, committed, t_lat)
        cache = d.prefill(z, committed[:, :0], t_lat)  # the latent prefix alone
        for a, b in ((0, 1), (1, 4), (4, 4), (4, 7)):
            cache = d.prefill(z, committed[:, a:b], t_lat, cache)
    torch.testing.assert_close(cache.last_hidden, whole.last_hidden, atol=1e-5, rtol=1e-5)
    for name in ("att_x", "wkv", "ffn_x"):
        got, want = getattr(cache.state, name), getattr(whole.state, name)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_per_position_times_reach_the_positions():
    d = _denoiser("causal")
    ids, mask, z, t1, t2 = _inputs()
    t_pos = t1[:, None].expand(-1, ids.shape[1]).clone()
    with torch.no_grad():
        a = d(ids, mask, z, t_pos, t2).text_hidden
        t_pos[0, 4] = 1 - t_pos[0, 4]
        b = d(ids, mask, z, t_pos, t2).text_hidden
    assert (a[0, :4] - b[0, :4]).abs().max() == 0  # causal: earlier positions untouched
    assert (a[0, 4] - b[0, 4]).abs().max() > 1e-5


def test_sampling_logits_never_offer_banned_ids():
    d = _denoiser("causal")
    ids, mask, z, t1, t2 = _inputs()
    with torch.no_grad():
        h = d(ids, mask, z, t1, t2).text_hidden
        d.sample_banned_ids = (7, 299)
        logits = d.sampling_logits(h)
    assert torch.isinf(logits[..., [7, 299]]).all() and torch.isfinite(logits[..., :7]).all()
    torch.testing.assert_close(logits[..., 8:299], d.text_logits(h)[..., 8:299])


@pytest.mark.parametrize("lm_head", [False, True])
def test_selected_logits_are_the_head_on_the_selected_rows(lm_head):
    """Training's masked-position logits (computed on a row count rounded up to HEAD_ROWS) equal the head on the
    selected hidden states, row for row, and the padding rows pass no gradient back."""
    from rwkv_diffusion_rnn.models.rwkv_denoiser import HEAD_ROWS

    d = _denoiser("causal", lm_head=lm_head).train()
    ids, mask, z, tt, tl = _inputs(B=4, T=21)
    sel = (torch.rand(ids.shape) < 0.6) & mask.bool()
    sel[0, 3] = True
    n = int(sel.sum())
    assert n % HEAD_ROWS != 0
    out = d(ids, mask, z, tt, tl, text_select=sel)
    assert out.text_logits.shape == (n, 300)
    ref = d.text_logits(out.text_hidden[sel])
    torch.testing.assert_close(out.text_logits, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out.text_logits)
    head = d.backbone.head if lm_head else d.text_head
    (gw,) = torch.autograd.grad((out.text_logits * g).sum(), head.weight, retain_graph=True)
    (gw_ref,) = torch.autograd.grad((ref * g).sum(), head.weight)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)


def test_selection_by_flat_index_equals_selection_by_mask():
    d = _denoiser("twice")
    ids, mask, z, tt, tl = _inputs(B=3, T=10)
    sel = (torch.rand(ids.shape) < 0.5) & mask.bool()
    sel[2, 0] = True
    by_mask = d(ids, mask, z, tt, tl, text_select=sel).text_logits
    by_index = d(ids, mask, z, tt, tl, text_select=sel.flatten().nonzero().squeeze(1)).text_logits
    assert by_mask.shape[0] == int(sel.sum())
    torch.testing.assert_close(by_index, by_mask, rtol=0, atol=0)


@pytest.mark.parametrize("context,latent_film", [("causal", False), ("twice", True)])
def test_compiled_regions_equal_eager(context, latent_film):
    """compile_denoiser_regions: the embeddings/layout, the time modulation and the final norm + latent head run
    compiled in the training forward; outputs and every gradient equal eager's (fp32, summation order only)."""
    import copy

    from rwkv_diffusion_rnn.models.rwkv_denoiser import compile_denoiser_regions

    eager = _denoiser(context, latent_film=latent_film).train()
    fast = copy.deepcopy(eager)
    assert compile_denoiser_regions(torch.nn.ModuleList([fast])) == 1
    assert fast.compiled_regions and not eager.compiled_regions
    ids, mask, z, t_text, t_lat = _inputs()
    ids[0, :4] = eager.mask_id
    sel = (ids == eager.mask_id) | (torch.rand(ids.shape) < 0.5)
    sel &= mask.bool()
    from torch._dynamo.utils import counters

    outs = []
    for d in (eager, fast):
        counters.clear()
        out = d(ids, mask, z, t_text, t_lat, text_select=sel)
        # the fast model ran compiled frames (not a silent fallback to eager); the eager one none
        assert (counters["stats"]["calls_captured"] > 0) == (d is fast), dict(counters["stats"])
        loss = out.text_logits.logsumexp(-1).sum() + (out.latent**2).sum() + out.text_hidden.square().mean()
        loss.backward()
        outs.append((out, {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}))
    (o0, g0), (o1, g1) = outs
    for a, b in ((o0.text_logits, o1.text_logits), (o0.latent, o1.latent), (o0.text_hidden, o1.text_hidden)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        err = float((g1[n] - g0[n]).abs().max() / g0[n].abs().max().clamp_min(1e-12))
        assert err < 2e-4, (n, err)
    counters.clear()  # evaluation (no gradients) stays eager: varying shapes must not use up the recompile limit
    with torch.no_grad():
        fast(ids[:2], mask[:2], z[:2], t_text[:2], t_lat[:2])
    assert counters["stats"]["calls_captured"] == 0, dict(counters["stats"])
