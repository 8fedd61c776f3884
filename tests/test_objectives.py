"""objectives.py: the training corruption and loss, here the clean-prefix rows (``diffusion.clean_prefix``) that
train semi-autoregressive decoding; CPU, fresh random inputs, a table "denoiser" so the objective alone is tested."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rwkv_diffusion_rnn.continuous_diffusion import GaussianDiffusion, LatentNormalizer, build_latent_schedule
from rwkv_diffusion_rnn.diffusion_process import MaskedDiffusion, build_text_schedule
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserOutput
from rwkv_diffusion_rnn.objectives import L2T, T2L, DiffusionObjective

V, D = 11, 4  # real tokens 0..V-1, <mask> = V; latent dims


def objective(clean_prefix: float, seed: int, t2l_time_power: float = 1.0) -> DiffusionObjective:
    text = MaskedDiffusion(build_text_schedule("loglinear", eps=1e-3), V, "elbo")
    latent = GaussianDiffusion(build_latent_schedule("cosine"), "x0")
    return DiffusionObjective(text, latent, LatentNormalizer([0.0] * D, [1.0] * D), 0.1, 1.0, None, seed, False,
                              clean_prefix, t2l_time_power)  # fmt: skip


def batch(g: torch.Generator, b: int = 12, t: int = 9) -> dict[str, torch.Tensor]:
    lens = torch.randint(1, t + 1, (b,), generator=g)
    attn = (torch.arange(t)[None] < lens[:, None]).long()
    ids = torch.randint(0, V, (b, t), generator=g) * attn  # right padding with id 0
    return {"input_ids": ids, "attention_mask": attn, "latent": torch.randn(b, D, generator=g)}


class TableDenoiser(torch.nn.Module):
    """Logits from a random table of (input id, position) and the time fed at that position: the loss depends on
    everything the objective hands the model, and records what it was handed."""

    def __init__(self, g: torch.Generator, t: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V + 1, t, V, generator=g))
        self.seen: dict = {}

    def forward(self, noisy_ids, attention_mask, z_t, t_text, t_latent, text_select=None, text_targets=None):
        self.seen = {"noisy_ids": noisy_ids, "t_text": t_text}
        t_pos = t_text if t_text.dim() == 2 else t_text[:, None].expand_as(noisy_ids)
        logits = self.table[noisy_ids, torch.arange(noisy_ids.shape[1])[None]] * (1 + t_pos[..., None])  # [B, T, V]
        flat = logits.flatten(0, 1).index_select(0, text_select)
        return DenoiserOutput(logits, torch.zeros_like(z_t), flat)


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31, ()))


@pytest.mark.parametrize("modes", ["l2t", "unconditional", {"l2t": 1.0, "t2l": 1.0, "unconditional": 0.5}])
def test_clean_prefix_rows_are_clean_before_their_boundary_and_diffused_after(modes):
    seed = fresh_seed()
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


def test_clean_prefix_share_and_boundaries_are_uniform():
    seed = fresh_seed()
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


def test_clean_prefix_loss_is_the_suffix_elbo_and_ranks_split_the_global_batch():
    seed = fresh_seed()
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
    assert float(loss) == pytest.approx(float(want), rel=1e-5), seed
    loss.backward()
    assert den.table.grad is not None and torch.isfinite(den.table.grad).all(), seed
    # two ranks see exactly the rows of the one-process batch (draws are made for the global batch)
    halves = [obj.corrupt({k: v[r::2] for k, v in bt.items()}, "l2t", step=5, micro=1, rank=r, world=2) for r in (0, 1)]
    for r, h in enumerate(halves):
        assert torch.equal(h.t_text, c.t_text[r::2]) and torch.equal(h.masked, c.masked[r::2]), (seed, r)


def test_evaluation_corruption_ignores_clean_prefix():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    bt = batch(g)
    a = objective(1.0, seed).corrupt(bt, "l2t", step=1, salt=99991, clean_prefix=0.0)
    b = objective(0.0, seed).corrupt(bt, "l2t", step=1, salt=99991)
    assert torch.equal(a.t_text, b.t_text) and torch.equal(a.masked, b.masked) and a.text_positions is None
    assert (a.modes == L2T).all()


def test_t2l_time_power_moves_only_the_t2l_rows_latent_times_towards_one():
    seed = fresh_seed()
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
