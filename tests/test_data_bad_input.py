"""Every bad-input case of the data issue: a one-line error naming file, row and expectation from the loader; a
non-zero exit and nothing written by the commands; and check-data reports the planted problem."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from rwkv_diffusion_rnn import cli
from rwkv_diffusion_rnn.data_simple import DataConfig, build_datasets
from rwkv_diffusion_rnn.errors import DiffRwkvError
from tests.data_helpers import make_dataset, rewrite_json, tree


def _latent(d, i):
    return d["latent_dir"] / f"{i:08d}.npy"


def _tokens(d, i):
    return d["token_dir"] / f"{i:08d}.npz"


def wrong_dim(d):
    np.save(_latent(d, 3), np.ones(31, np.float32))
    return _latent(d, 3), "row 3", ["shape (31,)", "expected (32,)"]


def nan_latent(d):
    z = np.load(_latent(d, 5))
    z[7] = np.nan
    np.save(_latent(d, 5), z)
    return _latent(d, 5), "row 5", ["nan at dimension 7", "expected finite values"]


def inf_latent(d):
    z = np.load(_latent(d, 6))
    z[0] = -np.inf
    np.save(_latent(d, 6), z)
    return _latent(d, 6), "row 6", ["-inf at dimension 0", "expected finite values"]


def missing_latent(d):
    _latent(d, 2).unlink()
    return _latent(d, 2), "row 2", ["is missing", "expected a .npy file"]


def missing_tokens(d):
    _tokens(d, 4).unlink()
    return _tokens(d, 4), "row 4", ["is missing", "expected a .npz"]


def row_without_text(d):
    rewrite_json(d["json"], lambda rows: rows[1].pop("text"))
    return d["json"], "row 1", ["has no 'text'", "expected a non-empty string"]


def json_not_a_list(d):
    d["json"].write_text(json.dumps({"rows": json.loads(d["json"].read_text())}))
    return d["json"], "", ["top level is a JSON dict", "expected a JSON list of rows"]


def extra_token_file(d):
    shutil.copyfile(_tokens(d, 0), d["token_dir"] / "stale.npz")
    return d["token_dir"], "", ["13 .npz files but 12 rows", "expected one token file per row"]


def json_changed_after_tokenizing(d):
    rewrite_json(d["json"], lambda rows: rows.pop())
    return (
        d["json"],
        "",
        ["tokens were made from another version", "12 rows then, 11 now", "expected tokens of this JSON"],
    )


def empty_text(d):
    rewrite_json(d["json"], lambda rows: rows[0].update(text="   "))
    return d["json"], "row 0", ["'text' is empty", "expected a non-empty string"]


def truncated_npy(d):
    raw = _latent(d, 8).read_bytes()
    _latent(d, 8).write_bytes(raw[: len(raw) - 40])
    return _latent(d, 8), "row 8", ["cannot read latent file", "expected a complete .npy array"]


def truncated_npz(d):
    raw = _tokens(d, 9).read_bytes()
    _tokens(d, 9).write_bytes(raw[: len(raw) // 2])
    return _tokens(d, 9), "row 9", ["cannot read token file", "expected a complete .npz"]


def garbage_npz(d):
    _tokens(d, 10).write_bytes(b"this is not a zip archive")
    return _tokens(d, 10), "row 10", ["cannot read token file", "expected a complete .npz"]


def path_escape(d):
    rewrite_json(d["json"], lambda rows: rows[3].update(latent_path="../../etc/passwd"))
    return d["json"], "row 3", ["'../../etc/passwd' escapes the data folder", "expected a path inside"]


def duplicate_row(d):
    rewrite_json(d["json"], lambda rows: rows.__setitem__(7, dict(rows[2])))
    return d["json"], "row 7", ["duplicates row 2", "expected one row per latent file"]


CASES = [
    wrong_dim,
    nan_latent,
    inf_latent,
    missing_latent,
    missing_tokens,
    row_without_text,
    json_not_a_list,
    extra_token_file,
    json_changed_after_tokenizing,
    empty_text,
    truncated_npy,
    truncated_npz,
    garbage_npz,
    path_escape,
    duplicate_row,
]
JSON_LEVEL = {row_without_text, json_not_a_list, empty_text, path_escape, duplicate_row}


def _assert_one_line(msg: str, file, row: str, expect: list[str]) -> None:
    assert "\n" not in msg.strip(), msg
    assert str(file) in msg, msg
    assert row in msg, msg
    for part in expect:
        assert part in msg, msg


def _error_lines(capsys) -> list[str]:
    """The ``error: ...`` lines a command printed to stderr (progress bars aside)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


