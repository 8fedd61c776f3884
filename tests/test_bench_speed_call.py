"""bench/speed_call.sh without a GPU: it parses, a stage past the call's time budget is skipped (saying so), and the
summary puts BlinkDL's step (wall and kernel-bound) beside our rows from the stages' result files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "speed_call.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(out, **env):
    full = {**os.environ, "OUT": str(out), "NOSAVE": "1", **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=full, capture_output=True, text=True, timeout=120)


def stages(out) -> str:
    """stages.txt, as the call packs it into results.tgz (only summary.md stays beside the archive)."""
    with tarfile.open(out / "results.tgz") as tar:
        return tar.extractfile("./stages.txt").read().decode()


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_a_stage_without_time_left_is_skipped(tmp_path):
    res = run(tmp_path, STAGES="host,nosuch", LIMIT="30", RESERVE="25")
    assert res.returncode == 0, res.stderr[-2000:]
    text = stages(tmp_path)
    assert "host: skipped" in text and "unknown stage nosuch" in text


def test_summary_sets_his_step_beside_ours(tmp_path):
    his = {"env": {"RWKV_JIT_ON": "1"}, "tokens_per_s": 140000.0, "tokens_per_s_run": 141000.0,
           "tokens_per_s_kernel_bound": 180000.0, "gpu_kernel_ms_per_step": 45.5, "kernels_per_step": 1500,
           "first_loss": 11.1, "peak_mem_gib": 8.71, "status": "ok"}  # fmt: skip
    (tmp_path / "blinkdl_0.1b.json").write_text(json.dumps(his))
    ours = {"batch": 16, "length": 512, "rows": [
        {"shape": "0.1b", "row": "rwkv7-lm", "status": "ok", "tokens_per_s": 150000.0, "tokens_per_s_run": 160000.0,
         "first_loss": 11.05, "notes": {"wkv_backend": "cuda"}, "peak_mem_gib": 6.93,
         "profile": {"gpu_kernel_ms_per_step": 40.96, "kernels_per_step": 900}},
        {"shape": "0.4b", "row": "denoiser-causal-full", "status": "OOM"}]}  # fmt: skip
    (tmp_path / "tp_cuda").mkdir()
    (tmp_path / "tp_cuda" / "results.json").write_text(json.dumps(ours))
    res = run(tmp_path, STAGES="")
    assert res.returncode == 0, res.stderr[-2000:]
    md = (tmp_path / "summary.md").read_text()
    his_row = "| 0.1b | BlinkDL train_temp (jit 1) | 140,000 | 141,000 | 180,000 | 45.5 | 1,500 | 11.1000 | 8.7 | ok |"
    assert his_row in md
    assert (
        "| 0.1b | rwkv7-lm (cuda) | 150,000 | 160,000 | 200,000 | 41.0 | 900 | 11.0500 | 6.9 | ok |" in md
    )  # 8192 / 40.96 ms
    assert "| 0.4b | denoiser-causal-full (-) | - | - | - | - | - | - | - | OOM |" in md


def test_an_ab_stage_is_labelled_with_its_settings(tmp_path):
    """``ab:LABEL`` rows (settings from AB_LABEL) come out in the summary under their label and settings."""
    (tmp_path / "tp_ab_big").mkdir()
    row = {"shape": "0.4b", "row": "rwkv7-lm", "status": "ok", "tokens_per_s": 70000.0,
           "notes": {"wkv_backend": "cuda"}}  # fmt: skip
    (tmp_path / "tp_ab_big" / "results.json").write_text(json.dumps({"batch": 16, "length": 512, "rows": [row]}))
    (tmp_path / "tp_ab_big" / "spec.txt").write_text("X=1 budget=1.0 (budget 1.0)\n")
    res = run(tmp_path, STAGES="")
    assert res.returncode == 0, res.stderr[-2000:]
    md = (tmp_path / "summary.md").read_text()
    assert "| 0.4b | rwkv7-lm (cuda), big: X=1 budget=1.0 (budget 1.0) | 70,000 |" in md
    skipped = run(tmp_path / "s", STAGES="ab:big", AB_big="X=1", LIMIT="30", RESERVE="25")
    assert skipped.returncode == 0 and "tp_ab_big: skipped" in stages(tmp_path / "s")


def test_summary_tables_the_sampling_rows(tmp_path):
    res = {"device": "NVIDIA H100 80GB HBM3", "results": [
        {"run": "faithful (default), state cache on", "state_cache": "on", "dtype": "bf16 autocast", "batch": 256,
         "length": 32, "sentences_per_s": 63.94, "tokens_per_s": 2046.1, "model_s": 3.29, "total_s": 4.01},
        {"run": "AR greedy, RWKV state (one token a step)", "state_cache": "on", "dtype": "bf16 autocast",
         "batch": 256, "length": 32, "sentences_per_s": 437.5, "tokens_per_s": 14000.0, "model_s": 0.59,
         "total_s": 0.59}],
        "agreement": {"a == b": 0.5}}  # fmt: skip
    (tmp_path / "sampling.json").write_text(json.dumps(res))
    out = run(tmp_path, STAGES="")
    assert out.returncode == 0, out.stderr[-2000:]
    md = (tmp_path / "summary.md").read_text()
    assert "## Sampling, latent -> text (NVIDIA H100 80GB HBM3, batch 256, 32 tokens)" in md
    assert "| faithful (default), state cache on | on | bf16 autocast | 63.9 | 2,046 | 3.29 / 4.01 |" in md
    assert "| AR greedy, RWKV state (one token a step) | on | bf16 autocast | 437.5 | 14,000 | 0.59 / 0.59 |" in md
    assert "- rows identical, a == b: 0.500" in md


def test_sampling_stage_is_known(tmp_path):
    res = run(tmp_path, STAGES="sampling", LIMIT="30", RESERVE="25")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "sampling: skipped" in stages(tmp_path)


def test_summary_sets_his_kernel_categories_beside_ours(tmp_path):
    cats = {"wkv": {"ms_per_step": 11.2, "calls_per_step": 24}, "gemm": {"ms_per_step": 11.9, "calls_per_step": 595}}
    (tmp_path / "blinkdl_0.4b.json").write_text(json.dumps({"env": {"RWKV_JIT_ON": "1"}, "status": "ok",
                                                             "profile": {"categories": cats}}))  # fmt: skip
    ours = {"batch": 16, "length": 512, "rows": [
        {"shape": "0.4b", "row": "rwkv7-lm", "status": "ok", "profile": {"categories": {
            "wkv": {"ms_per_step": 12.07, "calls_per_step": 24},
            "compiled elementwise (Triton)": {"ms_per_step": 14.78, "calls_per_step": 1203}}}}]}  # fmt: skip
    (tmp_path / "tp_cuda").mkdir()
    (tmp_path / "tp_cuda" / "results.json").write_text(json.dumps(ours))
    res = run(tmp_path, STAGES="")
    assert res.returncode == 0, res.stderr[-2000:]
    md = (tmp_path / "summary.md").read_text()
    assert "## GPU kernel ms a step by category, 0.4b: BlinkDL vs ours (LM step)" in md
    assert "| compiled elementwise (Triton) | 0.00 | 14.78 | +14.78 |" in md
    assert "| gemm | 11.90 | 0.00 | -11.90 |" in md
    assert "| wkv | 11.20 | 12.07 | +0.87 |" in md
    assert md.index("compiled elementwise") < md.index("| wkv") < md.index("| gemm")  # the larger side first


def test_code_stage_packs_inductors_modules(tmp_path):
    res = run(tmp_path, STAGES="code")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "code: " in stages(tmp_path) and " modules" in stages(tmp_path)
    with tarfile.open(tmp_path / "results.tgz") as tar:
        assert "./inductor_code.tgz" in tar.getnames()


def test_summary_lists_where_a_step_alone_waits(tmp_path):
    alone = {"steps": 3, "lead_ms": 1.25, "busy_ms": 40.5, "idle_ms": 0.75, "tail_ms": 0.02, "gaps": []}
    ours = {"batch": 16, "length": 512, "rows": [
        {"shape": "0.1b", "row": "rwkv7-lm", "status": "ok", "profile": {"alone": alone}}]}  # fmt: skip
    (tmp_path / "tp_ab_k1").mkdir()
    (tmp_path / "tp_ab_k1" / "results.json").write_text(json.dumps(ours))
    res = run(tmp_path, STAGES="")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| 0.1b | rwkv7-lm (tp_ab_k1) | 1.25 | 40.50 | 0.75 | 0.02 |" in (tmp_path / "summary.md").read_text()
