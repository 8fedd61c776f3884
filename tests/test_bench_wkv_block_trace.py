"""bench/wkv_block_trace.py on the CPU: the probes find their places in the kernel source, and a trace is summarised
as expected (the GPU run is a script for the device machine)."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import wkv_block_trace as wbt  # noqa: E402


def test_the_probes_land_in_the_backward_only():
    text = wbt.SOURCE.read_text()
    out = wbt.probed_source(text)
    assert out.count("g_wkv7_trace[3 * blockIdx.x + 1] = wkv7_now();") == 1
    assert out.count("g_wkv7_trace[3 * blockIdx.x + 2] = wkv7_now();") == 1
    bwd = out.index("wkv7_bwd_kernel(")
    fwd = out.index("wkv7_fwd_kernel(")
    start, end = out.index("g_wkv7_trace[3 * blockIdx.x + 1]"), out.index("g_wkv7_trace[3 * blockIdx.x + 2]")
    assert fwd < bwd < start < end < out.index("}  // namespace", end)  # both inside the backward
    assert out.index('extern "C" int wkv7_trace_backward') > out.index("int wkv7_cuda_backward(")
    # without the probes the text is the kernel's own
    stripped = out.replace(wbt.PROBE_DECL, "", 1).replace(wbt.PROBE_START, "", 1).replace(wbt.PROBE_END, "", 1)
    assert stripped.replace(wbt.WRAPPER, "") == text
    with pytest.raises(ValueError, match="index line"):
        wbt.probed_source(text.replace(wbt.BWD_INDEX_LINE, ""))


def test_a_trace_is_summarised_per_sm():
    ms = 1_000_000  # ns
    # SM 0 runs two blocks of 0.65 ms, SM 1 one block of 0.59 ms starting 0.01 ms late
    trace = [(0, 10 * ms, int(10.65 * ms)), (0, 10 * ms, int(10.66 * ms)), (1, int(10.01 * ms), int(10.60 * ms))]
    s = wbt.summarise(trace)
    assert s["blocks"] == 3 and s["sms_used"] == 2 and s["blocks_a_sm"] == {1: 1, 2: 1}
    assert s["makespan_ms"] == pytest.approx(0.66)
    assert s["duration_shared_ms"]["n"] == 2 and s["duration_shared_ms"]["max"] == pytest.approx(0.66)
    assert s["duration_alone_ms"]["median"] == pytest.approx(0.59)
    assert s["start_offset_ms"]["max"] == pytest.approx(0.01)


def test_bad_shapes_are_one_line(capsys):
    assert wbt.main(["--shapes", "16x511x12"]) == 2
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and out.startswith("--shapes")
