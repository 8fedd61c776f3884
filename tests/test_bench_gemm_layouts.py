"""bench/gemm_layouts.py: every layout it times computes the same product (CPU, fp32, small sizes)."""

import torch

from bench.gemm_layouts import variants


def test_every_layout_computes_the_same_gemm():
    gen = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(*s, generator=gen) for s in ((48, 16), (24, 16), (48, 24)))
    want = {"fwd": x @ w.t(), "dgrad": dy @ w, "wgrad": dy.t() @ x}
    checked = 0
    for name, fn in variants(x, w, dy).items():
        if "into fp32" in name:  # accumulates into a buffer: checked once below
            continue
        try:
            got = fn()
        except (RuntimeError, TypeError):  # out_dtype where this torch or device lacks it
            continue
        torch.testing.assert_close(got.float(), want[name.split()[0]], rtol=1e-5, atol=1e-5, msg=name)
        checked += 1
    assert checked >= 9
    v = variants(x, w, dy)
    v["wgrad then add into fp32"]()
    torch.testing.assert_close(v["wgrad then add into fp32"](), 2 * want["wgrad"], rtol=1e-5, atol=1e-5)  # twice
    try:  # addmm into a zero buffer (out of place): the product itself, where this torch has out_dtype
        torch.testing.assert_close(v["wgrad addmm into fp32"](), want["wgrad"], rtol=1e-5, atol=1e-5)
    except (RuntimeError, TypeError) as e:
        assert "out_dtype" in str(e) or "dtype" in str(e), e
