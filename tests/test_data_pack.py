"""diffrwkv pack: the packed arrays hold exactly the per-row files, atomically written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rwkv_diffusion_rnn import cli
from rwkv_diffusion_rnn.data_io import LatentStats
from rwkv_diffusion_rnn.data_pack import pack_dataset
from rwkv_diffusion_rnn.errors import DiffRwkvError
from tests.data_helpers import make_dataset


def test_pack_contents(tmp_path):
    d = make_dataset(tmp_path, n=25, seed=417)
    meta = pack_dataset(str(d["json"]), str(d["token_dir"]), str(tmp_path / "p"), chunk_rows=7)  # several chunks
    p = tmp_path / "p"
    assert meta["count"] == 25 and meta["token_dtype"] == "uint16"
    tokens, offsets = np.load(p / "tokens.npy"), np.load(p / "offsets.npy")
    latents, rows = np.load(p / "latents.npy"), json.loads(d["json"].read_text())
    text_bytes, text_offsets = np.load(p / "text_bytes.npy"), np.load(p / "text_offsets.npy")
    assert tokens.dtype == np.uint16 and offsets[0] == 0 and offsets[-1] == len(tokens) == meta["num_tokens"]
    for i in range(25):
        ids = np.load(d["token_dir"] / f"{i:08d}.npz")["input_ids"]
        assert tokens[offsets[i] : offsets[i + 1]].tolist() == ids.tolist()
        assert bytes(text_bytes[text_offsets[i] : text_offsets[i + 1]]).decode() == rows[i]["text"]
    np.testing.assert_array_equal(latents, d["latents"])
    np.testing.assert_array_equal(np.load(p / "source_rows.npy"), np.arange(25))
    assert (
        LatentStats.load(p / "latent_stats.json").to_dict()
        == LatentStats.load(d["data"] / "latent_stats.json").to_dict()
    )
    assert not (tmp_path / "p.partial").exists()


def test_pack_without_saved_stats_computes_them(tmp_path):
    d = make_dataset(tmp_path, n=10)
    (d["data"] / "latent_stats.json").unlink()
    pack_dataset(str(d["json"]), str(d["token_dir"]), str(tmp_path / "p"))
    np.testing.assert_allclose(
        LatentStats.load(tmp_path / "p" / "latent_stats.json").mean, d["latents"].mean(0), atol=1e-7
    )


def test_skip_packs_good_rows_and_maps_them_back(tmp_path, capsys):
    d = make_dataset(tmp_path, n=10)
    np.save(d["latent_dir"] / "00000004.npy", np.full(32, np.nan, np.float32))
    out = tmp_path / "p"
    args = ["pack", "--json_path", str(d["json"]), "--token_dir", str(d["token_dir"]), "--output_dir", str(out)]
    assert cli.main(args) == 2 and not out.exists()
    assert cli.main([*args, "--on-bad-sample", "skip"]) == 0
    err = capsys.readouterr().err
    assert "skipped: " in err and "row 4" in err
    assert np.load(out / "source_rows.npy").tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    np.testing.assert_array_equal(np.load(out / "latents.npy")[4], d["latents"][5])


def test_existing_pack_is_kept_unless_overwrite(tmp_path):
    d = make_dataset(tmp_path, n=5)
    pack_dataset(str(d["json"]), str(d["token_dir"]), str(tmp_path / "p"))
    before = (tmp_path / "p" / "latents.npy").read_bytes()
    with pytest.raises(DiffRwkvError, match="folder exists and is not empty"):
        pack_dataset(str(d["json"]), str(d["token_dir"]), str(tmp_path / "p"))
    assert (tmp_path / "p" / "latents.npy").read_bytes() == before
    pack_dataset(str(d["json"]), str(d["token_dir"]), str(tmp_path / "p"), overwrite=True)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p", "qwen_32d", "rwkv_tokens"]
