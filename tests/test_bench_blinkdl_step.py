"""bench/blinkdl_step.py without a GPU: argument checks, the dry run, his module run without building (a stand-in
source folder here; his own train_temp copy where one lies in the git-ignored bench/_external/blinkdl-src), and his
step's plumbing on the CPU with his CUDA kernels stood in for by plain PyTorch."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import blinkdl_step as bs  # noqa: E402

HIS = REPO / "bench" / "_external" / "blinkdl-src"

MINI_MODEL = """
import os
import torch
from torch.utils.cpp_extension import load
import pytorch_lightning as pl
HEAD_SIZE = int(os.environ["RWKV_HEAD_SIZE"])
if "@rwkv3" in os.environ["RWKV_KERNEL"]:
    load(name="wkv_v3", sources=["cuda/wkv_v3.cu", "cuda/wkv_v3.cpp"], is_python_module=False)
else:
    load(name="wkv", sources=["cuda/rwkv7_clampw.cu", "cuda/rwkv7_clampw.cpp"], is_python_module=False)
EXT = load(name="ce", sources=["cuda/ce.cpp", "cuda/ce.cu"], verbose=True)
torch.library.register_autograd("ce::forward", lambda ctx, g: g)

class RWKV(pl.LightningModule):
    pass
"""


@pytest.fixture
def mini_src(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "cuda").mkdir()
    (tmp_path / "src" / "model.py").write_text(MINI_MODEL)
    for f in ("wkv_v3.cu", "wkv_v3.cpp", "ce.cpp", "ce.cu"):
        (tmp_path / "cuda" / f).write_text("// stand-in\n")
    return tmp_path


@pytest.fixture
def his_env(monkeypatch):
    """His environment variables and the Lightning stubs, undone after the test."""

    def apply(a):
        for k, v in bs.his_env(a).items():
            monkeypatch.setenv(k, v)
        for name in ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.strategies"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        return bs.stub_lightning()

    yield apply
    for name in ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.strategies"):
        sys.modules.pop(name, None)


def test_dry_run_prints_the_plan(mini_src, capsys):
    assert bs.main(["--src", str(mini_src), "--shape", "0.4b", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["layers"], plan["width"], plan["vocab"], plan["tokens_per_step"]) == (24, 1024, 65536, 16 * 512)
    assert plan["env"]["RWKV_JIT_ON"] == "1" and plan["env"]["RWKV_MY_TESTING"] == "x070"
    assert plan["env"]["RWKV_CTXLEN"] == "512" and plan["env"]["RWKV_HEAD_SIZE"] == "64"
    # the @rwkv3 kernel's files, not the other variant's
    assert plan["cuda_sources"] == ["cuda/ce.cpp", "cuda/ce.cu", "cuda/wkv_v3.cpp", "cuda/wkv_v3.cu"]


def test_bad_arguments_are_one_line(mini_src, tmp_path, capsys):
    cases = {
        ("--shape", "7b"): "--shape 7b",
        ("--length", "500"): "--length 500",
        ("--kernel", "@rwkv9"): "--kernel '@rwkv9'",
        ("--jit", "2"): "--jit 2",
        ("--batch", "0"): "--batch",
    }
    for extra, start in cases.items():
        assert bs.main(["--src", str(mini_src), "--dry-run", *extra]) == 2
        out = capsys.readouterr().out.strip()
        assert out.count("\n") == 0 and out.startswith(start), out
    assert bs.main(["--src", str(tmp_path / "none"), "--dry-run"]) == 2
    assert "no src/model.py" in capsys.readouterr().out
    (mini_src / "cuda" / "ce.cu").unlink()
    assert bs.main(["--src", str(mini_src), "--dry-run"]) == 2
    assert capsys.readouterr().out.strip().endswith("cuda/ce.cu is missing (his model builds it)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without a GPU")
def test_without_a_gpu_only_the_dry_run_runs(mini_src, capsys):
    assert bs.main(["--src", str(mini_src)]) == 2
    assert "need a CUDA GPU" in capsys.readouterr().out


def test_his_module_runs_without_building(mini_src, his_env):
    a = bs.build_parser().parse_args(["--src", str(mini_src)])
    assert his_env(a) == "stub"
    module, calls = bs.exec_without_building(mini_src)
    assert module is not None and issubclass(module.RWKV, torch.nn.Module)
    assert [c["name"] for c in calls] == ["wkv_v3", "ce"]
    assert sorted(f for c in calls for f in c["sources"]) == bs.cuda_sources(MINI_MODEL, a)
    # what was stood in for is back
    from torch.utils import cpp_extension

    assert cpp_extension.load.__module__ == "torch.utils.cpp_extension"


# ---------------------------------------------------------------------------------------------- his own source


# His fused CUDA kernels stood in for by plain PyTorch with the same shapes (the plumbing, not his numbers); plain
# module-level functions, so that TorchScript (RWKV_JIT_ON=1) compiles them into his scripted time mixing.


def _shift(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, [0, 0, 1, -1]) - x


def _mix6(
    x: torch.Tensor, x_r: torch.Tensor, x_w: torch.Tensor, x_k: torch.Tensor, x_v: torch.Tensor, x_a: torch.Tensor,
    x_g: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    xx = _shift(x)
    return x + xx * x_r, x + xx * x_w, x + xx * x_k, x + xx * x_v, x + xx * x_a, x + xx * x_g


def _vres(v: torch.Tensor, v_first: torch.Tensor, v0: torch.Tensor, v12: torch.Tensor) -> torch.Tensor:
    return v + (v_first - v) * torch.sigmoid(v0 + v12)


def _a_gate(a0: torch.Tensor, a12: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(a0 + a12)


def _kk_pre(
    k: torch.Tensor, k_k: torch.Tensor, a: torch.Tensor, k_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, C = k.shape
    kk = F.normalize((k * k_k).view(B, T, C // 64, 64), dim=-1).view(B, T, C)
    return k * (1 + (a - 1) * k_a), -kk, kk * a


def _wkv(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    return v * torch.sigmoid(r + w + k + a + b)


def _lnx(
    x: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r_k: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, g: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    return x * g


class _Cmix:
    @staticmethod
    def apply(x, x_k, key, value):
        return torch.relu((x + _shift(x) * x_k) @ key.t()).square() @ value.t()


def _pytorch_stand_ins(module) -> None:
    module.tmix_mix6_bf16_v5 = _mix6
    module.tmix_vres_gate_bf16_v3 = _vres
    module.tmix_a_gate_bf16 = _a_gate
    module.tmix_kk_pre_bf16_v5 = _kk_pre
    module.RWKV7_CLAMPW_CUDA = _wkv
    module.tmix_lnx_rkvres_xg_bf16_v1 = _lnx
    module._CmixLayerV2Fn = _Cmix
    module.l2wrap_cross_entropy = lambda logits, targets: F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten()
    )


@pytest.mark.skipif(not (HIS / "src" / "model.py").is_file(), reason="needs his train_temp copy in bench/_external")
@pytest.mark.parametrize("jit", [0, 1])
def test_his_model_builds_and_steps_with_stand_in_kernels(his_env, jit):
    """His real model.py: the constructor takes our args, every cuda/ file it builds is named, and our step (his
    training_step, backward, clipping, fused AdamW) runs and lowers the loss on one repeated batch."""
    torch.manual_seed(0)
    a = bs.build_parser().parse_args(["--src", str(HIS), "--shape", "tiny", "--batch", "2", "--length", "32",
                                      "--jit", str(jit), "--init", "plain", "--lr", "1e-2"])  # fmt: skip
    his_env(a)
    assert os.environ["RWKV_JIT_ON"] == str(jit)
    module, calls = bs.exec_without_building(HIS)
    assert module is not None
    assert sorted(f for c in calls for f in c["sources"]) == bs.cuda_sources((HIS / "src" / "model.py").read_text(), a)
    _pytorch_stand_ins(module)
    step, n_params = bs.build_step(module, a, bs.SHAPES["tiny"], torch.device("cpu"))
    L, D, V = bs.SHAPES["tiny"]
    assert n_params > 2 * V * D + L * 12 * D * D
    if jit:  # his time mixing compiled by TorchScript, around the stand-ins
        assert issubclass(module.RWKV_Tmix_x070, torch.jit.ScriptModule)
    losses = [float(step()) for _ in range(4)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
