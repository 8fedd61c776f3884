"""The channel-mix FFN operator (models/ffn.py): its Triton matmuls in Triton's CPU interpreter (a subprocess)
against an fp64 reference and the unfused bf16 path, and where the model uses it."""

from __future__ import annotations

import json

import pytest
import torch

from rwkv_diffusion_rnn.models import ffn as mod
from rwkv_diffusion_rnn.models.rwkv7 import ChannelMix, RWKV7Config
from rwkv_diffusion_rnn.models.rwkv7_regions import cm_mix
from tests.triton_interpreter import run_interpreted


def _errors(dtype: torch.dtype, seed: int) -> dict:
    """Relative errors of the operator (and of the unfused path in the same dtype) against fp64: the output and the
    gradients of x, wk and wv. 200 rows: three whole tiles of 64 and a masked tail."""
    g = torch.Generator().manual_seed(seed)
    M, C = 200, 128  # two steps of the reduction (BLOCK_K 64)
    x = torch.randn(M, C, generator=g)
    x[:5] = 0.0  # rows where every key is zero: relu's kink and sqrt(0) in the backward
    wk = torch.randn(4 * C, C, generator=g) / C**0.5
    wv = torch.randn(C, 4 * C, generator=g) / (4 * C) ** 0.5
    dout = torch.randn(M, C, generator=g)

    def run(fn, cast):
        leaves = [t.to(cast).requires_grad_() for t in (x, wk, wv)]
        out = fn(*leaves)
        grads = torch.autograd.grad((out.double() * dout.double()).sum(), leaves)
        return [out.detach(), *grads], str(out.dtype), [str(t.dtype) for t in grads]

    ref, _, _ = run(mod.ffn_plain, torch.float64)
    got, dtype_out, dtype_grads = run(mod.ffn, dtype)
    base, _, _ = run(mod.ffn_plain, dtype)  # the unfused path: the same formula in the operator's dtype
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    return {
        "got": [rel(a, b) for a, b in zip(got, ref, strict=True)],
        "unfused": [rel(a, b) for a, b in zip(base, ref, strict=True)],
        "dtypes": [dtype_out, *dtype_grads],
        "kink_grad_x": float(got[1][:5].abs().max()),
    }


