"""bench/captions_*.py on a tiny synthetic caption set: prepare -> run (diffusion + both baselines) -> score, plus the
beam search against exhaustive search. CPU, a few seconds of training per run. Every random draw is seeded.

The captions are generated per "image" (a subject and a place shared by its 5 captions, adjectives and verbs
varying), tokenized with the real World tokenizer, and encoded with a bag-of-words stub encoder injected into
prepare and score (the real MiniLM is not needed, and the properties checked do not depend on it).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

pytest.importorskip("pyrwkv_tokenizer")

import captions_ar  # noqa: E402
import captions_diffusion  # noqa: E402
import captions_prepare as prep  # noqa: E402
import captions_run  # noqa: E402
import captions_score  # noqa: E402
from captions_ar import EarlyStop, PrefixCaptioner, ar_nll_bits, beam_search  # noqa: E402
from captions_common import RunError  # noqa: E402

SUBJECTS = ["man", "woman", "dog", "child", "girl", "boy", "cat", "worker", "player", "dancer"]
PLACES = ["on the beach", "in a park", "on a street", "near a lake", "in the snow", "at a market", "on a stage"]
ADJS = ["young", "old", "small", "happy", "tall", "tired"]
VERBS = ["runs", "sits", "jumps", "walks", "waits", "plays"]


class BowEncoder:
    """Stub sentence encoder: the normalised sum of a fixed random 32-d vector per lower-cased word."""

    def __init__(self, dim: int = 32) -> None:
        self.dim = dim
        self.projection = argparse.Namespace(out_dim=dim)  # what eval_data.encode_texts reads

    def _vec(self, word: str) -> np.ndarray:
        return np.random.default_rng(zlib.crc32(word.encode())).standard_normal(self.dim)

    def encode(self, texts, batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim))
        for i, t in enumerate(texts):
            for w in t.lower().replace(".", " ").split():
                out[i] += self._vec(w)
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.where(norm > 0, norm, 1)).astype(np.float32)


def caption(rng, subject: str, place: str) -> str:
    return f"A {rng.choice(ADJS)} {subject} {rng.choice(VERBS)} {place}."


def write_inputs(root: Path, rng, n_train: int, n_img: int, n_pairs: int, enc: BowEncoder) -> argparse.Namespace:
    """A pack, a prepare-latents style encoder folder and an STS-B csv, as the real inputs are laid out."""
    from rwkv_diffusion_rnn.data_io import LatentStats
    from rwkv_diffusion_rnn.tokenizer import load_tokenizer

    tok = load_tokenizer("rwkv-world")
    train = [caption(rng, rng.choice(SUBJECTS), rng.choice(PLACES)) for _ in range(n_train)]
    pack = root / "pack"
    pack.mkdir()
    ids = tok.encode_batch(train)
    flat, off = prep.ragged(ids)
    lat = enc.encode(train)
    np.save(pack / "tokens.npy", flat)
    np.save(pack / "offsets.npy", off)
    np.save(pack / "latents.npy", lat)
    blobs = [t.encode() for t in train]
    np.save(pack / "text_bytes.npy", np.frombuffer(b"".join(blobs), dtype=np.uint8))
    np.save(pack / "text_offsets.npy", np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64))
    LatentStats.compute(lat).save(pack / "latent_stats.json")
    (pack / "pack_meta.json").write_text(json.dumps({"format": "diffrwkv-pack/1", "count": n_train}))
    enc_dir = root / "enc"
    (enc_dir / "latents" / "validation").mkdir(parents=True)
    images = [(rng.choice(SUBJECTS), rng.choice(PLACES)) for _ in range(n_img)]
    rows = []
    for k in range(1, 6):  # val.1 (one caption per image), then val.2, ...
        for i, (s, p) in enumerate(images):
            text = caption(rng, s, p)
            j = len(rows)
            np.save(enc_dir / "latents" / "validation" / f"{j:08d}.npy", enc.encode([text])[0])
            rows.append(
                {"text": text, "latent_path": f"latents/validation/{j:08d}.npy", "source": f"x/val.{k}.en.gz:{i + 1}"}
            )
    (enc_dir / "validation_data.json").write_text(json.dumps(rows))
    sts = root / "sts.csv"
    with open(sts, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        for i in range(n_pairs):
            a = caption(rng, rng.choice(SUBJECTS), rng.choice(PLACES))
            b = caption(rng, rng.choice(SUBJECTS), rng.choice(PLACES))
            genre = ("main-captions", "main-news", "main-forums")[i % 3]
            b = "A quokka yodels." if i == 0 else b  # words no training caption has
            w.writerow([genre, "MSRvid", "2012test", f"{i:04d}", f"{rng.uniform(0, 5):.2f}", a, b])
    return argparse.Namespace(
        pack=str(pack),
        encoder_dir=str(enc_dir),
        stsb=str(sts),
        out=str(root / "bundle"),
        seed=0,
        overwrite=False,
        val_images=n_img,
    )


def test_prepare_run_score_end_to_end(tmp_path):
    seed = 20261206
    rng = np.random.default_rng(seed)
    enc = BowEncoder()
    n_img, n_pairs = 12, 10
    args = write_inputs(tmp_path, rng, n_train=240, n_img=n_img, n_pairs=n_pairs, enc=enc)
    meta = prep.build(args, encoder=enc)
    bundle = prep.load_bundle(args.out, verify=True)
    assert meta["counts"] == {
        "train": 240,
        "val": 5 * n_img,
        "val_images": n_img,
        "stsb_pairs": n_pairs,
        "train_tokens": int(bundle["train_offsets"][-1]),
    }, seed
    assert bundle["train_latents"].dtype == np.float16 and bundle["train_tokens"].dtype == np.uint16
    assert bundle["stsb_latents"].shape == (2 * n_pairs, 32) and bundle["floor_latents"].shape == (n_img, 32)
    assert -1 <= meta["stsb_encoder_spearman"] <= 1
    with pytest.raises(prep.BundleError, match="exists"):  # never overwrites silently
        prep.build(args, encoder=enc)

    out, tar = tmp_path / "runs", tmp_path / "runs.tar"
    budget = 1.5
    rc = captions_run.main(
        [
            "--variants",
            "causal,ar,regress",
            "--data",
            args.out,
            "--out",
            str(out),
            "--tar",
            str(tar),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--n-layer",
            "1",
            "--n-embd",
            "64",
            "--batch",
            "16",
            "--budget-s",
            str(budget),
            "--length",
            "16",
            "--warmup-steps",
            "5",
            "--sample-steps",
            "4",
            "--t2l-steps",
            "1",
            "--l2t-decoders",
            "ancestral:4,confidence:3:g1,confidence:3:g1:r2:s1.5",
            "--beams",
            "2",
            "--eval-batch",
            "64",
            "--lr",
            "3e-3",
            "--ar-early-stop",
            "0.5",
            "--t2l-spell-unseen",
        ]
    )
    assert rc == 0, seed
    world_train = set(np.asarray(bundle["train_tokens"]).tolist())
    res = {v: json.loads((out / f"{v}.json").read_text()) for v in ("causal", "ar", "regress")}
    for v, r in res.items():
        tr = r["train"]
        assert tr["steps"] == tr["untimed_steps"] + tr["timed_steps"] and tr["timed_steps"] >= 1, (v, tr)
        assert budget <= tr["train_s"] < budget + 30, (v, tr["train_s"])  # the loop ran the whole budget, then stopped
        assert all(math.isfinite(c["loss"]) for c in tr["curve"]), v
    for v, decs in (
        ("causal", ["ancestral4", "confidence3-g1", "confidence3-g1-r2-s1.5"]),
        ("ar", ["greedy", "beam2"]),
    ):
        assert sorted(res[v]["l2t"]) == sorted(decs)
        for d in decs:
            rows = res[v]["l2t"][d]["world_ids"]
            assert len(rows) == n_img
            # generated ids are World ids the training data contains (never end-of-text, <mask> or unknown)
            assert all(0 < i < 65536 and i in world_train for r in rows for i in r), (v, d)
    lik = res["causal"]["eval"]["likelihood"]
    assert 0 < lik["val_text_nelbo_bits"] < 3 * lik["uniform_bits"] and lik["rows"] == 5 * n_img
    # the likelihood again with each row given the next row's latent (another image): it must move
    for v in ("causal", "ar"):
        info = res[v]["eval"]["latent_info_bits"]
        assert info is not None and math.isfinite(info) and info != 0, (seed, v, info)
    nll = res["ar"]["eval"]["likelihood"]
    assert nll["tokens"] == 5 * n_img * 16
    # early stopping validated during the budget and after it, on captions 2-5 only, and chose its best pass
    es = res["ar"]["train"]["early_stop"]
    assert es["rows"] == 4 * n_img and es["passes"] == len(es["curve"]) >= 2, es
    assert es["chosen"]["val_nll_bits"] == min(c["val_nll_bits"] for c in es["curve"]), es
    assert es["curve"][-1]["step"] == res["ar"]["train"]["steps"], es  # the last weights were a candidate
    # the chosen weights are the ones evaluated: the selection rows' NLL again after the restore
    assert es["restored_val_nll_bits"] == pytest.approx(es["chosen"]["val_nll_bits"], abs=2e-5), es
    # the AR baseline learned something in its budget: below the uniform code length
    assert 0 < nll["val_nll_bits"] < nll["uniform_bits"], (seed, nll)
    for v in ("causal", "regress"):
        pred = np.load(out / f"{v}_t2l.npy")
        assert pred.shape == (n_img + 2 * n_pairs, 32) and np.isfinite(pred).all(), v
        assert res[v]["t2l"]["rows"] == {"val": n_img, "stsb_pairs": n_pairs}
    # --t2l-spell-unseen: the diffusion run's T2L again with unseen tokens spelled, saved beside the plain one
    spelled = np.load(out / "causal_t2l_spelled.npy")
    assert spelled.shape == (n_img + 2 * n_pairs, 32) and np.isfinite(spelled).all()
    assert res["causal"]["t2l_spelled"]["file"] == "causal_t2l_spelled.npy" and "t2l_spelled" not in res["regress"]
    assert "_t2l_spelled_pred" not in res["causal"]
    with tarfile.open(tar) as tf:
        names = {Path(n).name for n in tf.getnames()}
    assert {"causal.json", "ar.json", "regress.json", "causal_t2l.npy", "regress_t2l.npy", "summary.json"} <= names
    assert "causal_t2l_spelled.npy" in names

    md = tmp_path / "scores.md"
    assert captions_score.main(["--runs", str(tar), "--bundle", args.out, "--out", str(md)], encoder=enc) == 0
    sc = json.loads(md.with_suffix(".json").read_text())
    got = {(r["variant"], r["decoder"]) for r in sc["rows"]}
    assert got == {
        ("causal", "ancestral4"),
        ("causal", "confidence3-g1"),
        ("causal", "confidence3-g1-r2-s1.5"),
        ("ar", "greedy"),
        ("ar", "beam2"),
        ("regress", "—"),
    }
    for r in sc["rows"] + sc["references"]:
        for key in ("l2t_cosine", "t2l_cosine", "sts_spearman"):
            if r.get(key) is not None:
                assert -1 - 1e-9 <= r[key] <= 1 + 1e-9, (r["variant"], key)  # a cosine of equal vectors may be 1 + ulp
        for key in ("l2t_retrieval_top1",):
            if r.get(key) is not None:
                assert 0 <= r[key] <= 1
        for key in ("bleu", "chrf"):
            if r.get(key) is not None:
                assert 0 <= r[key] <= 100 + 1e-9  # sacrebleu can round a perfect score to 100.00000000000004
    # self-reranking: candidate 1 is the plain decoder's text (same settings and seed), the choice is the row's
    # text, and the encoder's best of the two bounds both
    by_dec = {r["decoder"]: r for r in sc["rows"] if r["variant"] == "causal"}
    (rr,) = sc["rerank"]
    assert rr["decoder"] == "confidence3-g1-r2-s1.5" and rr["k"] == 2
    assert rr["first_cosine"] == pytest.approx(by_dec["confidence3-g1"]["l2t_cosine"], abs=1e-6)
    assert rr["chosen_cosine"] == pytest.approx(by_dec["confidence3-g1-r2-s1.5"]["l2t_cosine"], abs=1e-6)
    assert rr["oracle_cosine"] >= max(rr["first_cosine"], rr["chosen_cosine"]) - 1e-9
    rec = res["causal"]["l2t"]["confidence3-g1-r2-s1.5"]["rerank"]
    assert rec["candidates"][0] == res["causal"]["l2t"]["confidence3-g1"]["world_ids"]
    ref = {r["variant"]: r for r in sc["references"]}
    # caption-2 of the same image shares its subject and place with caption-1: above the random-caption floor.
    # Over 3,000 simulated draws of this generator the gap is 0.33 +- 0.055 (min 0.105).
    assert ref["human"]["l2t_cosine"] > ref["floor"]["l2t_cosine"] + 0.08, (seed, ref)
    t2l_row = next(r for r in sc["rows"] if r["variant"] == "causal")
    cos = captions_score_cos(np.load(out / "causal_t2l.npy")[:n_img], np.asarray(bundle["val_latents"][:n_img]))
    assert t2l_row["t2l_cosine"] == pytest.approx(cos, abs=1e-9)
    assert "| causal |" in md.read_text()
    # STS-B by genre (genres read back from the csv the bundle recorded): "all" is the table's figure, each genre's
    # ceiling is the encoder's own Spearman on that genre's pairs
    from rwkv_diffusion_rnn.evaluate import sts_spearman

    gen = {r["variant"]: {g["genre"]: g for g in r["genres"]} for r in sc["stsb_by_genre"]}
    assert sorted(gen) == ["causal", "causal (unseen tokens spelled)", "regress"] and sorted(gen["causal"]) == [
        "all", "main-captions", "main-forums", "main-news"]  # fmt: skip
    sp = gen["causal (unseen tokens spelled)"]["all"]["t2l"]  # the spelled T2L's own figure, from its own file
    want_sp = sts_spearman(spelled[n_img : n_img + n_pairs], spelled[n_img + n_pairs :],
                           np.asarray(bundle["stsb_scores"], np.float64))  # fmt: skip
    assert sp == pytest.approx(want_sp, abs=1e-9) and sp == pytest.approx(
        res["causal"]["t2l_spelled"]["stsb_spearman"], abs=1e-6
    )
    assert gen["causal"]["all"]["t2l"] == pytest.approx(t2l_row["sts_spearman"], abs=1e-12)
    lat, scores = np.asarray(bundle["stsb_latents"], np.float64), np.asarray(bundle["stsb_scores"], np.float64)
    m = np.arange(n_pairs) % 3 == 1  # main-news rows
    want = sts_spearman(lat[:n_pairs][m], lat[n_pairs:][m], scores[m])
    assert gen["regress"]["main-news"]["encoder"] == pytest.approx(want, abs=1e-12)
    assert gen["causal"]["main-news"]["pairs"] == m.sum() and gen["causal"]["main-news"]["unseen_token_share"] == 0
    n_cap = int((np.arange(n_pairs) % 3 == 0).sum())  # pair 0, a caption pair, holds the one unseen sentence
    assert gen["causal"]["main-captions"]["unseen_token_share"] == pytest.approx(1 / (2 * n_cap))
    assert "STS-B Spearman by genre" in md.read_text()
    assert {r["variant"]: r["latent_info"] for r in sc["rows"]}["ar"] == res["ar"]["eval"]["latent_info_bits"]


def captions_score_cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


class TableModel(torch.nn.Module):
    """next_logits from a fixed random table indexed by the prefix so far (the interface beam_search uses)."""

    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__()
        self.vocab_size, self.banned, self.g, self.table = vocab, (), torch.Generator().manual_seed(seed), {}

    def logits(self, prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in self.table:
            self.table[prefix] = torch.randn(self.vocab_size, generator=self.g) * 2
        return self.table[prefix]

    def next_logits(self, z, ids, pad_to=None):
        return torch.stack([self.logits(tuple(r)) for r in ids.tolist()])


def brute_force(model: TableModel, length: int) -> tuple[list[int], float]:
    """Best sequence over all continuations (stopping at the first end-of-text), by enumeration."""
    best, best_lp = None, -math.inf
    for seq in itertools.product(range(model.vocab_size), repeat=length):
        if 0 in seq and any(t != 0 for t in seq[seq.index(0) :]):
            continue  # after the first end-of-text only end-of-text (at no cost) follows
        lp, prefix = 0.0, ()
        for t in seq:
            if prefix and prefix[-1] == 0:
                break
            lp += float(torch.log_softmax(model.logits(prefix).double(), -1)[t])
            prefix += (t,)
        if lp > best_lp:
            best, best_lp = list(seq[: seq.index(0)] if 0 in seq else seq), lp
    return best, best_lp


@pytest.mark.parametrize("seed", [1206, 2712, 31337])
def test_beam_search_is_exact_when_wide_and_greedy_when_narrow(seed):
    V, L = 3, 3
    model = TableModel(V, seed)
    z = torch.zeros(1, 4)
    want, want_lp = brute_force(model, L)
    (got,), lp = beam_search(model, z, L, beams=V ** (L - 1), batch_size=1)  # keeps every live prefix: exact
    assert got == want and lp[0] == pytest.approx(want_lp), seed
    greedy, prefix = [], ()
    for _ in range(L):  # greedy by hand
        t = int(model.logits(prefix).argmax())
        prefix += (t,)
        if t == 0:
            break
        greedy.append(t)
    (got1,), _ = beam_search(model, z, L, beams=1, batch_size=1)
    assert got1 == greedy, seed
    model.banned = (want[0],) if want else (1,)
    (got_b,), _ = beam_search(model, z, L, beams=4, batch_size=1)
    assert model.banned[0] not in got_b, seed


def test_run_rejects_bad_arguments(tmp_path, capsys):
    assert captions_run.main(["--variants", "causal,nope", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err
    assert (
        captions_run.main(
            ["--variant", "causal", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cpu"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bundle.json" in err
    fast_on_cpu = [
        "--variant",
        "ar",
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cpu",
        "--fast",
    ]
    assert captions_run.main(fast_on_cpu) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--fast" in err and "cuda" in err


def test_ar_decoding_step_matches_teacher_forcing_and_ignores_padding():
    seed = 61206
    torch.manual_seed(seed)
    m = PrefixCaptioner(1, 64, 40, prefix_len=3, seed=seed, wkv_backend="reference")
    with torch.no_grad():  # a fresh init zeroes output projections: perturb so every path matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    z, ids = torch.randn(3, 32), torch.randint(1, 40, (3, 6))
    t = int(torch.randint(0, 6, ()).item())
    step = m.next_logits(z, ids[:, :t])
    assert torch.allclose(step, m.next_logits(z, ids[:, :t], pad_to=9), atol=1e-5), seed
    assert torch.allclose(step, m(z, ids)[:, t], atol=1e-5), seed  # logits for token t given tokens < t
    other = m.next_logits(torch.randn(3, 32), ids[:, :t])
    assert not torch.allclose(step, other, atol=1e-4), seed  # the latent prefix conditions the prediction


def test_l2t_decoder_specs_parse_and_refuse_in_one_line():
    from types import SimpleNamespace

    spec = "ancestral:32, confidence:16:g1.5,confidence:1:b1:t0,threshold:4:b8:g2,confidence:8:t0.5"
    spec += ",confidence:1:r4:t0:s0.5"
    ok = SimpleNamespace(l2t_decoders=spec, sample_steps=8)
    assert captions_diffusion.l2t_decoders(ok) == [
        ("ancestral", 32, 0.0, None, 1.0, 1, None),
        ("confidence", 16, 1.5, None, 1.0, 1, None),
        ("confidence", 1, 0.0, 1, 0.0, 1, None),
        ("threshold", 4, 2.0, 8, 1.0, 1, None),
        ("confidence", 8, 0.0, None, 0.5, 1, None),
        ("confidence", 1, 0.0, None, 0.0, 4, 0.5),
    ]
    assert [captions_diffusion.decoder_name(*d) for d in captions_diffusion.l2t_decoders(ok)] == [
        "ancestral32",
        "confidence16-g1.5",
        "confidence1-b1-t0",
        "threshold4-g2-b8",
        "confidence8-t0.5",
        "confidence1-t0-r4-s0.5",
    ]
    assert captions_diffusion.l2t_decoders(SimpleNamespace(l2t_decoders="", sample_steps=8)) == [
        ("confidence", 8, 0.0, None, 1.0, 1, None)
    ]
    bads = ("confidence", "greedy:8", "confidence:0", "confidence:8:x1", "confidence:8:g-1", "confidence:8:g1:z",
            "confidence:8:b0", "confidence:8:bx", "confidence:8:gx", "confidence:8:g1:g2", "confidence:8:r0",
            "confidence:8:s0.5", "confidence:8:r2:s0", "confidence:8:rx", "confidence:8:r2:snan", "confidence:8:tinf",
            "confidence:8:t-1")  # fmt: skip
    for bad in bads:
        with pytest.raises(SystemExit, match="expected STRATEGY:STEPS"):
            captions_diffusion.l2t_decoders(SimpleNamespace(l2t_decoders=bad, sample_steps=8))


def test_step_budget_trains_exactly_that_many_timed_steps_and_the_lr_follows_steps():
    from types import SimpleNamespace

    from captions_common import StepClock, TimeCosineLR, train_for_budget

    n = int(np.random.default_rng(1206).integers(5, 40))
    opt = SimpleNamespace(param_groups=[{"lr": 0.0}])
    clock = StepClock()
    sched = TimeCosineLR(opt, 1.0, 1, n, 0.1, clock)
    lrs = []

    def step():
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
        return {"loss": 1.0}

    tr = train_for_budget(step, n, clock, untimed_steps=2)
    assert (tr["steps"], tr["timed_steps"], tr["train_s"]) == (n + 2, n, n), (n, tr)
    assert tr["wall_s"] >= 0
    # timed step j (0-based) runs at the cosine of j / n: full lr first, falling monotonically to near the floor
    timed = lrs[2:]
    want = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * j / n)) for j in range(n)]
    assert timed == pytest.approx(want), n


def test_set_overrides_parse_into_config_keys_and_bad_ones_are_one_line(tmp_path, capsys):
    got = captions_diffusion.parse_overrides(["model.latent_prefix_len=4", "diffusion.text_weighting=uniform",
                                        "training.mixed_weights={\"l2t\": 2, \"t2l\": 1}"])  # fmt: skip
    assert got == [("model", "latent_prefix_len", 4), ("diffusion", "text_weighting", "uniform"),
                   ("training", "mixed_weights", {"l2t": 2, "t2l": 1})]  # fmt: skip
    args = captions_run.build_parser().parse_args(
        ["--variant", "causal", "--data", "x", "--out", "y", "--set", "model.latent_prefix_len=3"]
    )
    cfg = captions_diffusion.diffusion_config("elbo", args, tmp_path, tmp_path)  # elbo: not the default weighting
    assert cfg.model.latent_prefix_len == 3 and cfg.diffusion.text_weighting == "elbo"  # variant + override
    for bad in (["--set", "model.no_such_key=1"], ["--set", "latent_prefix_len=4"], ["--tag", "a/b"], ["--tag=-p4"]):
        argv = ["--variant", "causal", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *bad]
        assert captions_run.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: --"), err


def test_budget_clock_pause_is_not_budget_time(monkeypatch):
    import time
    from types import SimpleNamespace

    from captions_common import BudgetClock

    # a slow validation pass of the early stopping: recorded at the budget time it began, and not charged to it
    def slow_nll(*a, **k):
        time.sleep(0.3)
        return {"val_nll_bits": 1.0}

    monkeypatch.setattr(captions_ar, "ar_nll_bits", slow_nll)
    torch.manual_seed(1206)
    model = torch.nn.Linear(2, 2)
    args = SimpleNamespace(ar_early_stop=0.01, dtype="fp32", eval_batch=4)
    stop = EarlyStop(model, torch.zeros(3, 2), torch.zeros(3, 2), args)
    clock = BudgetClock()
    clock.start()
    time.sleep(0.02)
    stop(1, clock)
    assert len(stop.curve) == 1 and 0.02 <= stop.curve[0]["t"] < 0.2 and clock.elapsed() < 0.2, stop.curve

    clock = BudgetClock()
    with clock.paused():  # before the start: nothing to shift
        pass
    clock.start()
    with clock.paused():
        time.sleep(0.2)
    assert clock.elapsed() < 0.15, clock.elapsed()


def test_ar_early_stop_keeps_the_best_validation_weights_and_restores_them():
    from types import SimpleNamespace

    from captions_common import StepClock

    seed = 71206
    g = torch.Generator().manual_seed(seed)
    model = PrefixCaptioner(1, 64, 50, prefix_len=2, seed=seed % 1000)
    ids, z = torch.randint(0, 50, (12, 8), generator=g), torch.randn(12, 32, generator=g)
    args = SimpleNamespace(ar_early_stop=2.0, dtype="fp32", eval_batch=5)
    stop = EarlyStop(model, ids, z, args)
    clock = StepClock()
    clock.start()
    snapshots, nlls = [], []
    for step in range(1, 9):  # a "training" that moves the weights at random; validation every 2 steps
        clock.tick()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        before = len(stop.curve)
        stop(step, clock)
        if len(stop.curve) > before:
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
            nlls.append(ar_nll_bits(model, ids, z, "fp32")["val_nll_bits"])
    stop(8, clock, True)  # the final call at an already validated step adds nothing
    assert [c["step"] for c in stop.curve] == [2, 4, 6, 8], stop.curve
    assert [c["val_nll_bits"] for c in stop.curve] == pytest.approx(nlls, abs=1e-4), seed
    info = stop.finish()
    best = int(np.argmin(nlls))
    assert info["restored_val_nll_bits"] == pytest.approx(nlls[best], abs=1e-4), (seed, info)
    assert info["chosen"]["step"] == 2 * (best + 1), (seed, info)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[best][k]), (seed, k)
    with pytest.raises(RunError, match="no validation rows"):
        EarlyStop(model, ids[:0], z[:0], args)


def test_ar_early_stop_survives_non_finite_passes(monkeypatch, tmp_path):
    """A NaN validation pass is recorded as null (the JSON allows no NaN) and never chosen; with no finite pass at
    all the last weights stay and nothing is chosen."""
    from types import SimpleNamespace

    from captions_common import StepClock, write_json_atomic

    values = iter([float("nan"), 2.0, float("nan"), 1.5, float("nan")])
    monkeypatch.setattr(captions_ar, "ar_nll_bits", lambda *a, **k: {"val_nll_bits": next(values)})
    torch.manual_seed(1206)
    model = torch.nn.Linear(2, 2)
    args = SimpleNamespace(ar_early_stop=1.0, dtype="fp32", eval_batch=4)
    stop = EarlyStop(model, torch.zeros(3, 2), torch.zeros(3, 2), args)
    clock = StepClock()
    clock.start()
    for step in range(1, 5):
        clock.tick()
        stop(step, clock)
    info = stop.finish()  # its own pass after the restore draws the last value: NaN -> null
    assert [c["val_nll_bits"] for c in info["curve"]] == [None, 2.0, None, 1.5]
    assert info["chosen"]["step"] == 4 and info["restored_val_nll_bits"] is None
    write_json_atomic(tmp_path / "es.json", info)  # serialisable: the JSON writer refuses NaN
    nan_only = EarlyStop(model, torch.zeros(3, 2), torch.zeros(3, 2), args)
    monkeypatch.setattr(captions_ar, "ar_nll_bits", lambda *a, **k: {"val_nll_bits": float("nan")})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nan_only(1, clock, True)
    info = nan_only.finish()
    assert info["chosen"] is None and info["restored_val_nll_bits"] is None and info["passes"] == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pretrained_variants_adapt_a_saved_backbone(tmp_path):
    """--backbone FILE: the five ways of adapting a pretrained RWKV-7 run through the Trainer on its World vocabulary,
    each recording the backbone's sha256, with the trainable parameter counts each recipe implies."""
    from rwkv_diffusion_rnn.checkpoints import file_sha256
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7
    from rwkv_diffusion_rnn.pretrained_rwkv import save_pth

    rng = np.random.default_rng(7)
    enc = BowEncoder()
    args = write_inputs(tmp_path, rng, n_train=64, n_img=4, n_pairs=4, enc=enc)
    prep.build(args, encoder=enc)
    bb = tmp_path / "bb.pth"
    save_pth(random_rwkv7(RWKV7Config.for_shape(1, 64), seed=3).state_dict(), bb)
    out = tmp_path / "runs"
    variants = ["frozen", "lmhead", "lora", "unfreeze", "full"]
    argv = ["--variants", ",".join(variants), "--backbone", str(bb), "--data", args.out, "--out", str(out),
            "--device", "cpu", "--dtype", "fp32", "--batch", "8", "--budget-steps", "3", "--length", "16",
            "--sample-steps", "2", "--t2l-steps", "1", "--eval-batch", "16", "--lora-rank", "4",
            "--unfreeze-after", "2"]  # fmt: skip
    assert captions_run.main(argv) == 0
    res = {v: json.loads((out / f"{v}.json").read_text()) for v in variants}
    n = {v: r["model"]["trainable_params"] for v, r in res.items()}
    head = 65536 * 64  # the fresh text head over the World vocabulary
    assert n["lmhead"] < n["frozen"] - head + 65536  # no fresh head (its bias at most)
    assert n["frozen"] < n["lora"] < n["full"], n  # adapters on top of the frozen recipe; everything in full
    assert n["unfreeze"] == n["frozen"], n  # counted at the start: the blocks unfreeze at step 2
    for v, r in res.items():
        assert r["model"]["backbone"] == {"path": str(bb), "sha256": file_sha256(bb)}, v
        assert r["model"]["vocab_size"] == 65536 and r["train"]["timed_steps"] == 3, v
        rows = next(iter(r["l2t"].values()))["world_ids"]
        assert len(rows) == 4 and all(0 < i < 65536 for row in rows for i in row), v
    assert captions_run.main(["--variants", "frozen", "--data", args.out, "--out", str(tmp_path / "x"),
                              "--device", "cpu", "--budget-steps", "1"]) == 1  # fmt: skip
