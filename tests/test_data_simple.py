"""The dataset and the trainer's batches: pairing, padding, split, truncation, sample order, stats, both layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rwkv_diffusion_rnn import cli, load_tokenizer
from rwkv_diffusion_rnn.data_io import LatentStats, split_keys
from rwkv_diffusion_rnn.data_simple import (
    DataConfig,
    build_datasets,
    collate_batch,
    latent_stats,
    shard_rows,
    stream_rows,
)
from tests.data_helpers import make_dataset


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path, n=40, seed=17)


def _cfg(d, **kw):
    return DataConfig(json_path=str(d["json"]), token_dir=str(d["token_dir"]), latent_dir=str(d["latent_dir"]), **kw)


def test_samples_pair_text_tokens_and_latent(data):
    train, val = build_datasets(_cfg(data))
    assert len(train) == 40 and len(val) == 0
    tok = load_tokenizer("rwkv-world")
    rows = json.loads(data["json"].read_text())
    for i in range(len(train)):
        s = train[i]
        assert s["index"] == i and train.text(i) == rows[i]["text"]
        assert s["input_ids"].dtype == torch.long and s["input_ids"].tolist() == tok.encode(rows[i]["text"])
        assert s["latent"].dtype == torch.float32 and torch.equal(s["latent"], torch.from_numpy(data["latents"][i]))


def test_json_found_from_latent_dir_and_pairing_without_json(data):
    # only the keys the original rwkv_diffusion_rnn config had
    orig_cfg = DataConfig(token_dir=str(data["token_dir"]), latent_dir=str(data["latent_dir"]))
    a, _ = build_datasets(orig_cfg)
    assert a.text(3) == json.loads(data["json"].read_text())[3]["text"]
    data["json"].rename(data["json"].with_name("elsewhere.json"))
    b, _ = build_datasets(orig_cfg)  # no JSON: latents and tokens pair by file name
    assert b.text(3) is None and len(b) == 40
    for i in range(40):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"]) and torch.equal(a[i]["latent"], b[i]["latent"])


def test_collate_pads_right_with_mask():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 30, size=7)
    samples = [
        {"input_ids": torch.from_numpy(rng.integers(1, 65536, size=n)), "latent": torch.randn(32), "index": int(k)}
        for k, n in enumerate(lengths)
    ]
    for pad in (0, 7):
        b = collate_batch(samples, pad_id=pad)
        assert b["input_ids"].shape == (7, lengths.max()) and b["input_ids"].dtype == torch.long
        assert b["latent"].shape == (7, 32) and b["latent"].dtype == torch.float32
        assert b["index"].tolist() == list(range(7))
        for i, s in enumerate(samples):
            n = int(lengths[i])
            assert torch.equal(b["input_ids"][i, :n], s["input_ids"])
            assert (b["input_ids"][i, n:] == pad).all()
            assert b["attention_mask"][i].tolist() == [1] * n + [0] * (lengths.max() - n)


def test_split_is_deterministic_disjoint_and_stable_when_rows_are_added():
    keys = [f"k{i}" for i in range(1000)]
    tr, va = split_keys(keys, 0.1, seed=3)
    assert len(va) == 100 and len(set(tr) | set(va)) == 1000 and not set(tr) & set(va)
    tr2, va2 = split_keys(keys, 0.1, seed=3)
    assert np.array_equal(va, va2)
    _, va_other = split_keys(keys, 0.1, seed=4)
    assert len(set(va) & set(va_other)) < 40
    _, va_more = split_keys(keys + [f"new{i}" for i in range(100)], 0.1, seed=3)  # 110 of 1100
    kept = {keys[i] for i in va} & {(keys + [f"new{i}" for i in range(100)])[i] for i in va_more}
    assert len(kept) >= 80  # hashing: old rows keep their side (a reshuffle would keep ~10 of 100)


def test_build_datasets_split_and_max_samples(data):
    train, val = build_datasets(_cfg(data, validation_fraction=0.25, seed=1))
    assert (len(train), len(val)) == (30, 10) and not set(train.rows) & set(val.rows)
    again, val2 = build_datasets(_cfg(data, validation_fraction=0.25, seed=1))
    assert np.array_equal(val.rows, val2.rows)
    small, small_val = build_datasets(_cfg(data, validation_fraction=0.25, seed=1, max_samples=4))
    assert small.rows.tolist() == train.rows[:4].tolist() and small_val.rows.tolist() == val.rows[:4].tolist()


def test_sibling_validation_split_is_used(tmp_path):
    make_dataset(tmp_path, n=10, seed=1)
    v = make_dataset(tmp_path, n=6, seed=2, split="validation")
    cfg = DataConfig(
        token_dir=str(tmp_path / "rwkv_tokens" / "train"), latent_dir=str(tmp_path / "qwen_32d" / "latents" / "train")
    )
    train, val = build_datasets(cfg)
    assert (len(train), len(val)) == (10, 6)
    assert torch.equal(val[5]["latent"], torch.from_numpy(v["latents"][5]))


def test_max_length_and_append_eot(data):
    full, _ = build_datasets(_cfg(data))
    cut, _ = build_datasets(_cfg(data, max_length=5, append_eot=True))
    for i in range(len(full)):
        ids = full[i]["input_ids"]
        assert cut[i]["input_ids"].tolist() == ids[:4].tolist() + [0]
    with pytest.raises(Exception, match="max_length is 1; expected >= 2"):
        build_datasets(_cfg(data, max_length=1, append_eot=True))


def test_upstream_padded_token_files_are_unpadded(tmp_path):
    d = make_dataset(tmp_path, n=3)
    ids = np.load(d["token_dir"] / "00000001.npz")["input_ids"]
    padded = np.zeros((1, 16), np.int64)
    padded[0, : len(ids)] = ids
    mask = (np.arange(16) < len(ids)).astype(np.int64)[None]
    np.savez(d["token_dir"] / "00000001.npz", input_ids=padded, attention_mask=mask)
    ds, _ = build_datasets(_cfg(d))
    assert ds[1]["input_ids"].tolist() == ids.tolist()


def test_packed_layout_reads_identically(data):
    out = data["root"] / "packed"
    assert (
        cli.main(
            ["pack", "--json_path", str(data["json"]), "--token_dir", str(data["token_dir"]), "--output_dir", str(out)]
        )
        == 0
    )
    files, _ = build_datasets(_cfg(data))
    packed, _ = build_datasets(DataConfig(token_dir=str(out)))
    assert packed.store.kind == "packed" and len(packed) == len(files)
    for i in range(len(files)):
        a, b = files[i], packed[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["latent"], b["latent"])
        assert a["index"] == b["index"] and files.text(i) == packed.text(i)
    assert np.array_equal(files.store.lengths, packed.store.lengths)  # tokenizer metadata == pack offsets


def test_latent_stats_saved_or_computed(data):
    train, _ = build_datasets(_cfg(data))
    saved = latent_stats(train)
    ref = LatentStats.compute(data["latents"])
    np.testing.assert_allclose(saved.mean, ref.mean, atol=1e-7)
    (data["data"] / "latent_stats.json").unlink()
    computed = latent_stats(train)
    np.testing.assert_allclose(computed.std, ref.std, rtol=1e-6)
    z = torch.from_numpy(data["latents"])
    back = computed.unstandardize(computed.standardize(z))
    assert torch.allclose(back, z, atol=1e-6)
    np.testing.assert_allclose(computed.standardize(data["latents"]).std(0, ddof=1), 1.0, rtol=1e-4)


def _rank_batches(ds, seed, step, global_batch, accum, world, rank):
    """The trainer's micro-batches of ``step`` for ``rank`` (improved_trainer.Trainer.rank_rows + collate)."""
    rows = stream_rows(seed, len(ds), step * global_batch, global_batch)
    return [collate_batch([ds[int(i)] for i in mine]) for mine in shard_rows(rows, accum, world, rank)]


