"""The WKV operands as one hand-fused operator (models/wkv_inputs.py), in Triton's CPU interpreter (a subprocess),
against the plain region function ``tm_kernel_inputs_plain``: the four outputs and the gradients of all seven inputs."""

from __future__ import annotations

import json

import pytest
import torch

from rwkv_diffusion_rnn.models import wkv_inputs as mod
from rwkv_diffusion_rnn.models.rwkv7_regions import DECAY_SCALE, tm_kernel_inputs_plain
from tests.triton_interpreter import run_interpreted


def _case(dtype: torch.dtype, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, T, H = 2, 37, 2  # 74 rows: two whole programs of 32 and a masked tail; two heads
    C = H * mod.HEAD
    acts = [torch.randn(B, T, C, generator=g).to(dtype) for _ in range(3)]  # k, w_low, a_low
    acts[0][0, 3, : mod.HEAD] = 0.0  # one head of one token with a zero key: the normalisation's eps branch
    params = [0.5 * torch.randn(1, 1, C, generator=g) for _ in range(4)]  # w0, a0, k_k, k_a (fp32, as in the model)
    weights = [torch.randn(B, T, C, generator=g) for _ in range(4)]

    def run(fn):
        leaves = [x.clone().requires_grad_() for x in (*acts, *params)]
        outs = fn(*leaves)
        loss = sum((o.float() * wt).sum() for o, wt in zip(outs, weights, strict=True))
        grads = torch.autograd.grad(loss, leaves)
        return [o.detach().double() for o in outs], [x.double() for x in grads], [str(o.dtype) for o in outs]

    got, got_g, dtypes = run(lambda *xs: mod.wkv_inputs(*xs, DECAY_SCALE))
    ref, ref_g, _ = run(lambda *xs: tm_kernel_inputs_plain(*xs, H))
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    # the zero key's gradient is 1/eps times the others (F.normalize below eps): compared apart, so that it does
    # not hide the rest of dk
    eps_part = torch.zeros(B, T, C, dtype=torch.bool)
    eps_part[0, 3, : mod.HEAD] = True
    dk, dk_ref = got_g[0], ref_g[0]
    rest = [rel(a, b) for a, b in zip(got_g[1:], ref_g[1:], strict=True)]
    return {"out": [rel(a, b) for a, b in zip(got, ref, strict=True)],
            "grad": [rel(dk[~eps_part], dk_ref[~eps_part]), *rest],
            "grad_eps": rel(dk[eps_part], dk_ref[eps_part]), "eps_scale": float(dk_ref[eps_part].abs().max()),
            "dtypes": dtypes}  # fmt: skip


def _interpreter_body() -> None:
    from tests.triton_interpreter import fit_interpreter_to_numpy

    fit_interpreter_to_numpy()
    torch.manual_seed(0)
    print(json.dumps({"fp32": _case(torch.float32, 3), "bf16": _case(torch.bfloat16, 4)}))


def test_never_on_the_cpu():
    k = torch.randn(1, 3, 1024)
    assert not mod.applies(k, k, k, 16)


def test_by_default_on_cuda_from_the_measured_width(monkeypatch):
    """Unset, the switch serves widths from MIN_WIDTH on; "1" every width, "0" none (CUDA fake tensors: no GPU
    needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if mod.triton is None:
        pytest.skip("Triton is not installed")
    with FakeTensorMode():
        wide, narrow = (torch.empty(2, 3, c, device="cuda", dtype=torch.bfloat16) for c in (768, 512))
        wide_strided = torch.empty(2, 768, 3, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        cases = {None: (True, False), "1": (True, True), "0": (False, False)}
        for switch, (want_wide, want_narrow) in cases.items():
            monkeypatch.setattr(mod, "SWITCH", switch)
            assert mod.applies(wide, wide, wide, 12) is want_wide, switch
            assert mod.applies(narrow, narrow, narrow, 8) is want_narrow, switch
            assert not mod.applies(wide_strided, wide_strided, wide_strided, 12)  # not contiguous
            assert not mod.applies(wide, wide, wide, 6)  # head size 128


def test_the_operator_matches_the_region_in_the_interpreter():
    pytest.importorskip("triton")
    res = run_interpreted(__file__)
    f32, bf16 = res["fp32"], res["bf16"]
    assert f32["dtypes"] == ["torch.float32"] * 4
    assert bf16["dtypes"] == ["torch.float32", "torch.bfloat16", "torch.bfloat16", "torch.bfloat16"]
    assert max(f32["out"]) < 1e-6 and max(f32["grad"]) < 1e-5, f32
    assert f32["eps_scale"] > 1e9 and f32["grad_eps"] < 1e-6 and bf16["grad_eps"] < 2e-2  # the eps branch, apart
    # bf16: the gated key, -kk and kk * a rounded to bf16 (the interpreter's cast truncates), gradients through them
    assert max(bf16["out"]) < 1e-2 and max(bf16["grad"]) < 2e-2, bf16


if __name__ == "__main__":
    _interpreter_body()
