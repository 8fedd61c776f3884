"""objectives.py: the training corruption and loss, composed from diffusion_process.MaskedDiffusion -- what training
runs. CPU, seeded inputs; a table "denoiser" so the objective alone is tested, a tiny RWKVDenoiser for the losses
recorded before the masked text diffusion was made one implementation, and the samplers' unconditional inputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rwkv_diffusion_rnn.continuous_diffusion import GaussianDiffusion, LatentNormalizer, build_latent_schedule
from rwkv_diffusion_rnn.diffusion_process import MaskedDiffusion, build_text_schedule
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, DenoiserOutput, RWKVDenoiser
from rwkv_diffusion_rnn.objectives import L2T, T2L, UNCOND, DiffusionObjective

V, D = 11, 4  # real tokens 0..V-1, <mask> = V; latent dims
MIXED = {"l2t": 1.0, "t2l": 1.0, "unconditional": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def objective(clean_prefix: float, seed: int, t2l_time_power: float = 1.0, *, weighting: str = "elbo",
              p_uncond: float = 0.1, max_length: int | None = None) -> DiffusionObjective:  # fmt: skip
    text = MaskedDiffusion(build_text_schedule("loglinear", eps=1e-3), V, weighting)
    latent = GaussianDiffusion(build_latent_schedule("cosine"), "x0")
    return DiffusionObjective(text, latent, LatentNormalizer([0.0] * D, [1.0] * D), p_uncond, 1.0, max_length, seed,
                              False, clean_prefix, t2l_time_power)  # fmt: skip


def batch(g: torch.Generator, b: int = 12, t: int = 9) -> dict[str, torch.Tensor]:
    lens = torch.randint(1, t + 1, (b,), generator=g)
    attn = (torch.arange(t)[None] < lens[:, None]).long()
    ids = torch.randint(0, V, (b, t), generator=g) * attn  # right padding with id 0
    return {"input_ids": ids, "attention_mask": attn, "latent": torch.randn(b, D, generator=g)}


class TableDenoiser(torch.nn.Module):
    """Logits from a random table of (input id, position) and the time fed at that position: the loss depends on
    everything the objective hands the model, and records what it was handed. ``width`` V + 1 adds a ``<mask>``
    column, which SUBS must ignore."""

    def __init__(self, g: torch.Generator, t: int, width: int = V) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V + 1, t, width, generator=g))
        self.seen: dict = {}

    def dense(self, noisy_ids, t_text):  # [B, T, width]
        t_pos = t_text if t_text.dim() == 2 else t_text[:, None].expand_as(noisy_ids)
        return self.table[noisy_ids, torch.arange(noisy_ids.shape[1])[None]] * (1 + t_pos[..., None])

    def forward(self, noisy_ids, attention_mask, z_t, t_text, t_latent, text_select=None, text_targets=None):
        self.seen = {"noisy_ids": noisy_ids, "t_text": t_text}
        logits = self.dense(noisy_ids, t_text)
        flat = logits.flatten(0, 1).index_select(0, text_select)
        return DenoiserOutput(logits, torch.zeros_like(z_t), flat)


@pytest.mark.parametrize("modes", ["l2t", "unconditional", {"l2t": 1.0, "t2l": 1.0, "unconditional": 0.5}])
@pytest.mark.parametrize("seed", [3, 41])
def test_clean_prefix_rows_are_clean_before_their_boundary_and_diffused_after(modes, seed):
    g = torch.Generator().manual_seed(seed)
    bt = batch(g)
    real = bt["attention_mask"].bool()
    plain = objective(0.0, seed).corrupt(bt, modes, step=3)
    c = objective(1.0, seed).corrupt(bt, modes, step=3)
    assert plain.t_text.dim() == 1 and plain.text_positions is None
    assert c.t_text.shape == bt["input_ids"].shape and c.text_positions.shape == bt["input_ids"].shape
    # the prefix draws come last: modes, times, masking uniforms and latent noise are those of a plain run
    assert torch.equal(c.modes, plain.modes) and torch.equal(c.z_t, plain.z_t) and torch.equal(c.eps, plain.eps)
    pos = torch.arange(real.shape[1])[None]
    n_prefixed = 0
    for i in range(real.shape[0]):
        t_row = plain.t_text[i]
        if c.modes[i] == T2L:  # the condition: untouched
            assert torch.equal(c.t_text[i], t_row.expand(real.shape[1])), seed
            assert torch.equal(c.noisy_ids[i], plain.noisy_ids[i]), seed
            continue
        k = int((c.t_text[i] == 0).long().cumprod(0).sum()) if t_row > 0 else 0  # clean run at the start
        assert 0 <= k < int(real[i].sum()), (seed, i, k)
        n_prefixed += k > 0
        assert torch.equal(c.t_text[i], torch.where(pos[0] < k, 0.0, t_row)), seed
        assert not c.masked[i, :k].any() and torch.equal(c.noisy_ids[i, :k], bt["input_ids"][i, :k]), seed
        # after the boundary: the plain run's masks exactly
        assert torch.equal(c.masked[i, k:], plain.masked[i, k:]), seed
        assert torch.equal(c.text_positions[i], (pos[0] >= k) & real[i]), seed
    assert n_prefixed > 0, seed  # with p = 1 and 12 rows, some boundary lands after position 0
    # the ELBO normaliser counts the positions under the ELBO, not the clean prefix
    n_text = int((c.text_positions & c.text_rows[:, None]).sum())
    assert int(c.counts("elbo")[0]) == n_text, seed


@pytest.mark.parametrize("seed", [7])
def test_clean_prefix_share_and_boundaries_are_uniform(seed):
    g = torch.Generator().manual_seed(seed)
    t = 8
    bt = {"input_ids": torch.randint(0, V, (4000, t), generator=g), "attention_mask": torch.ones(4000, t).long(),
          "latent": torch.randn(4000, D, generator=g)}  # fmt: skip
    c = objective(0.3, seed).corrupt(bt, "l2t", step=0)
    k = (~c.text_positions).sum(1)  # full rows: the boundary is the count of positions before it
    # rows with a prefix: 0.3 x 4000, and their boundaries uniform on 0..7 (k = 0 is a prefix row too, unseen)
    share = float((k > 0).float().mean())
    assert abs(share - 0.3 * 7 / 8) < 0.04, (seed, share)  # sd of the share ~0.007
    counts = torch.bincount(k[k > 0], minlength=t)[1:].float()
    assert float((counts - counts.mean()).abs().max()) < 0.3 * counts.mean(), (seed, counts)


@pytest.mark.parametrize("seed", [11, 12])
def test_clean_prefix_loss_is_the_suffix_elbo_and_ranks_split_the_global_batch(seed):
    g = torch.Generator().manual_seed(seed)
    bt = batch(g, b=8)
    obj = objective(0.7, seed)
    den = TableDenoiser(g, bt["input_ids"].shape[1])
    c = obj.corrupt(bt, "l2t", step=5, micro=1)
    loss, stats = obj.loss(den, c, c.counts("elbo"))
    assert torch.equal(den.seen["t_text"], c.t_text)  # the model is fed the per-position times
    # reference: per masked position, CE x the ELBO weight of its row's t, over the suffix tokens of all rows
    t_pos = c.t_text
    logits = den.table[c.noisy_ids, torch.arange(c.noisy_ids.shape[1])[None]] * (1 + t_pos[..., None])
    ce = F.cross_entropy(logits.permute(0, 2, 1), c.input_ids, reduction="none")
    w = obj.text.schedule.elbo_weight(t_pos.clamp_min(1e-6))
    want = (ce * w)[c.masked].sum() / (c.text_positions & c.text_rows[:, None]).sum()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5), seed
    loss.backward()
    assert den.table.grad is not None and torch.isfinite(den.table.grad).all(), seed
    # two ranks see exactly the rows of the one-process batch (draws are made for the global batch)
    halves = [obj.corrupt({k: v[r::2] for k, v in bt.items()}, "l2t", step=5, micro=1, rank=r, world=2) for r in (0, 1)]
    for r, h in enumerate(halves):
        assert torch.equal(h.t_text, c.t_text[r::2]) and torch.equal(h.masked, c.masked[r::2]), (seed, r)


@pytest.mark.parametrize("seed", [13])
def test_evaluation_corruption_ignores_clean_prefix(seed):
    g = torch.Generator().manual_seed(seed)
    bt = batch(g)
    a = objective(1.0, seed).corrupt(bt, "l2t", step=1, salt=99991, clean_prefix=0.0)
    b = objective(0.0, seed).corrupt(bt, "l2t", step=1, salt=99991)
    assert torch.equal(a.t_text, b.t_text) and torch.equal(a.masked, b.masked) and a.text_positions is None
    assert (a.modes == L2T).all()


@pytest.mark.parametrize("seed", [17, 18])
def test_t2l_time_power_moves_only_the_t2l_rows_latent_times_towards_one(seed):
    bt = batch(torch.Generator().manual_seed(seed), b=64)
    modes = {"l2t": 1.0, "t2l": 1.0, "unconditional": 1.0}
    plain = objective(0.0, seed).corrupt(bt, modes, step=2)
    skew = objective(0.0, seed, t2l_time_power=0.5).corrupt(bt, modes, step=2)
    t2l = plain.modes == T2L
    assert 0 < int(t2l.sum()) < 64
    torch.testing.assert_close(skew.t_latent[t2l], plain.t_latent[t2l].sqrt(), rtol=0, atol=0)
    assert torch.equal(skew.t_latent[~t2l], plain.t_latent[~t2l])  # l2t (clean, 0) and unconditional rows
    assert bool((skew.t_latent[t2l] >= plain.t_latent[t2l]).all())
    for k in ("noisy_ids", "masked", "eps", "t_text"):
        assert torch.equal(getattr(skew, k), getattr(plain, k)), k  # nothing else drawn differently


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_t2l_time_power_out_of_range_is_one_line(bad):
    from rwkv_diffusion_rnn.config import TrainConfig, validate
    from rwkv_diffusion_rnn.errors import DiffRwkvError

    cfg = TrainConfig()
    cfg.diffusion.t2l_time_power = bad
    with pytest.raises(DiffRwkvError, match=r"diffusion.t2l_time_power must be in \(0, 1\]") as err:
        validate(cfg)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ the losses recorded before the refactor
#: ``(loss, text sum, text CE sum, latent sum)`` of three fixed micro-batches per case, recorded on this CPU before
#: the objective was made to compose ``MaskedDiffusion`` (whose own corruption and loss it used to duplicate).
# fmt: off
RECORDED = {
    "elbo": [
        (4.460417747497559, 157.79617309570312, 76.97334289550781, 5.648139953613281),
        (6.0598859786987305, 174.9442596435547, 94.61979675292969, 5.418177127838135),
        (5.245800018310547, 66.99406433105469, 26.24591636657715, 8.908903121948242),
    ],
    "uniform": [
        (4.639406681060791, 76.97334289550781, 76.97334289550781, 5.648139953613281),
        (4.70103645324707, 94.61979675292969, 94.61979675292969, 5.418177127838135),
        (4.528945446014404, 26.24591636657715, 26.24591636657715, 8.908903121948242),
    ],
    "elbo-prefix": [
        (4.388147830963135, 111.06912231445312, 69.35424041748047, 5.75194787979126),
        (6.247720718383789, 164.6024627685547, 89.75881958007812, 5.435513973236084),
        (5.248139381408691, 66.99406433105469, 26.24591636657715, 8.935640335083008),
    ],
    "uniform-prefix": [
        (4.644786357879639, 69.35424041748047, 69.35424041748047, 5.65552282333374),
        (4.661102294921875, 89.75881958007812, 89.75881958007812, 5.418177127838135),
        (4.528945446014404, 26.24591636657715, 26.24591636657715, 8.908903121948242),
    ],
    "elbo-chunked": [
        (4.460417747497559, 157.79617309570312, 76.97334289550781, 5.648139953613281),
        (6.0598859786987305, 174.9442596435547, 94.61979675292969, 5.418177127838135),
        (5.245799541473389, 66.99405670166016, 26.245914459228516, 8.908903121948242),
    ],
    "uniform-chunked": [
        (4.639406681060791, 76.97334289550781, 76.97334289550781, 5.648139953613281),
        (4.70103645324707, 94.61979675292969, 94.61979675292969, 5.418177127838135),
        (4.528945446014404, 26.245914459228516, 26.245914459228516, 8.908903121948242),
    ],
}
# fmt: on
OPTIONS = {"prefix": dict(clean_prefix=0.5), "chunked": dict(chunked_ce=True)}


def tiny_denoiser(vocab: int, seed: int = 3) -> RWKVDenoiser:
    with torch.random.fork_rng(devices=[]):  # the fresh heads draw from the global RNG: seeded, and given back
        torch.manual_seed(0)
        d = RWKVDenoiser(random_rwkv7(RWKV7Config.for_shape(1, 64, vocab), seed=seed), DenoiserConfig()).eval()
        with torch.no_grad():
            d.latent_head[2].weight.normal_(0, 0.1)  # leave the zero-init regime: the latent loss depends on it
    return d


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_training_loss_is_the_recorded_one(case):
    """The objective's loss on fixed seeded micro-batches (a tiny RWKVDenoiser, every mode, condition dropout, clean
    prefixes with t2l time power, the chunked head) equals the loss recorded before the refactor, per weighting."""
    vocab, dim = 40, 32
    weighting, *option = case.split("-")
    kw = OPTIONS[option[0]] if option else {}
    if kw.get("clean_prefix") and weighting == "elbo":
        kw = dict(kw, t2l_time_power=0.5)
    text = MaskedDiffusion(build_text_schedule("loglinear", eps=1e-3), vocab, weighting)
    latent = GaussianDiffusion(build_latent_schedule("cosine"), "x0")
    obj = DiffusionObjective(text, latent, LatentNormalizer([0.5] * dim, [2.0] * dim), p_uncond=0.3,
                             latent_loss_weight=0.7, max_length=14, seed=11, **kw)  # fmt: skip
    den = tiny_denoiser(vocab)
    got = []
    for k in range(3):
        g = torch.Generator().manual_seed(100 + k)
        lens = torch.randint(2, 13, (8,), generator=g)
        lens[0] = 12
        attn = (torch.arange(12)[None] < lens[:, None]).long()
        ids = torch.randint(0, vocab, (8, 12), generator=g) * attn
        bt = {"input_ids": ids, "attention_mask": attn, "latent": torch.randn(8, dim, generator=g) * 2 + 0.5}
        c = obj.corrupt(bt, {"l2t": 1.0, "t2l": 1.0, "unconditional": 1.0}, step=k, micro=1)
        with torch.no_grad():
            loss, st = obj.loss(den, c, c.counts(weighting))
        got.append((float(loss), *(float(st["sums"][i]) for i in (0, 1, 3))))
    want = torch.tensor(RECORDED[case], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- the loss, by hand
@pytest.mark.parametrize("weighting", ["uniform", "elbo"])
def test_loss_against_a_hand_computed_reference(weighting):
    """A context-free model with p(k) = (k + 1) / 66 over the 11 tokens: each masked token costs log(66 / (k + 1)).
    uniform (the default): the mean of that over the masked tokens of both micro-batches; elbo: each times 1 / t of
    its row, over the real tokens of the rows with a text loss. Written out position by position."""
    logits = torch.log(torch.arange(1.0, V + 1))  # sum of weights = 66

    class Constant(torch.nn.Module):
        def forward(self, noisy_ids, attention_mask, z_t, t_text, t_latent, text_select=None, text_targets=None):
            return DenoiserOutput(None, torch.zeros_like(z_t), logits.expand(len(text_select), V))

    obj = objective(0.0, 5, weighting=weighting, p_uncond=0.3)
    g = torch.Generator().manual_seed(21)
    cs = [obj.corrupt(batch(g), MIXED, step=4, micro=m) for m in (0, 1)]
    norm = cs[0].counts(weighting) + cs[1].counts(weighting)  # as the trainer sums them over micro-steps
    total = sum(float(obj.loss(Constant(), c, norm)[1]["sums"][0]) for c in cs) / float(norm[0])  # the text part
    num, den = 0.0, 0
    for c in cs:
        for i in range(c.input_ids.shape[0]):
            text_row = int(c.modes[i]) != T2L
            for j in range(c.input_ids.shape[1]):
                real = bool(c.attention_mask[i, j])
                if bool(c.masked[i, j]):
                    assert real and text_row and int(c.noisy_ids[i, j]) == V
                    nll = math.log(66 / (int(c.input_ids[i, j]) + 1))
                    num += nll if weighting == "uniform" else nll / float(c.t_text[i])
                    den += weighting == "uniform"
                den += weighting == "elbo" and real and text_row
    assert den == int(norm[0]) > 0
    assert total == pytest.approx(num / den, rel=1e-5)


@pytest.mark.parametrize("weighting", ["uniform", "elbo"])
@pytest.mark.parametrize("width", [V, V + 1])
def test_loss_and_gradients_match_the_dense_reference(weighting, width):
    """The objective's loss (logits gathered at the masked positions only) against the dense SUBS log-probs of every
    position: same loss, same gradients; a ``<mask>`` column takes no part."""
    g = torch.Generator().manual_seed(23 + width)
    bt = batch(g)
    obj = objective(0.0, 2, weighting=weighting, p_uncond=0.2)
    den = TableDenoiser(g, bt["input_ids"].shape[1], width)
    c = obj.corrupt(bt, MIXED, step=6)
    norm = c.counts(weighting)
    loss, st = obj.loss(den, c, norm)
    (grad,) = torch.autograd.grad(loss, den.table)  # the latent part (a zero output) does not touch the table
    loss = loss.detach() - st["sums"][3] / norm[1]  # the text part
    log_p = torch.log_softmax(den.dense(c.noisy_ids, c.t_text)[..., :V], -1)  # SUBS at a masked position
    nll = -log_p.gather(-1, c.input_ids[..., None])[..., 0]
    w = 1 / c.t_text.clamp_min(1e-6)[:, None].expand_as(nll) if weighting == "elbo" else torch.ones_like(nll)
    in_loss = (c.noisy_ids == V) & c.attention_mask.bool() & c.text_rows[:, None]
    assert torch.equal(in_loss, c.masked)
    count = (c.attention_mask.bool() & c.text_rows[:, None]).sum() if weighting == "elbo" else in_loss.sum()
    ref = (nll * w)[in_loss].sum() / count
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    (grad_ref,) = torch.autograd.grad(ref, den.table)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)
    if width == V + 1:
        assert not grad[..., V].any()  # the <mask> column never reaches the loss


@pytest.mark.parametrize("weighting", ["uniform", "elbo"])
def test_rows_without_a_text_loss_give_a_zero_text_loss(weighting):
    g = torch.Generator().manual_seed(25)
    bt = batch(g)
    den = TableDenoiser(g, bt["input_ids"].shape[1])
    c = objective(0.0, 3, weighting=weighting, p_uncond=0.0).corrupt(bt, "t2l", step=1)
    assert not c.masked.any() and int(c.counts(weighting)[0]) == 0
    loss, st = objective(0.0, 3, weighting=weighting).loss(den, c, c.counts(weighting))
    assert float(st["sums"][0]) == 0.0 and torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, den.table, allow_unused=True)
    assert grad is None or not grad.any()


def test_elbo_weighting_makes_a_context_free_model_cost_its_nll_at_every_time():
    """For a context-free model p(x), E_t E_q[w(t) sum_masked -log p(x_i)] per token = (1 - eps) x its mean NLL per
    token, because w(t) P(masked at t) = -alpha'(t) = 1 - eps. A wrong weighting (uniform, 1/t^2) fails. Through the
    objective's own times, masks and loss."""
    g = torch.Generator().manual_seed(27)
    class_logits = torch.randn(V, generator=g) * 2

    class Constant(torch.nn.Module):
        def forward(self, noisy_ids, attention_mask, z_t, t_text, t_latent, text_select=None, text_targets=None):
            return DenoiserOutput(None, torch.zeros_like(z_t), class_logits.expand(len(text_select), V))

    bt = batch(g, b=32, t=32)
    nll = -torch.log_softmax(class_logits, -1)[bt["input_ids"]]
    attn = bt["attention_mask"]
    expected = float((1 - 1e-3) * (nll * attn).sum() / attn.sum())
    obj = objective(0.0, 4, p_uncond=0.0)
    losses = torch.tensor([float(obj.loss(Constant(), c, c.counts("elbo"))[0])
                           for c in (obj.corrupt(bt, "l2t", step=k) for k in range(200))])  # fmt: skip
    se = float(losses.std()) / math.sqrt(len(losses))
    assert abs(float(losses.mean()) - expected) < 5 * se + 1e-3, (float(losses.mean()), expected, se)