def test_training_batches_cover_each_epoch_across_ranks(data):
    train, _ = build_datasets(_cfg(data))
    seen = [[], []]
    for step in range(5):  # 5 steps x global batch 8 = one epoch of 40 rows
        for rank in (0, 1):
            for b in _rank_batches(train, 5, step, 8, 2, 2, rank):
                assert b["input_ids"].shape[0] == 2 and b["latent"].shape == (2, 32)
                seen[rank] += b["index"].tolist()
    assert len(seen[0]) == len(seen[1]) == 20 and sorted(seen[0] + seen[1]) == list(range(40))
    one = [i for step in range(5) for b in _rank_batches(train, 5, step, 8, 1, 1, 0) for i in b["index"].tolist()]
    assert sorted(one) == list(range(40))
    again = [i for step in range(5) for b in _rank_batches(train, 5, step, 8, 1, 1, 0) for i in b["index"].tolist()]
    assert one == again  # a function of the seed
    nxt = [i for step in range(5, 10) for b in _rank_batches(train, 5, step, 8, 1, 1, 0) for i in b["index"].tolist()]
    assert sorted(nxt) == list(range(40)) and nxt != one  # the next epoch: every row again, another order


def test_packed_rows_batch_in_order(data):
    out = data["root"] / "packed"
    cli.main(
        ["pack", "--json_path", str(data["json"]), "--token_dir", str(data["token_dir"]), "--output_dir", str(out)]
    )
    train, _ = build_datasets(DataConfig(token_dir=str(out)))
    got = torch.cat([collate_batch([train[i] for i in range(lo, lo + 8)])["latent"] for lo in range(0, 40, 8)])
    assert torch.equal(got, torch.from_numpy(data["latents"]))


