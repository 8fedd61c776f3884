"""What torch.compile believes each fused Triton kernel writes (models/tiles.py says why it matters): its outputs and
nothing else. torch's own analysis (``identify_accessed_tensors``) reads the kernel's IR, which Triton builds on the
CPU for a GPU target; only the target query is answered here, no kernel is compiled or run. An input it counted as
written would be copied around every launch of the compiled step, or refused by the partitioner."""

from __future__ import annotations

import inspect

import pytest
import torch

triton = pytest.importorskip("triton")
wrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")

from rwkv_diffusion_rnn.models import sq_relu, wkv_inputs  # noqa: E402

# kernel -> the pointer arguments it stores to (the reference: read off each kernel's tl.store calls)
WRITES = {
    (wkv_inputs, "_fwd_kernel"): {"w_ptr", "kp_ptr", "nkk_ptr", "kka_ptr"},
    (wkv_inputs, "_bwd_kernel"): {"dk_ptr", "dwl_ptr", "dal_ptr", "part_ptr"},
    (sq_relu, "_sq_relu_kernel"): {"y_ptr"},
}


class _Hopper:
    """Answers Triton's target query as an H100 would; the IR the analysis reads does not depend on it further."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@pytest.fixture
def gpu_target():
    triton.runtime.driver.set_active(_Hopper())
    try:
        yield
    finally:
        triton.runtime.driver._active = None  # the default again on the next use (no driver is made here)


def _arguments(kernel) -> dict:
    """Every parameter of the kernel: a small fp32 tensor for each pointer, the tile sizes and flags as constants."""
    constants = {"ROWS": 32, "HEAD": 64, "BLOCK": 64, "EPS": 1e-5, "SCALE": 0.6}
    args = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name.endswith("_ptr"):
            args[name] = torch.zeros(64, 64)
        else:
            args[name] = constants.get(name, 64)
    return args


def test_every_kernel_has_its_expected_entry():
    found = {(m, n) for m in (wkv_inputs, sq_relu) for n, v in vars(m).items()
             if isinstance(v, triton.runtime.jit.JITFunction) and n.endswith("kernel")}  # fmt: skip
    assert found == set(WRITES)


@pytest.mark.parametrize("key", list(WRITES), ids=[f"{m.__name__.rsplit('.', 1)[-1]}.{n}" for m, n in WRITES])
def test_torch_compile_sees_only_the_outputs_written(gpu_target, key):
    module, name = key
    kernel = getattr(module, name)
    accesses = wrap.identify_accessed_tensors(kernel, _arguments(kernel), {})
    written = {dep.name for dep in accesses.read_writes.writes}
    assert written == WRITES[key]
