"""Tokenization: ids identical to BlinkDL's tokenizer, the original scripts' command line, naming, truncation,
resume."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rwkv_diffusion_rnn import cli, load_tokenizer
from rwkv_diffusion_rnn.preprocess_tokenize_text import _encode_rowwise, encode_texts
from tests.conftest import real_text_lines
from tests.data_helpers import REPO, make_dataset


@pytest.fixture(scope="module")
def trie():
    rt = pytest.importorskip("rwkv.rwkv_tokenizer")
    return rt.TRIE_TOKENIZER(os.path.join(os.path.dirname(rt.__file__), "rwkv_vocab_v20230424.txt"))


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghij KLMNOP,.;!?'\"-\n\t0123456789éüß日本語Привет🐶🇫🇷\x1e\x7f"
    words = ["the", " the", "dog", "ing", "tion", " and", "\n\n", "  ", "http://", "1234", "😀", "Überall"]
    out = []
    for _ in range(n):
        parts = [rng.choice(words) if rng.random() < 0.5 else rng.choice(alphabet) for _ in range(rng.randint(1, 40))]
        out.append("".join(parts))
    return out


def _rows(flat, offsets):
    return [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def test_fast_path_matches_blinkdl_trie_tokenizer(trie, monkeypatch):
    import rwkv_diffusion_rnn.preprocess_tokenize_text as mod

    monkeypatch.setattr(mod, "_encode_rowwise", lambda *a: pytest.fail("fast path not taken"))
    tok = load_tokenizer("BlinkDL/rwkv7-g1")
    texts = random_texts(3000, seed=random.randrange(10**6))
    flat, offsets = encode_texts(tok, texts, chunk_rows=700)  # several chunks, one partial
    assert flat.dtype == np.int32 and offsets.dtype == np.int64 and offsets[-1] == len(flat)
    assert _rows(flat, offsets) == [trie.encode(t) for t in texts]


def test_real_captions_match_trie_tokenizer(trie):
    texts = real_text_lines(2000)
    flat, offsets = encode_texts(load_tokenizer("rwkv-world"), texts)
    assert _rows(flat, offsets) == [trie.encode(t) for t in texts]


def test_separator_in_text_falls_back_to_rowwise(trie):
    tok = load_tokenizer("rwkv-world")
    texts = ["plain text", "has a \x1f unit separator", "\x1f", "end"]
    flat, offsets = encode_texts(tok, texts)
    assert _rows(flat, offsets) == [trie.encode(t) for t in texts]
    f2, o2 = _encode_rowwise(tok, texts)
    assert np.array_equal(flat, f2) and np.array_equal(offsets, o2)


def test_original_command_line_writes_paired_npz(tmp_path):
    d = make_dataset(tmp_path, n=9, tokenize=False)
    out = tmp_path / "rwkv_tokens"
    cmd = [sys.executable, "rwkv_diffusion_rnn/preprocess_tokenize_text.py", "--json_path", str(d["json"])]
    cmd += ["--output_dir", str(out), "--tokenizer", "BlinkDL/rwkv7-g1", "--max_length", "512"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["rows"] == 9 and summary["truncated"] == 0 and summary["complete"]
    tok = load_tokenizer("rwkv-world")
    rows = json.loads(d["json"].read_text())
    assert sorted(p.name for p in (out / "train").glob("*.npz")) == [Path(r["latent_path"]).stem + ".npz" for r in rows]
    for r in rows:
        z = np.load(out / "train" / (Path(r["latent_path"]).stem + ".npz"))
        assert z["input_ids"].tolist() == tok.encode(r["text"])
        assert z["attention_mask"].tolist() == [1] * len(z["input_ids"])  # no padding stored


def test_rows_without_latent_path_are_named_by_row(tmp_path):
    js = tmp_path / "validation_data.json"
    js.write_text(json.dumps([{"text": "first row"}, {"text": "second row"}]))
    assert cli.main(["tokenize", "--json_path", str(js), "--output_dir", str(tmp_path / "t")]) == 0
    assert sorted(p.name for p in (tmp_path / "t" / "validation").glob("*.npz")) == ["00000000.npz", "00000001.npz"]


def test_truncation_is_counted(tmp_path):
    rng = np.random.default_rng(5)
    texts = [" ".join(["x"] * int(k)) for k in rng.integers(1, 40, size=30)]
    d = make_dataset(tmp_path, n=30, texts=texts, tokenize=False)
    tok = load_tokenizer("rwkv-world")
    full = [len(tok.encode(t)) for t in texts]
    assert (
        cli.main(["tokenize", "--json_path", str(d["json"]), "--output_dir", str(tmp_path / "t"), "--max_length", "20"])
        == 0
    )
    meta = json.loads((tmp_path / "t" / "train" / "_meta.json").read_text())
    assert meta["truncated"] == sum(n > 20 for n in full)
    assert meta["lengths"] == [min(n, 20) for n in full]
    for i, n in enumerate(full):
        assert len(np.load(tmp_path / "t" / "train" / f"{i:08d}.npz")["input_ids"]) == min(n, 20)


def test_resume_writes_only_missing_files_and_other_settings_are_refused(tmp_path, capsys):
    d = make_dataset(tmp_path, n=20, tokenize=False)
    args = ["tokenize", "--json_path", str(d["json"]), "--output_dir", str(tmp_path / "t")]
    assert cli.main(args) == 0
    folder = tmp_path / "t" / "train"
    gone = [folder / f"{i:08d}.npz" for i in (3, 11, 17)]
    kept = folder / "00000005.npz"
    stamp = kept.stat().st_mtime_ns
    for p in gone:
        p.unlink()
    capsys.readouterr()
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 3
    assert all(p.exists() for p in gone) and kept.stat().st_mtime_ns == stamp
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert cli.main([*args, "--max_length", "4"]) == 2  # other settings: refused, nothing touched
    assert "expected an empty folder, the same settings (resume), or --overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert cli.main([*args, "--max_length", "4", "--overwrite"]) == 0
    assert max(len(np.load(p)["input_ids"]) for p in folder.glob("*.npz")) <= 4