# --------------------------------------------------------------------------------------- regressions
@pytest.mark.parametrize("seed", [31, 32])
def test_each_mode_gives_its_rows_the_rule_times(seed):
    """l2t: text times sampled in (t_min, 1] (never pinned to 1), latent clean at 0 (1 when dropped); t2l: text clean
    at 0 (1, all <mask>, when dropped), latent sampled; unconditional: both sampled. The draws are shared, so one
    seed's l2t text and t2l latent are the unconditional run's."""
    bt = batch(torch.Generator().manual_seed(seed), b=16)
    obj = objective(0.0, seed, p_uncond=0.5)
    un, l2t, t2l = (obj.corrupt(bt, m, step=2) for m in ("unconditional", "l2t", "t2l"))
    real = bt["attention_mask"].bool()
    drop = l2t.t_latent == 1
    assert 0 < int(drop.sum()) < 16, seed  # both kinds of rows present
    # l2t: the text is the target, at the sampled time; the latent is the condition
    assert torch.equal(l2t.t_text, un.t_text) and torch.equal(l2t.masked, un.masked)
    assert torch.equal(l2t.noisy_ids, un.noisy_ids)
    gaps = l2t.t_text.sort().values.diff()  # antithetic: one time per stratum of (t_min, 1]
    torch.testing.assert_close(gaps, torch.full_like(gaps, (1 - 1e-3) / 16), rtol=0, atol=1e-5)
    assert torch.equal(l2t.t_latent, drop.float()) and torch.equal(l2t.z_t[~drop], l2t.z0[~drop])
    assert torch.equal(l2t.text_rows, torch.ones(16, dtype=torch.bool)) and torch.equal(l2t.latent_rows, drop & False)
    # t2l: the latent is the target at the sampled time; the text is the condition, clean or all <mask>
    assert torch.equal(t2l.t_latent, un.t_latent) and torch.equal(t2l.t_text, drop.float())
    assert torch.equal(t2l.noisy_ids, torch.where(drop[:, None] & real, V, bt["input_ids"]))
    assert not t2l.masked.any() and not t2l.text_rows.any() and t2l.latent_rows.all()
    # unconditional: both sampled, both targets
    assert (un.t_text > 1e-3).all() and (un.t_latent > 1e-3).all() and un.text_rows.all() and un.latent_rows.all()
    # mixed: each row follows its own mode's rule
    mix = obj.corrupt(bt, MIXED, step=2)
    for mode, rule in ((L2T, lambda c: c.t_latent), (T2L, lambda c: c.t_text)):
        rows = mix.modes == mode
        assert bool(((rule(mix)[rows] == 0) | (rule(mix)[rows] == 1)).all()), (seed, mode)
        assert bool((mix.t_text[rows] > 0).all() if mode == L2T else (mix.t_latent[rows] > 0).all()), (seed, mode)
    assert bool((mix.t_text[mix.modes == UNCOND] > 0).all())


