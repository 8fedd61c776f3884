"""AdamW groups, unfreezing, the LR schedule, the EMA and gradient clipping (rwkv_diffusion_rnn/optimizer.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config
from rwkv_diffusion_rnn.optimizer import (
    EMA,
    RWKV7_BLINKDL_NO_DECAY,
    add_params,
    build_optimizer,
    build_scheduler,
    clip_and_check_grads,
    clip_grads_on_device,
    fold_clip_into,
    group_sizes,
    load_optimizer_state,
    warmup_cosine_lambda,
)

V, C = 32, 16


class Toy(nn.Module):
    """A frozen 'backbone' plus the kinds of trainable tensors the denoiser has (embedding, FiLM, head, mask row)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.ModuleDict({"emb": nn.Embedding(V, C), "proj": nn.Linear(C, C), "ln": nn.LayerNorm(C)})
        self.backbone.requires_grad_(False)
        self.tok = nn.Embedding(V, C)
        self.mix = nn.Parameter(torch.randn(1, 1, C))  # a per-channel vector stored as [1, 1, C]
        self.film = nn.Linear(C, 2 * C)
        self.head = nn.Linear(C, V)
        self.mask_row = nn.Parameter(torch.randn(1, C))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.backbone["emb"](ids) + self.tok(ids) + self.mask_row
        h = self.backbone["ln"](self.backbone["proj"](h)) * (1 + self.mix)
        scale, shift = self.film(h).chunk(2, dim=-1)
        return self.head(h * (1 + scale) + shift)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, V, (4, 6), generator=g), torch.randint(0, V, (4, 6), generator=g)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    ids, tgt = batch(step)
    loss = F.cross_entropy(model(ids).flatten(0, 1), tgt.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def names_in(opt: torch.optim.Optimizer) -> dict[str, list[str]]:
    return {g["group"]: list(g["param_names"]) for g in opt.param_groups}


def test_frozen_backbone_never_enters_the_optimizer() -> None:
    model = Toy()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_opt == trainable
    assert not any(id(p) in in_opt for p in model.backbone.parameters())
    assert not any(n.startswith("backbone.") for ns in names_in(opt).values() for n in ns)
    frozen = {n: p.clone() for n, p in model.backbone.named_parameters()}
    for s in range(5):
        train_step(model, opt, s)
    for n, p in model.backbone.named_parameters():
        assert torch.equal(p, frozen[n]), n
    assert all(g["fused"] for g in opt.param_groups)  # one device kind: fused (it can skip a step on the device)


def test_decay_groups_and_order() -> None:
    model = Toy()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    groups = names_in(opt)
    # Matrices decay; the embedding, biases, the [1, 1, C] vector and the [1, C] row do not.
    assert groups == {
        "decay": ["film.weight", "head.weight"],
        "no_decay": ["film.bias", "head.bias", "mask_row", "mix", "tok.weight"],
    }
    wd = {g["group"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"decay": 0.1, "no_decay": 0.0}
    assert [g["group"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert group_sizes(opt)["decay"] == {"tensors": 2, "elements": 2 * C * C + V * C}
    patterned = build_optimizer(model, lr=1e-3, weight_decay=0.1, no_decay_patterns=("head.*",))
    assert names_in(patterned)["decay"] == ["film.weight"]


def test_rwkv7_groups_with_blinkdl_patterns() -> None:
    model = RWKV7(RWKV7Config.for_shape(2, 64, 128))
    default = names_in(build_optimizer(model, lr=1e-3, weight_decay=0.1))
    assert "blocks.0.att.receptance.weight" in default["decay"] and "blocks.1.att.w1" in default["decay"]
    assert {"emb.weight", "blocks.0.att.x_r", "blocks.0.att.w0", "blocks.1.ln1.bias"} <= set(default["no_decay"])
    blink = names_in(build_optimizer(model, lr=1e-3, weight_decay=0.1, no_decay_patterns=RWKV7_BLINKDL_NO_DECAY))
    assert {"blocks.1.att.w1", "blocks.0.att.g2", "blocks.0.att.a1"} <= set(blink["no_decay"])
    assert {"head.weight", "blocks.1.ffn.key.weight", "blocks.0.att.output.weight"} <= set(blink["decay"])
    assert not any(n.endswith(("att.w1", "att.r_k")) for n in blink["decay"])


def test_bad_arguments_are_one_line_errors() -> None:
    model = Toy()
    model.requires_grad_(False)
    with pytest.raises(DiffRwkvError, match="no trainable parameter"):
        build_optimizer(model, lr=1e-3)
    with pytest.raises(DiffRwkvError, match="lr > 0"):
        build_optimizer(Toy(), lr=0.0)
    opt = build_optimizer(Toy(), lr=1e-3)
    with pytest.raises(DiffRwkvError, match="no parameter named 'nope'"):
        add_params(opt, Toy(), ["nope"])
    with pytest.raises(DiffRwkvError, match="is frozen"):
        add_params(opt, Toy(), ["backbone.proj.weight"])


def test_unfrozen_params_join_with_the_right_settings_and_resume_exactly() -> None:
    model = Toy()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    sched = build_scheduler(opt, 2, 20)
    for s in range(3):
        train_step(model, opt, s)
        sched.step()
    model.backbone["proj"].requires_grad_(True)
    assert add_params(opt, model) == ["backbone.proj.bias", "backbone.proj.weight"]
    assert add_params(opt, model) == []  # idempotent
    groups = names_in(opt)
    assert "backbone.proj.weight" in groups["decay"] and "backbone.proj.bias" in groups["no_decay"]
    assert all(ns == sorted(ns) for ns in groups.values())
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    # LambdaLR's per-group base LRs still fit: no group was added.
    assert len(sched.base_lrs) == len(opt.param_groups)
    before = model.backbone["proj"].weight.detach().clone()
    for s in range(3, 5):
        train_step(model, opt, s)
    assert not torch.equal(before, model.backbone["proj"].weight)

    # A resumed run builds its optimizer from the currently trainable parameters: same order, state loads exactly.
    resumed = copy.deepcopy(model)
    opt2 = build_optimizer(resumed, lr=1e-2, weight_decay=0.1)
    assert names_in(opt2) == names_in(opt)
    load_optimizer_state(opt2, copy.deepcopy(opt.state_dict()))
    for s in range(5, 8):
        train_step(model, opt, s)
        train_step(resumed, opt2, s)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), n


def test_load_optimizer_state_refuses_another_model_and_loads_nothing() -> None:
    model = Toy()
    opt = build_optimizer(model, lr=1e-2)
    train_step(model, opt, 0)
    state = opt.state_dict()

    other = Toy()
    other.backbone["proj"].requires_grad_(True)
    opt_other = build_optimizer(other, lr=1e-2)
    with pytest.raises(DiffRwkvError, match="backbone.proj") as err:
        load_optimizer_state(opt_other, state, where="ckpt/optimizer.pt")
    assert "\n" not in str(err.value) and str(err.value).startswith("ckpt/optimizer.pt")
    assert len(opt_other.state) == 0

    fresh = build_optimizer(Toy(), lr=1e-2)
    bad = copy.deepcopy(state)
    idx = fresh.param_groups[0]["param_names"].index("head.weight")  # the decay group comes first: global index
    bad["state"][idx]["exp_avg"] = torch.zeros(3, 3)
    with pytest.raises(DiffRwkvError, match="'exp_avg' of 'head.weight' has shape"):
        load_optimizer_state(fresh, bad)
    assert len(fresh.state) == 0


def test_schedule_values() -> None:
    f = warmup_cosine_lambda(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1)  # first step: 1 / warmup
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)  # warmup end
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half-way through the cosine: (1 + min) / 2
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(110) == pytest.approx(0.1) and f(10_000) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert warmup_cosine_lambda(0, 10, 0.0)(0) == pytest.approx(1.0)
    for bad in ((-1, 10, 0.1), (20, 10, 0.1), (0, 0, 0.1), (0, 10, 1.5)):
        with pytest.raises(DiffRwkvError):
            warmup_cosine_lambda(*bad)

    opt = build_optimizer(Toy(), lr=2e-3)
    sched = build_scheduler(opt, warmup_steps=4, total_steps=12, min_lr_ratio=0.25)
    seen = []
    for _ in range(14):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    g = warmup_cosine_lambda(4, 12, 0.25)
    assert seen == pytest.approx([2e-3 * g(s) for s in range(14)])
    assert all(grp["lr"] == pytest.approx(2e-3 * 0.25) for grp in opt.param_groups)


def test_ema_matches_a_hand_computation_and_tracks_trainable_only() -> None:
    model = Toy()
    ema = EMA(model, decay=0.9, warmup=True)
    assert set(ema.shadow) == {n for n, p in model.named_parameters() if p.requires_grad}
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = build_optimizer(model, lr=0.05)
    for k in range(4):
        train_step(model, opt, k)
        d = min(0.9, (1 + k) / (10 + k))  # 0.1, 0.1818, 0.25, 0.3077
        for n, p in model.named_parameters():
            if p.requires_grad:
                ref[n] = d * ref[n] + (1 - d) * p.detach().double()
        ema.update(model)
    assert ema.num_updates == 4
    for n, s in ema.shadow.items():
        assert s.dtype == torch.float32
        torch.testing.assert_close(s.double(), ref[n], rtol=1e-6, atol=1e-7)
        assert not torch.equal(s, dict(model.named_parameters())[n])

    plain = EMA(model, decay=0.5, warmup=False)
    start = {n: s.clone() for n, s in plain.shadow.items()}
    with torch.no_grad():
        model.head.weight.add_(1.0)
    plain.update(model)
    torch.testing.assert_close(plain.shadow["head.weight"], 0.5 * start["head.weight"] + 0.5 * model.head.weight)


def test_ema_swapped_restores_bitwise_even_on_error() -> None:
    model = Toy()
    ema = EMA(model, decay=0.9)
    opt = build_optimizer(model, lr=0.05)
    for k in range(3):
        train_step(model, opt, k)
        ema.update(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped(model) as m:
        for n, p in m.named_parameters():
            expected = ema.shadow[n] if n in ema.shadow else before[n]
            assert torch.equal(p, expected), n
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(RuntimeError, match="boom"), ema.swapped(model):
        raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    ema.copy_to(model)
    assert torch.equal(model.head.weight, ema.shadow["head.weight"])


def test_ema_state_dict_round_trip_and_mismatch() -> None:
    model = Toy()
    ema = EMA(model, decay=0.99)
    ema.update(model)
    other = EMA(Toy(seed=1), decay=0.5, warmup=False)
    other.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert other.num_updates == 1 and other.decay == 0.99 and other.warmup is True
    assert all(torch.equal(other.shadow[n], s) for n, s in ema.shadow.items())
    unfrozen = Toy()
    unfrozen.backbone["proj"].requires_grad_(True)
    with pytest.raises(DiffRwkvError, match="backbone.proj.bias"):
        EMA(unfrozen).load_state_dict(ema.state_dict())
    # Unfreezing later: the EMA starts averaging the new tensors from their current value.
    model.backbone["proj"].requires_grad_(True)
    assert ema.add_params(model) == ["backbone.proj.bias", "backbone.proj.weight"]
    assert torch.equal(ema.shadow["backbone.proj.weight"], model.backbone["proj"].weight)


def _grads(seed: int) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(s)) for s in ((5, 7), (11,), (3, 2, 4))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params + [nn.Parameter(torch.zeros(2))]  # one without a gradient


def test_clip_and_check_grads_matches_torch_reference() -> None:
    params, ref = _grads(0), _grads(0)
    ref_norm = torch.nn.utils.clip_grad_norm_([p for p in ref if p.grad is not None], max_norm=1.0)
    norm, finite = clip_and_check_grads(params, max_norm=1.0)
    assert finite and norm == pytest.approx(float(ref_norm), rel=1e-6)
    assert norm > 1.0
    for p, r in zip(params[:3], ref[:3], strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=0)
    total = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params[:3]))
    assert float(total) == pytest.approx(1.0, rel=1e-5)

    untouched = _grads(1)
    copies = [p.grad.clone() for p in untouched[:3]]
    norm, finite = clip_and_check_grads(untouched, max_norm=1e6)  # below the limit: not scaled at all
    assert finite and all(torch.equal(p.grad, c) for p, c in zip(untouched, copies, strict=False))
    clip_and_check_grads(untouched, max_norm=0.0)  # 0: measure only
    assert all(torch.equal(p.grad, c) for p, c in zip(untouched, copies, strict=False))


