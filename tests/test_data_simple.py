"""The dataset and loader: pairing, padding, split, truncation, samplers, stats, both layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rwkv_diffusion_rnn import cli, load_tokenizer
from rwkv_diffusion_rnn.data_io import LatentStats, split_keys
from rwkv_diffusion_rnn.data_simple import (
    DataConfig,
    LengthBucketBatchSampler,
    build_datasets,
    build_loader,
    collate_batch,
    latent_stats,
    set_epoch,
)
from tests.data_helpers import make_dataset


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path, n=40, seed=int(np.random.default_rng().integers(1000)))


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
    seed_cfg = DataConfig(token_dir=str(data["token_dir"]), latent_dir=str(data["latent_dir"]))  # the seed's keys only
    a, _ = build_datasets(seed_cfg)
    assert a.text(3) == json.loads(data["json"].read_text())[3]["text"]
    data["json"].rename(data["json"].with_name("elsewhere.json"))
    b, _ = build_datasets(seed_cfg)  # no JSON: latents and tokens pair by file name
    assert b.text(3) is None and len(b) == 40
    for i in range(40):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"]) and torch.equal(a[i]["latent"], b[i]["latent"])


def test_collate_pads_right_with_mask():
    rng = np.random.default_rng()
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
    assert cut.lengths().tolist() == [min(len(full[i]["input_ids"]), 4) + 1 for i in range(len(full))]
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
    assert np.array_equal(files.lengths(), packed.lengths())


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


def test_loader_epochs_and_ranks(data):
    cfg = _cfg(data, seed=5)
    train, _ = build_datasets(cfg)
    seen = []
    for rank in (0, 1):
        loader = build_loader(train, 4, cfg=cfg, shuffle=True, rank=rank, world_size=2)
        set_epoch(loader, 0)
        seen.append([i for b in loader for i in b["index"].tolist()])
    assert len(seen[0]) == len(seen[1]) == 20 and sorted(seen[0] + seen[1]) == list(range(40))
    loader = build_loader(train, 4, cfg=cfg, shuffle=True)
    set_epoch(loader, 0)
    e0 = [i for b in loader for i in b["index"].tolist()]
    set_epoch(loader, 0)
    assert e0 == [i for b in loader for i in b["index"].tolist()]
    set_epoch(loader, 1)
    assert e0 != [i for b in loader for i in b["index"].tolist()]


def test_length_buckets_cover_everything_and_reduce_padding():
    rng = np.random.default_rng()
    lengths = rng.integers(1, 200, size=1000)
    s = LengthBucketBatchSampler(lengths, 16, shuffle=True, seed=2, window=20)
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    pad_bucket = sum(max(lengths[b]) * len(b) for b in batches)
    perm = rng.permutation(1000)
    pad_random = sum(max(lengths[perm[i : i + 16]]) * len(perm[i : i + 16]) for i in range(0, 1000, 16))
    assert pad_bucket < 0.7 * pad_random
    s.set_epoch(1)
    assert list(s) != batches
    shards = [
        list(LengthBucketBatchSampler(lengths, 16, seed=2, num_replicas=3, rank=r, drop_last=True)) for r in range(3)
    ]
    assert len({len(x) for x in shards}) == 1
    ids = [i for x in shards for b in x for i in b]
    assert len(ids) == len(set(ids)) and all(len(b) == 16 for x in shards for b in x)


def test_bucketed_loader_uses_stored_lengths(data):
    cfg = _cfg(data, bucket_by_length=True, bucket_window=2)
    train, _ = build_datasets(cfg)
    assert train.store.lengths is not None  # from the tokenizer's _meta.json: no file read to bucket
    batches = list(build_loader(train, 5, cfg=cfg, shuffle=True))
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(40))


def test_workers_read_packed_data(data):
    out = data["root"] / "packed"
    cli.main(
        ["pack", "--json_path", str(data["json"]), "--token_dir", str(data["token_dir"]), "--output_dir", str(out)]
    )
    cfg = DataConfig(token_dir=str(out), num_workers=2)
    train, _ = build_datasets(cfg)
    loader = build_loader(train, 8, cfg=cfg, shuffle=False)
    got = torch.cat([b["latent"] for b in loader])
    assert torch.equal(got, torch.from_numpy(data["latents"]))


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
    rng = np.random.default_rng()
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