def test_dropped_condition_is_what_the_samplers_feed_unconditionally():
    """Condition dropout trains the input classifier-free guidance feeds: the text condition of a dropped t2l row is
    sample_t2l's unconditional pass (every real position <mask>, pads as they are, t_text = 1), the latent condition
    of a dropped l2t row is sample_l2t's (t_latent = 1; the latent pure noise up to alpha(1) ~ 1.6e-3 of z0)."""
    from rwkv_diffusion_rnn.sampling import sample_l2t, sample_t2l

    vocab, dim = 40, 32
    den = tiny_denoiser(vocab)
    latent = GaussianDiffusion(build_latent_schedule("cosine"), "x0")
    normalizer = LatentNormalizer([0.0] * dim, [1.0] * dim)
    m = SimpleNamespace(denoiser=den, text=MaskedDiffusion(build_text_schedule("loglinear"), vocab), latent=latent,
                        normalizer=normalizer, tokenizer=SimpleNamespace(eot_id=0),
                        config=SimpleNamespace(data=SimpleNamespace(pad_to_length=None, max_length=None)))  # fmt: skip
    calls = []
    hook = den.register_forward_pre_hook(lambda mod, args: calls.append([a.clone() for a in args[:5]]))
    g = torch.Generator().manual_seed(33)
    texts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (5, 9, 2)]
    raw = torch.randn(3, dim, generator=g)
    try:
        sample_t2l(m, texts, num_steps=1, guidance_scale=1.0, seed=1)
        t2l_calls, calls[:] = list(calls), []
        sample_l2t(m, raw, length=6, num_steps=1, guidance_scale=1.0, block_size=None, temperature=1.0, seed=1)
    finally:
        hook.remove()
    (ids, attn, _, t_cond, _), (u_ids, u_attn, _, t_uncond, _) = t2l_calls[:2]
    assert (t_cond == 0).all() and (t_uncond == 1).all() and torch.equal(attn, u_attn)
    # eps = 0.5: t = 1 alone masks only half the tokens, so the dropped condition must be all <mask> by its own rule
    text = MaskedDiffusion(build_text_schedule("loglinear", eps=0.5), vocab)
    bt = {"input_ids": ids, "attention_mask": attn, "latent": raw}
    for p_uncond, want_ids, want_t in ((1.0, u_ids, t_uncond), (0.0, ids, t_cond)):
        obj = DiffusionObjective(text, latent, normalizer, p_uncond, 1.0, None, 7)
        c = obj.corrupt(bt, "t2l", step=0)
        assert (
            torch.equal(c.noisy_ids, want_ids) and torch.equal(c.t_text, want_t) and torch.equal(c.attention_mask, attn)
        )
    l2t_uncond = [a for a in calls if (a[4] == 1).all()]
    assert l2t_uncond, "sample_l2t made no unconditional pass"
    c = DiffusionObjective(text, latent, normalizer, 1.0, 1.0, None, 7).corrupt(bt, "l2t", step=0)
    assert torch.equal(c.t_latent, l2t_uncond[0][4]) and not c.latent_rows.any()
    alpha1 = float(latent.schedule.alpha_sigma(torch.ones(()))[0])
    assert float((c.z_t - c.eps).abs().max()) <= 2 * alpha1 * float(c.z0.abs().max() + c.eps.abs().max())