@pytest.fixture
def planted(tmp_path, request):
    d = make_dataset(tmp_path, n=12, seed=CASES.index(request.param))
    return d, request.param(d)


@pytest.mark.parametrize("planted", CASES, indirect=True, ids=[c.__name__ for c in CASES])
def test_loader_raises_one_line(planted):
    d, (file, row, expect) = planted
    cfg = DataConfig(json_path=str(d["json"]), token_dir=str(d["token_dir"]), latent_dir=str(d["latent_dir"]))
    with pytest.raises(DiffRwkvError) as info:
        train, val = build_datasets(cfg)
        for i in range(len(train)):
            train[i]
    _assert_one_line(str(info.value), file, row, expect)


@pytest.mark.parametrize("planted", CASES, indirect=True, ids=[c.__name__ for c in CASES])
def test_pack_exits_nonzero_and_writes_nothing(planted, capsys):
    d, (file, row, expect) = planted
    out = d["root"] / "packed" / "train"
    rc = cli.main(["pack", "--json_path", str(d["json"]), "--token_dir", str(d["token_dir"]), "--output_dir", str(out)])
    err = _error_lines(capsys)
    assert rc == 2 and len(err) == 1
    _assert_one_line(err[0], file, row, expect)
    assert not (d["root"] / "packed").exists() or list((d["root"] / "packed").iterdir()) == []


@pytest.mark.parametrize("planted", CASES, indirect=True, ids=[c.__name__ for c in CASES])
def test_check_data_reports_it(planted, capsys):
    d, (file, row, expect) = planted
    rc = cli.main(["check-data", str(d["data"]), "--token-dir", str(d["root"] / "rwkv_tokens")])
    out = capsys.readouterr().out
    assert rc == 1, out
    hits = [line for line in out.splitlines() if line.strip().startswith("- ") and str(file) in line and row in line]
    assert any(all(part in line for part in expect) for line in hits), out


