"""Multi-process training on CPU (gloo): FSDP2 and DDP equal one process with the whole batch; distributed (DCP)
checkpoints saved on N processes resume on M with the uninterrupted losses; the data stream is sharded without
duplicates or gaps; the strategy keys are validated."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from rwkv_diffusion_rnn.config import TrainConfig, validate
from rwkv_diffusion_rnn.data_simple import epoch_permutation, shard_rows, stream_rows
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.improved_trainer import Trainer
from tests.conftest import REPO
from tests.train_helpers import make_cfg, make_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory, "dist")


# every test: 5 steps, EMA, clipping that bites (max_grad_norm below the typical norm), 64-token rows
BASE = dict(training__max_steps=5, training__ema_decay=0.9, training__max_grad_norm=0.05, data__max_length=64,
            training__loss_type="mixed", logging__save_freq=1000)  # fmt: skip


def _torchrun(tmp_path, cfg: TrainConfig, nproc: int, name: str, *args) -> list[dict]:
    cfg_file = tmp_path / f"{name}.json"
    cfg_file.write_text(json.dumps(asdict(cfg)))
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "_ddp_worker.py"), str(cfg_file), str(out), *map(str, args)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(f"{out}.rank{i}.pt") for i in range(nproc)]


def _local(cfg: TrainConfig, save_at: int = -1) -> dict:
    """The same record as the worker, from one in-process run."""
    tr = Trainer(cfg)
    init = tr.full_trainable_tensors()
    losses, saved = [], None
    while tr.step < cfg.training.max_steps:
        losses.append(tr.train_step()["loss"])
        if tr.step == save_at:
            saved = str(tr.save())
    ema = {k: v.clone() for k, v in tr.ema.shadow.items()} if tr.ema is not None else None
    return {"tensors": tr.full_trainable_tensors(), "init": init, "losses": losses, "ema": ema, "saved": saved,
            "trainer": tr}  # fmt: skip


def _assert_same_training(ref: dict, res: dict, first_loss: int = 0) -> None:
    """Losses to fp32 rounding; each tensor's difference small next to how far training moved it (Adam normalises
    every element's step, so rounding-level gradients may move differently: see test_trainer)."""
    assert res["losses"] == pytest.approx(ref["losses"][first_loss:], rel=1e-4)
    assert res["tensors"].keys() == ref["tensors"].keys()
    for k, v in ref["tensors"].items():
        moved = (v - ref["init"][k]).norm()
        assert (res["tensors"][k] - v).norm() <= 1e-2 * moved + 1e-6, k
    if ref["ema"] is not None:
        for k, v in ref["ema"].items():
            moved = (v - ref["init"][k]).norm()
            assert (res["ema"][k] - v).norm() <= 1e-2 * moved + 1e-6, k


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """One process, the whole batch of 8, 5 uninterrupted steps (also saving a DCP checkpoint after step 3)."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = make_cfg(setup, tmp, training__train_batch_size=8, logging__checkpoint_format="dcp", **BASE)
    return _local(cfg, save_at=3)


# ----------------------------------------------------------------------------------------- FSDP2 == one process


def test_fsdp_two_processes_equal_one_with_the_doubled_batch(setup, reference, tmp_path):
    two = make_cfg(setup, tmp_path, training__train_batch_size=4, training__strategy="fsdp", **BASE)
    res = _torchrun(tmp_path, two, 2, "fsdp")
    for r in res:  # both ranks gather the same whole tensors
        _assert_same_training(reference, r)
        assert all(torch.equal(res[0]["init"][k], reference["init"][k]) for k in reference["init"])  # same start
    # the sharded data: per step the ranks' rows are disjoint and together the one-process rows
    tr = reference["trainer"]
    for step, (a, b) in enumerate(zip(res[0]["rows"], res[1]["rows"], strict=True)):
        whole = np.concatenate(tr.data.rank_rows(step))
        assert not set(sum(a, [])) & set(sum(b, []))
        assert sorted(sum(a, []) + sum(b, [])) == sorted(whole.tolist())


def test_fsdp_with_compiled_denoiser_regions_equals_one_process(setup, reference, tmp_path):
    """training.compile_denoiser under FSDP2 (the regions run on sharded parameters): the same training as one
    eager process with the whole batch."""
    two = make_cfg(setup, tmp_path, training__train_batch_size=4, training__strategy="fsdp",
                   training__compile_denoiser=True, **BASE)  # fmt: skip
    for r in _torchrun(tmp_path, two, 2, "fsdp"):
        _assert_same_training(reference, r)


def test_fsdp_frozen_backbone_lora_and_nan_skip_on_every_rank(setup, tmp_path):
    over = dict(BASE, model__freeze_backbone=True, model__lora_rank=4)
    ref = _local(make_cfg(setup, tmp_path / "one", training__train_batch_size=8, **over))
    two = make_cfg(setup, tmp_path, training__train_batch_size=4, training__strategy="fsdp", **over)
    res = _torchrun(tmp_path, two, 2, "lora", 2, 1)  # NaN on rank 1 at step 2
    assert all(not k.startswith("backbone.") for k in res[0]["tensors"])  # frozen: only LoRA, heads, conditioning
    assert any(k.startswith("lora.") for k in res[0]["tensors"])
    for r in res:
        assert r["skipped"] == [0, 0, 1, 0, 0]
        assert r["losses"][:2] == pytest.approx(ref["losses"][:2], rel=1e-4)
        assert all(math.isfinite(x) for i, x in enumerate(r["losses"]) if i != 2)
        nan = r["around_nan"]  # the bad batch left weights and Adam moments untouched on every rank
        assert all(torch.equal(nan["before"][k], nan["after"][k]) for k in nan["before"])
        assert all(torch.equal(a, b) for a, b in zip(nan["adam_before"], nan["adam_after"], strict=True))
        assert not all(torch.equal(r["tensors"][k], nan["after"][k]) for k in nan["after"])  # then it trains on
    assert all(torch.equal(res[0]["tensors"][k], res[1]["tensors"][k]) for k in res[0]["tensors"])


# ---------------------------------------------------------------------------------- N -> M checkpoint resume


def test_dcp_saved_on_two_fsdp_ranks_resumes_on_one(setup, reference, tmp_path):
    two = make_cfg(setup, tmp_path / "ck", training__train_batch_size=4, training__strategy="fsdp", **BASE)
    res = _torchrun(tmp_path, two, 2, "save2", "save_at=3")
    saved = res[0]["saved"]
    meta = json.loads(open(f"{saved}/meta.json").read())
    assert meta["layout"] == "dcp" and meta["world_size"] == 2 and meta["data_state"]["global_batch"] == 8
    assert sorted(meta["rng_ranks"]) == [0, 1]
    one = make_cfg(setup, tmp_path / "one", training__train_batch_size=8, training__resume=saved, **BASE)
    resumed = _local(one)
    assert resumed["trainer"].step == 5 and len(resumed["losses"]) == 2
    resumed["init"] = reference["init"]
    _assert_same_training(reference, resumed, first_loss=3)

    # another split of the same global batch: one process x 4 rows keeps 8 by accumulating 2 micro-steps
    four = make_cfg(setup, tmp_path / "acc", training__train_batch_size=4, training__resume=saved, **BASE)
    tr = Trainer(four)
    assert tr.cfg.training.grad_accum_steps == 2 and tr.global_batch == 8
    assert np.array_equal(np.concatenate(tr.data.rank_rows(3)), np.concatenate(reference["trainer"].data.rank_rows(3)))
    with pytest.raises(DiffRwkvError, match="global batch 8") as err:
        Trainer(make_cfg(setup, tmp_path / "bad", training__train_batch_size=3, training__resume=saved, **BASE))
    assert "\n" not in str(err.value)


def test_ddp_with_sharded_checkpoints_saved_on_two_ranks_resumes_on_one(setup, reference, tmp_path):
    """``logging.checkpoint_format=dcp`` under ddp (replicated weights): the same N -> M resume as fsdp."""
    two = make_cfg(setup, tmp_path / "ck", training__train_batch_size=4, training__strategy="ddp",
                   logging__checkpoint_format="dcp", **BASE)  # fmt: skip
    res = _torchrun(tmp_path, two, 2, "ddp_save2", "save_at=3")
    for r in res:  # ddp with 2 x 4 rows trains like one process with 8
        _assert_same_training(reference, r)
    saved = res[0]["saved"]
    meta = json.loads(open(f"{saved}/meta.json").read())
    assert meta["layout"] == "dcp" and meta["world_size"] == 2
    one = make_cfg(setup, tmp_path / "one", training__train_batch_size=8, training__resume=saved, **BASE)
    resumed = _local(one)
    assert resumed["trainer"].step == 5 and len(resumed["losses"]) == 2
    resumed["init"] = reference["init"]
    _assert_same_training(reference, resumed, first_loss=3)


def test_dcp_saved_on_one_process_resumes_on_two_fsdp_ranks(setup, reference, tmp_path):
    saved = reference["saved"]
    two = make_cfg(setup, tmp_path, training__train_batch_size=4, training__strategy="fsdp", **BASE)
    res = _torchrun(tmp_path, two, 2, "resume2", f"resume={saved}")
    for r in res:
        assert len(r["losses"]) == 2
        r["init"] = reference["init"]
        _assert_same_training(reference, r, first_loss=3)


def test_dcp_checkpoint_loads_whole_for_inference_and_refuses_a_damaged_file(setup, reference, tmp_path):
    from rwkv_diffusion_rnn.checkpoints import load_checkpoint

    ck = load_checkpoint(reference["saved"])  # gathered whole into one process
    tr = reference["trainer"]
    assert ck.step == 3 and ck.optimizer is None and set(ck.model_tensors) == set(tr.trainable_tensors())
    shard = next(p for p in (ck.path / "dcp").iterdir() if p.suffix == ".distcp")
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(ck.path, bad / ck.path.name)
    target = bad / ck.path.name / "dcp" / shard.name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DiffRwkvError, match="sha256"):
        load_checkpoint(bad / ck.path.name)


# ------------------------------------------------------------------------------------------- data sharding


@pytest.mark.parametrize("n", [16, 17, 23])
@pytest.mark.parametrize("world,batch,accum", [(1, 8, 1), (2, 4, 1), (3, 2, 2), (4, 1, 3)])
def test_stream_is_sharded_without_duplicates_or_gaps(n, world, batch, accum):
    seed = 1000 * n + 100 * world + 10 * batch + accum
    gb = world * batch * accum
    steps = 3 * n // gb + 1  # past the third epoch
    seen = []
    for step in range(steps):
        pos = np.arange(step * gb, (step + 1) * gb)
        rows = stream_rows(seed, n, step * gb, gb)
        # shard the stream positions and the rows alike: positions never repeat, so disjoint positions are the
        # proof of "no sample on two ranks"; rows repeat only where a batch spans two epochs (a row from each)
        pos_parts = [np.concatenate(shard_rows(pos, accum, world, r)) for r in range(world)]
        row_parts = [shard_rows(rows, accum, world, r) for r in range(world)]
        assert sum(len(p) for p in pos_parts) == gb and len(set(np.concatenate(pos_parts).tolist())) == gb
        for r in range(world):
            assert np.array_equal(np.concatenate(row_parts[r]), rows[pos_parts[r] - step * gb])
            assert all(len(x) == batch for x in row_parts[r])  # every rank, every micro-step: the same size
        if step * gb // n == ((step + 1) * gb - 1) // n:  # within one epoch: rows are disjoint across ranks too
            flat = [set(np.concatenate(p).tolist()) for p in row_parts]
            assert sum(len(f) for f in flat) == gb
        seen.extend(rows.tolist())
    for epoch in range(len(seen) // n):  # each epoch's n positions are that epoch's permutation, in order
        assert seen[epoch * n : (epoch + 1) * n] == epoch_permutation(seed, epoch, n).tolist()
        assert sorted(seen[epoch * n : (epoch + 1) * n]) == list(range(n))


def test_same_rows_per_micro_step_gives_the_same_global_micro_batch():
    rows = stream_rows(7, 19, 5, 24)
    one = shard_rows(rows, 3, 1, 0)
    two = [shard_rows(rows, 3, 2, r) for r in range(2)]
    for m in range(3):
        assert sorted(one[m].tolist()) == sorted(two[0][m].tolist() + two[1][m].tolist())
    with pytest.raises(DiffRwkvError):
        shard_rows(rows, 5, 1, 0)


# ------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "section,key,value,match",
    [("training", "strategy", "zero3", "training.strategy must be one of ddp, fsdp"),
     ("logging", "checkpoint_format", "pickle", "logging.checkpoint_format must be one of"),
     ("training", "dtype", "fp16", "strategy=fsdp supports"),
     ("model", "unfreeze_after_steps", 5, "unfreeze_after_steps=0")],
)  # fmt: skip
def test_strategy_keys_are_validated_in_one_line(section, key, value, match):
    cfg = TrainConfig()
    if key != "strategy":
        cfg.training.strategy = "fsdp"
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(DiffRwkvError, match=match) as err:
        validate(cfg)
    assert "\n" not in str(err.value)
    cfg.training.strategy = "ddp"
    if key in ("dtype", "unfreeze_after_steps"):
        validate(cfg)  # fine under ddp


def test_unknown_strategy_on_the_command_line_is_one_line(tmp_path):
    cmd = [sys.executable, str(REPO / "rwkv_diffusion_rnn" / "train_rwkv.py"), "training.strategy=zero3"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "training.strategy must be one of ddp, fsdp" in err[0], r.stderr