def test_num_workers_other_than_zero_is_refused(data):
    from rwkv_diffusion_rnn.errors import DiffRwkvError

    build_datasets(_cfg(data, num_workers=0))
    with pytest.raises(DiffRwkvError, match=r"^data.num_workers is 2; expected 0: training reads rows in its own"):
        build_datasets(_cfg(data, num_workers=2))


def test_pad_with_eot_makes_fixed_length_rows():
    import torch

    from rwkv_diffusion_rnn.data_simple import collate_batch, pad_with_eot

    rows = [torch.randint(1, 1000, (n,)) for n in (3, 7, 1)]
    batch = collate_batch([{"input_ids": r, "latent": torch.zeros(4), "index": i} for i, r in enumerate(rows)])
    out = pad_with_eot(batch, 6)
    assert out["input_ids"].shape == (3, 6) and bool(out["attention_mask"].all())
    assert out["input_ids"][0].tolist() == rows[0].tolist() + [0, 0, 0]
    assert out["input_ids"][1].tolist() == rows[1][:5].tolist() + [0]  # cut, still ends with end-of-text
    assert out["input_ids"][2].tolist() == rows[2].tolist() + [0] * 5


@pytest.mark.parametrize("kw,pad_to", [({}, None), ({"max_length": 5, "append_eot": True}, None), ({}, 9)])
def test_device_rows_equal_collated_batches(data, kw, pad_to):
    """DeviceRows.batch(rows) is the collated (and, with pad_to_length, end-of-text padded) batch of those rows."""
    from rwkv_diffusion_rnn.data_simple import DeviceRows, pad_with_eot

    ds, _ = build_datasets(_cfg(data, **kw))
    cache = DeviceRows(ds, "cpu", pad_to)
    rng = np.random.default_rng(11)
    for _ in range(5):
        rows = rng.choice(len(ds), size=int(rng.integers(1, 9)), replace=False)
        want = collate_batch([ds[int(i)] for i in rows])
        want = pad_with_eot(want, pad_to) if pad_to else want
        got = cache.batch(rows)
        host = got.pop("host_attention_mask")  # the mask again, on the host, for the corruption
        assert host.device.type == "cpu" and torch.equal(host, want["attention_mask"]), rows
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (k, rows)
