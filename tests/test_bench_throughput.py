"""bench/throughput.py end to end on the CPU at a tiny shape: every row group runs and the numbers are consistent."""

from __future__ import annotations

import json
import math
import random
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import throughput  # noqa: E402


def test_tiny_cpu_run_writes_consistent_rows(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    rows = "denoiser-causal-full,denoiser-twice-frozen,rwkv7-lm,fla-rwkv7-lm,llama-lm"
    argv = ["--device", "cpu", "--shapes", "tiny", "--rows", rows, "--steps", "2", "--warmup", "1", "--batch", "2",
            "--length", "16", "--sampling", "--sampling-batch", "4", "--sampling-length", "8", "--sampling-steps",
            "4", "--out", str(out)]  # fmt: skip
    assert throughput.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    by_row = {r["row"]: r for r in res["rows"]}
    assert list(by_row) == rows.split(",")
    assert by_row["fla-rwkv7-lm"]["status"].startswith("skipped")
    for name in ("denoiser-causal-full", "denoiser-twice-frozen", "rwkv7-lm", "llama-lm"):
        r = by_row[name]
        assert r["status"] == "ok", (name, r["status"])
        # tokens/s is text tokens over the median step
        assert math.isclose(r["tokens_per_s"] * r["step_ms_median"] / 1000, 2 * 16, rel_tol=1e-6)
        assert len(r["step_ms"]) == 2 and all(t > 0 for t in r["step_ms"])
        assert 0 < r["mfu"] and r["flops_counted_per_step"] > 0
        assert math.isfinite(r["first_loss"]) and r["first_loss"] > 0
    # the frozen row credits the backbone's matrices as frozen, the full row as trained
    assert by_row["denoiser-twice-frozen"]["params_frozen"] > 0 and by_row["denoiser-causal-full"]["params_frozen"] == 0
    # a plain LM step executes at least the 6 N FLOPs per predicted token of the MFU model (the reference WKV's
    # einsums come on top), and not wildly more
    lm = by_row["rwkv7-lm"]
    ratio = lm["flops_counted_per_step"] / (6 * lm["params_grad"] * 2 * 15)
    assert 0.95 < ratio < 3, ratio
    llama = by_row["llama-lm"]  # no recurrence: counted = 6 N plus attention's score/value matmuls
    ratio = llama["flops_counted_per_step"] / (6 * llama["params_grad"] * 2 * 16)
    assert 0.99 < ratio < 1.5, ratio
    units = {r["unit"] for r in res["sampling"]}
    assert units == {"sentences/s", "latents/s"} and all(r["per_s"] > 0 for r in res["sampling"])
    md = (out / "results.md").read_text()
    assert "denoiser-twice-frozen" in md and "| tiny | rwkv7-lm |" in md


def test_unknown_row_is_refused(capsys):
    assert throughput.main(["--device", "cpu", "--shapes", "tiny", "--rows", "nope"]) == 2
    assert "nope" in capsys.readouterr().out


def test_triton_config_inline_sets_the_launch_parameters_and_bad_ones_are_one_line(capsys, monkeypatch):
    pytest.importorskip("triton")
    from rwkv_diffusion_rnn.models import wkv7_triton

    rng = random.Random()
    fwd_bv, bwd_warps = rng.choice([4, 8, 16, 32]), rng.choice([1, 2, 4])
    monkeypatch.setattr(wkv7_triton, "CONFIG", wkv7_triton.TritonWKVConfig())
    argv = ["--device", "cpu", "--shapes", "tiny", "--rows", "none", "--triton-config",
            f"fwd_bv={fwd_bv},bwd_warps={bwd_warps}"]  # fmt: skip
    assert throughput.main(argv) == 0
    assert (wkv7_triton.CONFIG.fwd_bv, wkv7_triton.CONFIG.bwd_warps) == (fwd_bv, bwd_warps)
    assert wkv7_triton.CONFIG.chunk == wkv7_triton.TritonWKVConfig().chunk  # the rest untouched
    capsys.readouterr()
    for bad in ("fwd_bv=8,no_such=1", "fwd_bv=eight", "/no/such/file.json"):
        assert throughput.main(["--device", "cpu", "--rows", "none", "--triton-config", bad]) == 2
        out = capsys.readouterr().out.strip()
        assert out.count("\n") == 0 and out.startswith("--triton-config"), out


def test_markdown_renders_a_rows_kernel_profile():
    rng = random.Random()
    top = [{"name": f"kernel_{i}_{rng.randrange(10**6)}", "ms_per_step": rng.uniform(0.1, 9), "calls_per_step": i + 1}
           for i in range(rng.randrange(1, 6))]  # fmt: skip
    row = {"shape": "0.1b", "row": "rwkv7-lm", "status": "ok", "tokens_per_s": 1e5, "step_ms_median": 80.0,
           "profile": {"wall_ms_per_step": 81.0, "gpu_kernel_ms_per_step": 70.5, "kernels_per_step": 1873.0,
                       "top": top}}  # fmt: skip
    meta = {"device": "cpu", "date": "d", "command": "c", "versions": {"torch": "t", "fla": None, "transformers": "x"},
            "peak_tflops": 1.0, "peak_what": "w", "batch": 1, "length": 1, "dtype": "bf16", "steps": 1,
            "warmup": 1}  # fmt: skip
    md = throughput.markdown(meta, [row], [])
    assert "Profile 0.1b rwkv7-lm: 81.0 ms wall, 70.5 ms of GPU kernels, 1873 kernels per step" in md
    for k in top:
        assert f"| `{k['name']}` | {k['ms_per_step']:.2f} | {k['calls_per_step']:.0f} |" in md


def test_memory_budget_refuses_out_of_range(capsys):
    # (a share in range is handed to compile_blocks: tests/models/test_rwkv7_regions.py)
    for bad in ("0", "1.5", "-0.2"):
        assert throughput.main(["--device", "cpu", "--rows", "none", "--memory-budget", bad]) == 2
        out = capsys.readouterr().out.strip()
        assert out.count("\n") == 0 and out.startswith("--memory-budget"), out
    assert throughput.main(["--device", "cpu", "--rows", "none", "--memory-budget", "0.5"]) == 2  # not compiled
    assert capsys.readouterr().out.strip() == "--memory-budget acts on compiled blocks: add --compile-blocks"


def test_wkv_keep_states_refuses_out_of_range(capsys):
    for bad in ("-0.1", "1.5"):
        assert throughput.main(["--device", "cpu", "--rows", "none", "--wkv-keep-states", bad]) == 2
        assert capsys.readouterr().out.strip() == f"--wkv-keep-states {float(bad)}: expected a share in [0, 1]"


def test_bf16_residual_needs_bf16_autocast(capsys):
    assert throughput.main(["--device", "cpu", "--rows", "none", "--bf16-residual", "--dtype", "fp16"]) == 2
    assert capsys.readouterr().out.strip() == (
        "--bf16-residual needs --dtype bf16 (the stream in autocast's dtype); got fp16"
    )
    # left unset, it follows the dtype (the trainer's default) and is not refused
    assert throughput.main(["--device", "cpu", "--rows", "none", "--dtype", "fp16"]) == 0


def test_inductor_options_are_set_and_bad_ones_are_one_line(capsys):
    import torch._inductor.config as config

    # saved and restored by hand: pytest's monkeypatch undo breaks Inductor's config proxy (the option "does not
    # exist" for every later compile in the process)
    before = config.combo_kernels, config.triton.cudagraphs
    try:
        config.combo_kernels, config.triton.cudagraphs = False, False
        done = throughput.set_inductor_options(["combo_kernels=1", "triton.cudagraphs=True"])
        assert done == {"combo_kernels": True, "triton.cudagraphs": True}
        assert config.combo_kernels is True and config.triton.cudagraphs is True
        for bad, said in (
            ("combo_kernels", "'combo_kernels': expected NAME=VALUE"),
            ("no_such_option=1", "'no_such_option' is not an option of torch._inductor.config"),
            ("combo_kernels=maybe", "combo_kernels=maybe: expected a bool (now True)"),
        ):
            assert throughput.main(["--device", "cpu", "--rows", "none", "--inductor", bad]) == 2
            assert capsys.readouterr().out.strip() == f"--inductor: {said}"
    finally:
        config.combo_kernels, config.triton.cudagraphs = before


def test_compile_denoiser_keeps_the_first_step_loss(tmp_path):
    """--compile-denoiser (the denoiser's regions compiled around the blocks) and --device-cache (batches indexed
    on the device): the same first-step loss as without."""
    losses = []
    for extra in ([], ["--compile-denoiser", "--device-cache"]):
        out = tmp_path / f"out{len(extra)}"
        argv = ["--device", "cpu", "--shapes", "tiny", "--rows", "denoiser-causal-full", "--steps", "1", "--warmup",
                "1", "--batch", "2", "--length", "16", "--dtype", "fp32", "--no-count-flops", "--out", str(out),
                *extra]  # fmt: skip
        assert throughput.main(argv) == 0
        row = json.loads((out / "results.json").read_text())["rows"][0]
        assert row["status"] == "ok" and row["notes"]["compile_denoiser"] == row["notes"]["device_cache"] == bool(extra)
        losses.append(row["first_loss"])
    assert math.isclose(losses[0], losses[1], rel_tol=1e-5), losses


def test_append_writes_the_table_to_the_notebook(tmp_path, capsys):
    """--append FILE: the final table, headed with the card and the date as a notebook entry, is appended after what
    the file held; a FILE whose folder is missing is refused before anything runs."""
    note = tmp_path / "RESULTS.md"
    before = f"# notebook\n\nentry {random.randrange(10**9)}\n"
    note.write_text(before)
    argv = ["--device", "cpu", "--shapes", "tiny", "--rows", "rwkv7-lm", "--steps", "1", "--warmup", "1",
            "--length", "16", "--batch", "2", "--no-count-flops", "--append", str(note)]  # fmt: skip
    assert throughput.main(argv) == 0
    text = note.read_text()
    assert text.startswith(before)
    added = text[len(before) :]
    assert added.startswith("\n## Training throughput — ") and "| tiny | rwkv7-lm |" in added
    capsys.readouterr()
    assert throughput.main(["--device", "cpu", "--rows", "none", "--append", str(tmp_path / "no" / "R.md")]) == 2
    assert capsys.readouterr().out.strip().startswith("--append ")


def test_host_line_and_backend_choice(tmp_path, capsys):
    """Every run records the host (kernel, CPU, versions, the eager launch latency) in results.json and under the
    results.md heading; --wkv-backend takes the backends' names (cuda included) and refuses others in one line."""
    out = tmp_path / "out"
    assert throughput.main(["--device", "cpu", "--rows", "none", "--wkv-backend", "cuda", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    host = res["host"]
    assert res["wkv_backend"] == "cuda" and host["launch_us"] > 0 and host["kernel"] and host["torch"]
    assert throughput.host_line(host) in (out / "results.md").read_text()
    capsys.readouterr()
    assert throughput.main(["--device", "cpu", "--rows", "none", "--wkv-backend", "cuda2"]) == 2
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and out.startswith("--wkv-backend cuda2: expected one of auto,") and "cuda" in out


def test_launch_latency_is_a_median_per_launch(monkeypatch):
    ticks = iter(range(100))  # each perf_counter call one second later: every round spans 1 s
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: float(next(ticks)))
    assert throughput.launch_latency_us(throughput.torch.device("cpu"), launches=4, rounds=3) == 1e6 / 4


def test_llama_rows_with_and_without_the_autocast_cache(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--shapes", "tiny", "--rows", "llama-lm,llama-lm-nocache", "--steps", "1", "--warmup",
            "1", "--batch", "2", "--length", "16", "--no-count-flops", "--cuda-graphs", "--out", str(out)]  # fmt: skip
    assert throughput.main(argv) == 0
    rows = {r["row"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["llama-lm"]["notes"]["autocast_cache"] is True  # as a user runs it, whatever --cuda-graphs says
    assert rows["llama-lm-nocache"]["notes"]["autocast_cache"] is False
    assert math.isclose(rows["llama-lm"]["first_loss"], rows["llama-lm-nocache"]["first_loss"], rel_tol=1e-4)


def test_kernel_categories_of_names_seen_in_profiles():
    """The profile's categories (bench/throughput.py) on kernel names from real H100 profiles of ours and BlinkDL's."""
    from throughput import kernel_category

    seen = {
        "void (anonymous namespace)::wkv7_bwd_kernel<__nv_bfloat16, float, 2>(int, int, __nv_bfloat": "wkv",
        "void backward_kernel_preload<64, 16>(int, int, __nv_bfloat16*": "wkv",
        "nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_NNT": "gemm",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "FusedOptimizerTenso": "optimizer",
        "_adamw_kernel": "optimizer",  # master_weights.py's update
        "triton_red_fused__to_copy_argmax_gather_logsumexp_squeeze_sub_unsqueeze_0": "head loss",
        "triton_poi_fused__to_copy_arange_eq_exp_mul_sub_unsqueeze_where_0": "head loss",
        "void (anonymous namespace)::l2wrap_ce_backward_v2_kernel<c10::BFloat16, 512>": "head loss",
        "(anonymous namespace)::tmix_kk_pre_backward64_v5_kernel(c10::BFloat16 const*": "fused tmix/cmix (hand-written)",  # noqa: E501
        "triton_per_fused__to_copy_native_group_norm_view_0": "compiled elementwise (Triton)",
        "triton_per_fused__to_copy__unsafe_view_mul_native_group_norm_native_group_norm_backward_sum_view_wkv7_cuda_bwd_9":  # noqa: E501
        "compiled elementwise (Triton)",  # an Inductor kernel named after the WKV op it sits beside
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::Tenso": "copies / casts",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::arr": "fills",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, std:": "eager elementwise / norms",  # noqa: E501
        "Memset (Device)": "other",
    }
    assert {name: kernel_category(name) for name in seen} == seen


@pytest.mark.slow  # four compiled steps of a small model on 2 cores: ~40 s
def test_block_bytes_counts_fewer_bytes_with_the_bf16_stream(capsys):
    """bench/block_bytes.py takes Inductor's byte count of the compiled blocks; the bf16 stream moves fewer bytes a
    token than the fp32 one (the reason for training.bf16_residual)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("block_bytes", REPO / "bench" / "block_bytes.py")
    block_bytes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(block_bytes)
    per_block = {}
    try:
        for flags in (("--no-bf16-residual",), ()):
            # behind the graph break: at this width the in-graph operator's graphs fuse differently at the two lengths
            assert block_bytes.main(["--width", "128", "--layers", "2", "--no-in-graph", *flags]) == 0
            last = capsys.readouterr().out.strip().splitlines()[-1]
            per_block[flags] = float(last.split(": ")[1].split(" KB")[0])
    finally:
        sys.modules.pop("block_bytes", None)
    assert 0 < per_block[()] < 0.95 * per_block[("--no-bf16-residual",)], per_block
    assert block_bytes.main(["--width", "100"]) == 2
    assert capsys.readouterr().out.strip() == "--width 100: expected a positive multiple of the head size 64"


def test_gpu_timeline_splits_a_step_into_lead_kernels_gaps_and_tail():
    from throughput import gpu_timeline

    # two steps (us): kernels a [10, 30), b [25, 50) overlapping, c [90, 100); the second step the same, shifted
    kernels = [(10.0, 30.0, "a"), (25.0, 50.0, "b"), (90.0, 100.0, "c")]
    kernels += [(1000 + s, 1000 + e, n) for s, e, n in kernels] + [(5000.0, 5001.0, "outside")]
    out = gpu_timeline(kernels, [(0.0, 110.0), (1000.0, 1110.0)])
    assert out["steps"] == 2
    assert out["lead_ms"] == 0.01  # 10 us before "a"
    assert out["busy_ms"] == 0.05  # [10, 50) merged, then [90, 100)
    assert out["idle_ms"] == 0.04  # from b's end to c's start
    assert out["tail_ms"] == 0.01
    assert out["gaps"] == [{"after": "b", "before": "c", "ms_per_step": 0.04}]
    assert gpu_timeline([], [(0.0, 1.0)]) == {"steps": 0}


def test_markdown_renders_the_alone_timeline():
    from throughput import markdown

    prof = {"wall_ms_per_step": 2.0, "gpu_kernel_ms_per_step": 1.0, "kernels_per_step": 3, "top": [],
            "alone": {"steps": 3, "lead_ms": 0.5, "busy_ms": 1.0, "idle_ms": 0.25, "tail_ms": 0.01,
                      "gaps": [{"after": "embedding_fwd", "before": "graph", "ms_per_step": 0.2}]}}  # fmt: skip
    meta = {"device": "cpu", "date": "d", "command": "c", "versions": {"torch": "t", "fla": None, "transformers": "x"},
            "peak_tflops": 1.0, "peak_what": "w", "batch": 1, "length": 1, "dtype": "bf16", "steps": 1,
            "warmup": 1}  # fmt: skip
    md = markdown(meta, [{"shape": "tiny", "row": "rwkv7-lm", "status": "ok", "profile": prof}], [])
    assert "0.50 before its first kernel, 1.00 of kernels, 0.25 between them, 0.01 after the last" in md
    assert "| `embedding_fwd` | `graph` | 0.200 |" in md


def test_flat_adamw_row_runs_and_starts_from_the_same_loss(tmp_path):
    """--flat-adamw: the LM row with master_weights.MasterAdamW's flat fp32 update; same first-step loss, and the row
    says which optimizer it ran."""
    rows = {}
    for flag in ([], ["--flat-adamw"]):
        out = tmp_path / ("flat" if flag else "plain")
        argv = ["--device", "cpu", "--shapes", "tiny", "--rows", "rwkv7-lm", "--steps", "2", "--warmup", "1",
                "--batch", "2", "--length", "16", "--out", str(out), *flag]  # fmt: skip
        assert throughput.main(argv) == 0
        rows[bool(flag)] = json.loads((out / "results.json").read_text())["rows"][0]
    assert rows[True]["status"] == rows[False]["status"] == "ok"
    assert rows[True]["notes"]["flat_adamw"] is True and rows[False]["notes"]["flat_adamw"] is False
    assert rows[True]["first_loss"] == rows[False]["first_loss"]


def test_host_profile_ranks_the_step_s_functions_by_host_time():
    import time

    import torch
    from throughput import host_profile

    def slow_part() -> None:
        time.sleep(0.004)

    def fast_part() -> None:
        sum(range(10))

    def step() -> None:
        slow_part()
        for _ in range(3):
            fast_part()

    out = host_profile(step, torch.device("cpu"), steps=4, top=50)
    assert out["steps"] == 4 and out["wall_ms_per_step"] >= 4.0
    by_name = {r["function"].split("(")[-1].rstrip(")"): r for r in out["cumulative"]}
    assert by_name["slow_part"]["calls_per_step"] == 1.0 and by_name["fast_part"]["calls_per_step"] == 3.0
    assert by_name["slow_part"]["cumulative_ms"] >= 3.5 > by_name["fast_part"]["cumulative_ms"]
    assert by_name["step"]["cumulative_ms"] >= by_name["slow_part"]["cumulative_ms"]
    assert out["own"][0]["own_ms"] >= out["own"][-1]["own_ms"]  # ranked by own time