@pytest.mark.parametrize("weighting", ["uniform", "elbo"])
def test_pad_tokens_never_reach_the_loss(weighting):
    """The training loss counts no pad token: more padding, with other ids at every pad position, changes neither
    the corruption of the real tokens nor the loss nor its normaliser; the normaliser is the real tokens of the rows
    with a text loss (elbo) or their masked tokens (uniform)."""
    g = torch.Generator().manual_seed(35)
    bt = batch(g)
    real = bt["attention_mask"].bool()
    assert (~real).any()
    pad = 3
    attn2 = F.pad(bt["attention_mask"], (0, pad))
    ids2 = torch.where(attn2.bool(), F.pad(bt["input_ids"], (0, pad)), torch.randint(0, V, attn2.shape, generator=g))
    bt2 = {"input_ids": ids2, "attention_mask": attn2, "latent": bt["latent"]}
    den = TableDenoiser(g, ids2.shape[1])
    obj = objective(0.0, 9, weighting=weighting, p_uncond=0.3, max_length=16)  # the same uniforms for both widths
    c, c2 = obj.corrupt(bt, MIXED, step=3), obj.corrupt(bt2, MIXED, step=3)
    T = real.shape[1]
    assert torch.equal(c2.masked[:, :T], c.masked) and not c2.masked[~attn2.bool()].any()
    assert torch.equal(c2.noisy_ids[:, :T][real], c.noisy_ids[real])
    n_text = int((real & c.text_rows[:, None]).sum()) if weighting == "elbo" else int(c.masked.sum())
    assert int(c.counts(weighting)[0]) == int(c2.counts(weighting)[0]) == n_text
    loss, _ = obj.loss(den, c, c.counts(weighting))
    loss2, _ = obj.loss(den, c2, c2.counts(weighting))
    assert torch.equal(loss, loss2)