def _zero_fills() -> list:
    """The shapes the eager backward fills with zeros (aten::zero_), under the profiler."""
    from torch.profiler import profile

    g = torch.Generator().manual_seed(3)
    x, wk, wv = (torch.randn(*s, generator=g, requires_grad=True) for s in ((64, 64), (256, 64), (64, 256)))
    out = mod.ffn(x, wk, wv)
    with profile(record_shapes=True) as prof:
        out.sum().backward()
    return [e.input_shapes for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::zero_"]


def _interpreter_body() -> None:
    from tests.triton_interpreter import fit_interpreter_to_bf16, fit_interpreter_to_numpy

    fit_interpreter_to_numpy()
    fit_interpreter_to_bf16()
    mod.TILE = (64, 64, 1, 4)  # the interpreter has no autotuner: one small tile, so that M has a ragged tail
    r = {"fp32": _errors(torch.float32, 1), "bf16": _errors(torch.bfloat16, 2), "zero_fills": _zero_fills()}
    # the persistent TMA kernel: four programs over 4 x 8 tiles (key) and 4 x 2 (key gradient), a ragged tail;
    # then its output written in two halves
    mod.KERNEL, mod.TMA_TILE = "tma", {0: (64, 64, 1, 4, 0, 0), 1: (64, 64, 1, 4, 0, 0)}
    r["tma"] = {"fp32": _errors(torch.float32, 1), "bf16": _errors(torch.bfloat16, 2)}
    mod.TMA_TILE = {0: (64, 64, 1, 4, 0, 1), 1: (64, 64, 1, 4, 0, 1)}
    r["tma_split"] = {"fp32": _errors(torch.float32, 1), "bf16": _errors(torch.bfloat16, 2)}
    print(json.dumps(r))


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted(__file__)


def test_the_operator_equals_the_formula_in_fp32(interpreted):
    r = interpreted["fp32"]
    assert max(r["got"]) < 1e-5, r
    assert r["dtypes"] == ["torch.float32"] * 4


def test_in_bf16_the_operator_is_no_less_exact_than_the_unfused_path(interpreted):
    """Both round to bf16; the operator squares the fp32 sum and scales the fp32 gradient before rounding once, so
    it is closer (fewer roundings), never worse."""
    r = interpreted["bf16"]
    for got, base in zip(r["got"], r["unfused"], strict=True):
        assert got <= 1.05 * base, r
    assert max(r["got"]) < 2e-2, r
    assert r["dtypes"] == ["torch.bfloat16"] * 4


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_persistent_tma_kernel_gives_what_the_pointer_kernel_gives(interpreted, dtype):
    """The same products through TMA descriptors on a persistent grid, the output written whole or in two halves:
    the same errors against fp64, bit for bit (the same tiles summed in the same order)."""
    assert interpreted["tma"][dtype] == interpreted[dtype]
    assert interpreted["tma_split"][dtype] == interpreted[dtype]


def test_a_zero_key_passes_no_gradient(interpreted):
    """relu's kink at 0: the backward's 2 sqrt(y) is exactly zero there (no NaN from sqrt of a rounded square)."""
    assert interpreted["fp32"]["kink_grad_x"] == 0.0
    assert interpreted["bf16"]["kink_grad_x"] == 0.0


def test_the_eager_backward_fills_no_zeros_for_the_kept_output(interpreted):
    """``y`` is an output only to be kept; its gradient is never read, so eager autograd must not build a zero
    ``[M, 4C]`` tensor for it (a write of 64 MB a layer at 0.4B)."""
    assert interpreted["zero_fills"] == [], interpreted["zero_fills"]


H100_SHARED = 227 * 1024  # the most shared memory one block may ask for on an H100 or H200 (compute 9.0)


def _sm90_shared_bytes(epilogue: int) -> int:
    """Compile the persistent TMA kernel with its default tile for ``epilogue`` for compute capability 9.0 (no
    GPU needed: Triton's bundled ptxas) and return the shared memory a block needs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bm, bn, stages, warps, specialize, split = mod.TMA_TILE[epilogue]
    rows_n = epilogue == mod.RELU_SQ  # the key matmul reads the key weight as [N, K]; the gradient reads wv [K, N]
    out = f"tensordesc<bf16[{bm},{bn // 2 if split else bn}]>"
    b = f"tensordesc<bf16[{bn},{mod.BLOCK_K}]>" if rows_n else f"tensordesc<bf16[{mod.BLOCK_K},{bn}]>"
    consts = {"EPILOGUE": epilogue, "B_ROWS_N": rows_n, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": mod.BLOCK_K,
              "GROUP_M": 8, "PROGRAMS": 132, "WARP_SPECIALIZE": bool(specialize), "SPLIT": bool(split)}  # fmt: skip
    signature = {"a_desc": f"tensordesc<bf16[{bm},{mod.BLOCK_K}]>", "b_desc": b, "c_desc": out, "aux_desc": out,
                 "M": "i32", "N": "i32", "K": "i32", **dict.fromkeys(consts, "constexpr")}  # fmt: skip
    src = ASTSource(fn=mod._mm_tma_kernel, signature=signature, constexprs=consts)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    return kernel.metadata.shared


@pytest.mark.parametrize("epilogue", [0, 1])
def test_the_tma_kernels_default_tiles_fit_an_h100(epilogue):
    """The persistent kernel has no autotuner to skip a tile that does not fit: its default tiles, compiled for an
    H100, ask for no more shared memory than a block may have (whole, the gradient's tile would need 272 KB)."""
    pytest.importorskip("triton")
    assert _sm90_shared_bytes(epilogue) <= H100_SHARED


def test_never_on_the_cpu_nor_without_a_gradient():
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    wk = torch.randn(256, 64, dtype=torch.bfloat16)
    wv = torch.randn(64, 256, dtype=torch.bfloat16)
    assert not mod.applies(x, wk, wv)  # CPU


@pytest.mark.parametrize(
    "case",
    ["ok", "fp32", "mixed", "no_grad", "narrow", "shape", "empty"],
)
def test_applies_asks_for_cuda_16_bit_operands_a_gradient_and_whole_blocks(monkeypatch, case):
    """The checks after the device: a fake CUDA flag on CPU tensors (nothing runs)."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(mod, "USE_OP", True)
    c = 48 if case == "narrow" else 64
    dt = torch.float32 if case == "fp32" else torch.bfloat16
    x = torch.randn(0 if case == "empty" else 3, c, dtype=dt, requires_grad=case != "no_grad")
    wk = torch.randn(4 * c, c, dtype=torch.float32 if case == "mixed" else dt)
    wv = torch.randn(c, 4 * c + (64 if case == "shape" else 0), dtype=dt)
    assert mod.applies(x, wk, wv) == (case == "ok")


def _channel_mix(seed: int) -> ChannelMix:
    torch.manual_seed(seed)
    cm = ChannelMix(RWKV7Config(vocab_size=16, n_embd=64, n_layer=1, dim_ffn=256))
    for p in cm.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return cm


def test_the_channel_mix_hands_the_operator_its_weights_and_input(monkeypatch):
    """With the operator "applying" (its plain formula standing in), the channel mix gives what its modules give, in
    value and in every parameter's gradient: the operator gets the token-shifted input and the two weights."""
    calls = []

    def stand_in(x, wk, wv):
        calls.append((x.shape, wk.shape, wv.shape))
        return mod.ffn_plain(x, wk, wv)

    cm = _channel_mix(0)
    x = torch.randn(2, 5, 64)
    shift = torch.randn(2, 64)
    ref = cm(x, shift)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(cm.parameters()))
    monkeypatch.setattr(mod, "applies", lambda *a: True)
    monkeypatch.setattr(mod, "ffn", stand_in)
    out = cm(x, shift)
    grads = torch.autograd.grad(out.square().sum(), list(cm.parameters()))
    assert calls == [((2, 5, 64), (256, 64), (64, 256))]
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_a_hooked_linear_keeps_the_modules(monkeypatch):
    """A LoRA adapter hooks the key or value module: the operator would skip the hook, so the modules run."""
    monkeypatch.setattr(mod, "applies", lambda *a: True)
    monkeypatch.setattr(mod, "ffn", lambda *a: pytest.fail("the operator ran past a hook"))
    cm = _channel_mix(1)
    cm.value.register_forward_hook(lambda mod_, args, out: out + 1.0)
    x, shift = torch.randn(1, 3, 64), torch.randn(1, 64)
    assert torch.allclose(cm(x, shift), cm.value(torch.relu(cm.key(cm_mix(x, shift, cm.x_k))) ** 2))


if __name__ == "__main__":
    _interpreter_body()