def test_the_norm_of_mixed_dtype_gradients_runs_one_dtype_a_list(monkeypatch) -> None:
    """bf16 and fp32 gradients (master weights) are measured in one multi-tensor call per dtype (a mixed list leaves
    torch's fast kernel for a reduction per tensor), and the norm is the fp64 one of the values."""
    gen = torch.Generator().manual_seed(0)
    kinds = ((5, torch.bfloat16), (7, torch.float32), (3, torch.bfloat16), (4, torch.float32))
    params = [nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in kinds]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    calls = []
    original = torch._foreach_norm

    def spy(tensors, *args, **kwargs):
        calls.append({t.dtype for t in tensors})
        return original(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", spy)
    norm, finite = clip_and_check_grads(params, max_norm=0.0)
    assert sorted(map(sorted, calls), key=str) == sorted([[torch.bfloat16], [torch.float32]], key=str)
    want = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
    assert finite and norm == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("max_norm", [1.0, 1e6])
def test_clipping_folded_into_a_fused_adamw_step_equals_clipping_the_gradients(max_norm: float) -> None:
    """With a fused AdamW the clipping factor goes to its grad_scale (one pass over the gradients fewer): the step
    equals clipping the gradients first and stepping, to the rounding of dividing instead of multiplying."""
    steps = {}
    for fold in (True, False, None):  # None: no clipping at all, the control
        params = [p for p in _grads(4) if p.grad is not None]
        opt = torch.optim.AdamW(params, lr=0.1, eps=1.0, fused=True)  # eps 1: the step's size follows the gradient's
        if fold is None:
            opt.step()
            steps[fold] = [p.detach().clone() for p in params]
            continue
        grads = [p.grad.clone() for p in params]
        norm, finite = clip_grads_on_device(params, max_norm, optimizer=opt if fold else None)
        assert bool(finite) and float(norm) > 1.0
        if fold:  # the gradients are left as they are; the factor waits on the optimizer
            assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))
            assert float(opt.grad_scale) == pytest.approx(max(float(norm) / max_norm, 1.0), rel=1e-5)
        opt.step()
        opt.__dict__.pop("grad_scale", None)
        steps[fold] = [p.detach().clone() for p in params]
    for a, b in zip(steps[True], steps[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    clipped = max_norm < 1e3
    pairs = zip(steps[True], steps[None], strict=True)
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in pairs) == clipped
    unfused = [p for p in _grads(4) if p.grad is not None]
    assert not fold_clip_into(torch.optim.AdamW(unfused, lr=0.1, foreach=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_grads_are_reported_and_left_alone(bad: float) -> None:
    params = _grads(2)
    params[1].grad[3] = bad
    copies = [p.grad.clone() for p in params[:3]]
    norm, finite = clip_and_check_grads(params, max_norm=1.0)
    assert not finite and not math.isfinite(norm)
    for p, c in zip(params, copies, strict=False):
        assert torch.equal(p.grad.nan_to_num(), c.nan_to_num())
    assert clip_and_check_grads([nn.Parameter(torch.zeros(3))], 1.0) == (0.0, True)


def test_clip_and_check_grads_also_checks_an_extra_tensor_in_the_same_sync() -> None:
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    norm, finite = clip_and_check_grads([p], max_norm=0.0, also_finite=torch.tensor([1.0, 2.0]))
    assert finite and abs(norm - float(p.grad.norm())) < 1e-5
    norm2, finite = clip_and_check_grads([p], max_norm=0.0, also_finite=torch.tensor([1.0, float("nan")]))
    assert not finite and norm2 == norm  # the gradients are fine; the loss sums are not
    assert clip_and_check_grads([], 1.0, also_finite=torch.tensor([float("inf")])) == (0.0, False)


def test_clipping_takes_the_optimizers_own_norm_only_for_its_own_gradients() -> None:
    """An optimizer with ``grad_norm`` (the flat AdamW's one-launch kernel) gives the norm when the clipped
    gradients are exactly its parameters'; for any other set, or where it returns None, torch's norm is taken."""

    gen = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(5, generator=gen)), nn.Parameter(torch.randn(3, generator=gen))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)

    class Own(torch.optim.SGD):
        answer: torch.Tensor | None = torch.tensor(123.0)
        calls = 0

        def grad_norm(self):
            Own.calls += 1
            return self.answer

        def module_params(self):
            return ps

    opt = Own(ps, lr=0.1)
    total, finite = clip_grads_on_device(ps, 0.0, optimizer=opt)
    assert float(total) == 123.0 and bool(finite) and Own.calls == 1
    total, _ = clip_grads_on_device(ps[:1], 0.0, optimizer=opt)  # not the optimizer's set: torch's norm
    assert float(total) == pytest.approx(float(ps[0].grad.norm()), rel=1e-6) and Own.calls == 1
    opt.answer = None  # its torch path: no kernel
    total, _ = clip_grads_on_device(ps, 0.0, optimizer=opt)
    want = float(torch.cat([p.grad for p in ps]).norm())
    assert float(total) == pytest.approx(want, rel=1e-6) and Own.calls == 2
