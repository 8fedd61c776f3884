"""bench/bench_sampling.py's ``decoders`` rows at a tiny shape on CPU: they run and count what they decode; the AR
decoder's greedy decode carried as RWKV state picks exactly the tokens of greedy decoding that re-reads the whole
prefix every step; the default latent -> text decoder gives the same tokens with the state cache on and off.
Every random draw is seeded."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_sampling as bs  # noqa: E402
from captions_ar import EOT, beam_search, cut_at_eot, greedy_stateful  # noqa: E402

LAYERS, WIDTH, VOCAB = 2, 64, 100


def tiny_args(*extra: str):
    return bs.parse_args(["--device", "cpu", "--layers", str(LAYERS), "--width", str(WIDTH), "--vocab", str(VOCAB),
                          "--n", "5", "--length", "6", *extra])  # fmt: skip


def test_decoder_rows_run_and_count_what_they_decode():
    torch.manual_seed(0)
    dev = torch.device("cpu")
    m = bs.build_sampling_model(LAYERS, WIDTH, VOCAB, dev, length=6)
    ar = bs.build_ar_model(LAYERS, WIDTH, VOCAB, dev)
    latents = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    rows, outputs = bs.decoder_rows(m, ar, latents, 6, bf16=False)
    names = [r["run"] for r in rows]
    assert names == [*bs.decoder_runs(), "AR greedy, RWKV state (one token a step)", "AR greedy, re-reading the row"]
    assert [r["state_cache"] for r in rows] == ["on", "off", "n/a", "on", "off"]
    faithful = {k: v for k, v in rows[0]["decoder"].items() if k != "use_cache"}
    assert faithful == bs.L2T_PRESETS["faithful"]  # the default decoder, as a user gets it
    for r in rows:
        assert (r["batch"], r["length"], r["sentences"], r["tokens"]) == (5, 6, 5, 30)
        assert r["sentences_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(6 * r["sentences_per_s"])
        ids = outputs[r["run"]]
        assert len(ids) == 5 and all(len(s) <= 6 for s in ids)
    # the state cache is exact: the same tokens with it on and off (fp32)
    assert outputs[names[0]] == outputs[names[1]]
    assert outputs[names[3]] == outputs[names[4]]


def test_run_bench_writes_rows_and_agreement():
    torch.manual_seed(0)
    res = bs.run_bench(tiny_args("--rows", "decoders"))
    assert len(res["results"]) == 5 and res["device"] == "cpu"
    assert res["agreement"] == {f"{x} == {y}": 1.0 for x, y in bs.PAIRS[:2]}
    with pytest.raises(SystemExit, match="--rows"):
        bs.run_bench(tiny_args("--rows", "nosuch"))


def test_ar_greedy_with_state_equals_rereading_the_prefix():
    torch.manual_seed(0)
    ar = bs.build_ar_model(LAYERS, WIDTH, 40, torch.device("cpu"))
    with torch.no_grad():
        ar.backbone.head.weight[EOT] *= 1.6  # end-of-text comes early in some rows, never in others
    z = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    free = greedy_stateful(ar, z, 12, batch_size=5)
    ar.banned = (int(free[free != EOT].mode().values),)  # ban a token greedy decoding picks
    ids = greedy_stateful(ar, z, 12, batch_size=5)
    assert ids.shape == (8, 12) and not bool((ids == ar.banned[0]).any())
    cut = cut_at_eot(ids)
    assert {len(r) for r in cut} - {12} and 12 in {len(r) for r in cut}  # both kinds of row
    rows_after_eot = [r[r.index(EOT) :] for r in ids.tolist() if EOT in r]
    assert all(set(r) == {EOT} for r in rows_after_eot)  # a finished row continues with end-of-text
    reread, _ = beam_search(ar, z, 12, beams=1, batch_size=3)  # re-runs the model on the whole prefix each step
    assert cut == reread
    # and step by step without the padding beam_search adds: argmax of next_logits over the unpadded prefix
    seq = torch.zeros(8, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(12):
            logits = ar.next_logits(z, seq)
            logits[:, list(ar.banned)] = float("-inf")
            nxt = torch.where((seq == EOT).any(1), EOT, logits.argmax(-1))
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(seq, ids)
