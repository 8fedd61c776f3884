"""diffrwkv check-data: summary of a clean dataset, every planted problem found at once, packs, discovery."""

from __future__ import annotations

import json
import shutil

import numpy as np

from rwkv_diffusion_rnn import cli
from tests.data_helpers import make_dataset, rewrite_json


def test_clean_dataset_summary(tmp_path, capsys):
    d = make_dataset(tmp_path, n=20)
    assert cli.main(["check-data", str(d["data"]), "--json"]) == 0  # token folder found beside the JSON
    report = json.loads(capsys.readouterr().out)
    (split,) = report["splits"]
    assert report["problems"] == 0 and split["rows"] == split["good_rows"] == 20
    assert sum(split["length_histogram"].values()) == 20
    assert abs(split["latent_norm"]["mean"] - 1.0) < 1e-5
    assert split["saved_stats"]["max_abs_mean_diff"] < 1e-6


def test_all_planted_problems_found_in_one_run(tmp_path, capsys):
    d = make_dataset(tmp_path, n=20)
    np.save(d["latent_dir"] / "00000001.npy", np.ones(16, np.float32))  # wrong dimension
    z = np.load(d["latent_dir"] / "00000002.npy")
    z[3] = np.inf
    np.save(d["latent_dir"] / "00000002.npy", z)  # inf
    (d["latent_dir"] / "00000003.npy").unlink()  # missing latent
    (d["token_dir"] / "00000004.npz").unlink()  # missing tokens
    (d["token_dir"] / "00000005.npz").write_bytes(b"PK\x03\x04 truncated")  # unreadable
    shutil.copyfile(d["token_dir"] / "00000000.npz", d["token_dir"] / "zzz.npz")  # extra file: counts disagree

    def edit(rows):
        rows[6]["text"] = ""  # empty text
        rows[7]["latent_path"] = "../../etc/passwd"  # escapes
        rows[8] = dict(rows[9])  # duplicate
        del rows[10]["text"]  # no text

    rewrite_json(d["json"], edit)
    assert cli.main(["check-data", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    expected = [
        "row 1: latent file", "shape (16,); expected (32,)",
        "row 2: latent file", "inf at dimension 3",
        "row 3: latent file", "is missing",
        "row 4: token file", "row 5: cannot read token file",
        "20 .npz files but 16 rows (5 not referenced",
        "row 6: 'text' is empty", "row 7: latent_path '../../etc/passwd' escapes",
        "row 9: duplicates row 8", "row 10: has no 'text'",
        "tokens were made from another version",
        "problem(s) found",
    ]  # fmt: skip
    for part in expected:
        assert part in out, (part, out)
    # JSON rows 6, 7, 9, 10 are dropped as bad; the 20 - 4 others are checked file by file
    assert "rows: 16" in out


def test_pack_problems_are_found(tmp_path, capsys):
    d = make_dataset(tmp_path, n=8)
    out = tmp_path / "packed" / "train"
    assert (
        cli.main(["pack", "--json_path", str(d["json"]), "--token_dir", str(d["token_dir"]), "--output_dir", str(out)])
        == 0
    )
    capsys.readouterr()
    assert cli.main(["check-data", str(out)]) == 0
    lat = np.load(out / "latents.npy")
    lat[6, 0] = np.nan
    np.save(out / "latents.npy", lat)
    assert cli.main(["check-data", str(tmp_path / "packed")]) == 1
    text = capsys.readouterr().out
    assert f"{out}: row 6: latent has NaN or inf; expected finite values" in text
    assert "good_rows: 7" in text


def test_not_a_dataset(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["check-data", str(tmp_path / "empty")]) == 2
    assert "no *_data.json, token folder or pack found" in capsys.readouterr().err
    assert cli.main(["check-data", str(tmp_path / "missing")]) == 2