@pytest.mark.parametrize("case", sorted(JSON_LEVEL, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_tokenize_refuses_bad_json_and_writes_nothing(tmp_path, case, capsys):
    d = make_dataset(tmp_path, n=12, tokenize=False)
    file, row, expect = case(d)
    before = tree(tmp_path)
    rc = cli.main(["tokenize", "--json_path", str(d["json"]), "--output_dir", str(tmp_path / "tok2")])
    err = _error_lines(capsys)
    assert rc == 2 and len(err) == 1
    _assert_one_line(err[0], file, row, expect)
    assert tree(tmp_path) == before  # no token folder, no metadata, nothing else touched


def test_prepare_latents_empty_line_exits_nonzero_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("A dog runs.\nA cat sleeps.\n\nA bird sings.\n")
    out = tmp_path / "out"
    rc = cli.main(["prepare-latents", "--input", str(src), "--output_dir", str(out), "--encoder", "test-hash"])
    err = _error_lines(capsys)
    assert rc == 2 and len(err) == 1
    _assert_one_line(err[0], f"{src}:3", "", ["empty text", "expected a non-empty sentence"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_prepare_latents_from_npy_nonfinite(tmp_path, capsys, bad):
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((10, 64)).astype(np.float32)
    emb[6, 11] = float(bad)
    np.save(tmp_path / "emb.npy", emb)
    (tmp_path / "t.txt").write_text("".join(f"sentence number {i}\n" for i in range(10)))
    args = [
        "--from-npy",
        str(tmp_path / "emb.npy"),
        "--input",
        str(tmp_path / "t.txt"),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    rc = cli.main(["prepare-latents", *args])
    err = _error_lines(capsys)
    assert rc == 2 and len(err) == 1
    _assert_one_line(err[0], tmp_path / "emb.npy", "row 6", ["NaN or inf", "expected finite values"])
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_prepare_latents_from_original_json_wrong_dim(tmp_path, capsys):
    d = make_dataset(tmp_path, n=8, dim=64, tokenize=False)
    np.save(_latent(d, 5), np.ones(63, np.float32))
    out = tmp_path / "o"
    rc = cli.main(["prepare-latents", "--from-npy", str(d["json"]), "--output_dir", str(out)])
    err = _error_lines(capsys)
    assert rc == 2 and len(err) == 1
    _assert_one_line(err[0], _latent(d, 5), "row 5", ["shape (63,)", "expected (64,)"])
    assert not out.exists()


def test_prepare_latents_counts_disagree(tmp_path, capsys):
    np.save(tmp_path / "emb.npy", np.ones((5, 64), np.float32))
    (tmp_path / "t.txt").write_text("one two three\nfour five six\n")
    rc = cli.main(
        [
            "prepare-latents",
            "--from-npy",
            str(tmp_path / "emb.npy"),
            "--input",
            str(tmp_path / "t.txt"),
            "--output_dir",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "5 rows but --input gives 2 texts; expected equal counts" in err
    assert not (tmp_path / "o").exists()


def test_pack_counts_disagree(tmp_path):
    d = make_dataset(tmp_path, n=6)
    out = tmp_path / "packed"
    assert (
        cli.main(["pack", "--json_path", str(d["json"]), "--token_dir", str(d["token_dir"]), "--output_dir", str(out)])
        == 0
    )
    offsets = np.load(out / "offsets.npy")
    np.save(out / "offsets.npy", offsets[:-1])  # one offset short
    with pytest.raises(DiffRwkvError, match=r"counts disagree .*expected N rows, N \+ 1 offsets"):
        build_datasets(DataConfig(token_dir=str(out)))


def test_long_text_is_truncated_and_counted_not_an_error(tmp_path):
    long_text = " ".join(["word"] * 300)
    d = make_dataset(
        tmp_path, n=4, texts=["short one here.", long_text, "two words", long_text + " more"], tokenize=False
    )
    assert (
        cli.main(
            ["tokenize", "--json_path", str(d["json"]), "--output_dir", str(tmp_path / "tok"), "--max_length", "64"]
        )
        == 0
    )
    meta = json.loads((tmp_path / "tok" / "train" / "_meta.json").read_text())
    assert meta["truncated"] == 2 and meta["lengths"][1] == 64 and meta["lengths"][0] < 64
    ds, _ = build_datasets(DataConfig(json_path=str(d["json"]), token_dir=str(tmp_path / "tok" / "train")))
    assert [len(ds[i]["input_ids"]) for i in range(4)] == meta["lengths"]


def test_skip_mode_drops_and_reports_every_bad_row(tmp_path, caplog):
    d = make_dataset(tmp_path, n=12)
    planted = [wrong_dim(d)[1], nan_latent(d)[1], missing_tokens(d)[1], truncated_npz(d)[1], missing_latent(d)[1]]
    cfg = DataConfig(json_path=str(d["json"]), token_dir=str(d["token_dir"]), on_bad_sample="skip")
    train, _ = build_datasets(cfg)
    assert len(train) == 12 - len(planted)
    assert sorted(int(r.split()[1]) for r in planted) == sorted(set(range(12)) - set(train.rows.tolist()))
    for row in planted:
        assert sum(f"{row}:" in p for p in train.problems) == 1, train.problems
    samples = [train[i] for i in range(len(train))]  # every remaining row reads cleanly
    assert all(s["latent"].shape == (32,) for s in samples)
    assert "skipped 5 of 12 rows" in caplog.text


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("data", ("num_workers", 2), "data.num_workers is 2; expected 0: training reads rows in its own process"),
        ("model", ("trust_remote_code", True), "model.trust_remote_code must be false: backbone weights are read"),
    ],
)
def test_config_keys_that_cannot_act_are_refused(key, value, expected):
    """A config key either acts or is refused with one line naming it (data.num_workers=0 keeps working)."""
    from rwkv_diffusion_rnn.config import TrainConfig, validate

    validate(TrainConfig())  # the defaults, data.num_workers=0 among them
    cfg = TrainConfig()
    setattr(getattr(cfg, key), *value)
    with pytest.raises(DiffRwkvError, match=expected) as info:
        validate(cfg)
    assert "\n" not in str(info.value)
