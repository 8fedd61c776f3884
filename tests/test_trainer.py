"""The training loop on CPU with tiny random RWKV-7 backbones: every mode learns, the frozen backbone stays frozen,
resume is exact, non-finite steps are skipped everywhere, and several processes equal one with the whole batch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from rwkv_diffusion_rnn.config import TrainConfig, validate
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.improved_trainer import Trainer, resolve_flat_adamw, resolve_master_weights
from rwkv_diffusion_rnn.master_weights import MasterAdamW
from tests.conftest import REPO
from tests.train_helpers import make_cfg, make_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory, "train")


def run(trainer: Trainer, n: int) -> list[dict]:
    return [trainer.train_step() for _ in range(n)]


def fixed_loss(trainer: Trainer, mode: str) -> float:
    """The loss on fixed rows under fixed corruption (noise-free comparison before/after training)."""
    from rwkv_diffusion_rnn.data_simple import collate_batch

    batch = collate_batch([trainer.train_set[i] for i in range(len(trainer.train_set))])
    modes = dict(trainer.cfg.training.mixed_weights) if mode == "mixed" else mode
    total = 0.0
    with torch.no_grad():
        for k in range(4):
            c = trainer.objective.corrupt(batch, modes, step=k, salt=4242)
            loss, _ = trainer.objective.loss(trainer.model, c, c.counts(trainer.objective.text.weighting))
            total += float(loss)
    return total / 4


@pytest.mark.parametrize("mode", ["unconditional", "l2t", "t2l", "mixed"])
def test_every_mode_loss_falls(setup, tmp_path, mode):
    cfg = make_cfg(setup, tmp_path, training__loss_type=mode, training__max_steps=50, data__max_samples=8)
    trainer = Trainer(cfg)
    before = fixed_loss(trainer, mode)
    recs = run(trainer, 50)
    after = fixed_loss(trainer, mode)
    assert all(math.isfinite(r["loss"]) for r in recs)
    # fixed rows and fixed noise: no sampling noise in this comparison, so a 10% drop is learning, not luck
    assert after < 0.9 * before, (mode, before, after)
    if mode == "l2t":
        assert all(r["latent_loss"] == 0 for r in recs)
    if mode == "t2l":
        assert all(r["text_loss"] == 0 for r in recs)


def test_clean_prefix_rows_train_through_the_real_denoiser(setup, tmp_path):
    """diffusion.clean_prefix: per-position times reach the real denoiser (FiLM per position) in the forward and the
    backward; the loss on the same rows falls, and the validation corruption stays the plain one."""
    cfg = make_cfg(setup, tmp_path, training__loss_type="l2t", training__max_steps=50, data__max_samples=8,
                   diffusion__clean_prefix=0.5)  # fmt: skip
    trainer = Trainer(cfg)
    before = fixed_loss(trainer, "l2t")
    recs = run(trainer, 50)
    after = fixed_loss(trainer, "l2t")
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert after < 0.9 * before, (before, after)
    from rwkv_diffusion_rnn.data_simple import collate_batch

    batch = collate_batch([trainer.train_set[i] for i in range(len(trainer.train_set))])
    assert trainer.objective.corrupt(batch, "l2t", step=1).t_text.dim() == 2
    assert trainer.objective.corrupt(batch, "l2t", step=1, clean_prefix=0.0).t_text.dim() == 1


def test_sequential_schedule_switches_modes(setup, tmp_path):
    cfg = make_cfg(setup, tmp_path, training__loss_type="sequential", training__max_steps=12,
                   training__sequential_schedule=["l2t:0", "t2l:6"])  # fmt: skip
    recs = run(Trainer(cfg), 12)
    assert all(r["latent_loss"] == 0 and r["text_loss"] > 0 for r in recs[:6])
    assert all(r["text_loss"] == 0 and r["latent_loss"] > 0 for r in recs[6:])


def test_frozen_backbone_is_bit_identical_and_outside_the_optimizer(setup, tmp_path):
    trainer = Trainer(make_cfg(setup, tmp_path, model__freeze_backbone=True, training__max_steps=20))
    before = {n: p.detach().clone() for n, p in trainer.model.backbone.named_parameters()}
    mask_before = trainer.model.mask_emb.detach().clone()
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in trainer.model.backbone.parameters())
    run(trainer, 20)
    for n, p in trainer.model.backbone.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not torch.equal(trainer.model.mask_emb, mask_before)  # <mask> trains with a frozen backbone


def test_lora_changes_only_adapters_in_the_backbone(setup, tmp_path):
    trainer = Trainer(make_cfg(setup, tmp_path, model__lora_rank=4, training__max_steps=10))
    before = {n: p.detach().clone() for n, p in trainer.model.backbone.named_parameters()}
    lora_before = {n: p.detach().clone() for n, p in trainer.model.lora.named_parameters()}
    run(trainer, 10)
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.backbone.named_parameters())
    changed = [n for n, p in trainer.model.lora.named_parameters() if not torch.equal(p, lora_before[n])]
    assert len(changed) == len(lora_before)


def test_resume_is_bitwise_exact(setup, tmp_path):
    over = dict(training__max_steps=10, training__ema_decay=0.9, training__loss_type="mixed", logging__save_freq=1000)
    full = Trainer(make_cfg(setup, tmp_path / "full", **over))
    full_recs = run(full, 10)

    first = Trainer(make_cfg(setup, tmp_path / "part", **over))
    run(first, 6)
    ckpt = first.save()
    second = Trainer(make_cfg(setup, tmp_path / "part", training__resume=str(ckpt), **over))
    assert second.step == 6
    resumed = run(second, 4)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full_recs[6:]]
    a, b = full.trainable_tensors(), second.trainable_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = full.ema.state_dict(), second.ema.state_dict()
    assert all(torch.equal(ea["shadow"][k], eb["shadow"][k]) for k in ea["shadow"])


def test_prefetched_data_trains_exactly_as_read_in_step(setup, tmp_path):
    """Reading the next step's rows during this step (on by default on CUDA) changes nothing: the same losses and
    weights bit for bit, through a resume; a row that cannot be read fails at its own step, not one early."""
    over = dict(training__max_steps=6, training__loss_type="mixed", logging__save_freq=1000)
    plain = Trainer(make_cfg(setup, tmp_path / "plain", **over))
    ahead = Trainer(make_cfg(setup, tmp_path / "ahead", **over))
    assert plain.data.prefetch_data is False  # CPU default
    ahead.data.prefetch_data = True
    recs = run(plain, 3), run(ahead, 3)
    assert ahead.data._prefetched is not None and ahead.data._prefetched[0] == 3
    assert [r["loss"] for r in recs[0]] == [r["loss"] for r in recs[1]]
    ahead.step = 5  # e.g. a resume elsewhere: the prefetched step-3 rows must not be used
    plain.step = 5
    assert [run(plain, 1)[0]["loss"]] == [run(ahead, 1)[0]["loss"]]
    a, b = plain.trainable_tensors(), ahead.trainable_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)

    calls = []
    real = ahead.data.load

    def failing(step):
        calls.append(step)
        if step == 7:
            raise RuntimeError("unreadable row")
        return real(step)

    ahead.data.load = failing
    ahead.step = 6
    run(ahead, 1)  # step 7's rows are prefetched here and fail quietly
    with pytest.raises(RuntimeError, match="unreadable row"):
        run(ahead, 1)  # ... and fail loudly at step 7 itself
    assert calls == [7, 7]  # step 6 ran on the rows prefetched during step 5


def test_chunked_head_cross_entropy_trains_as_the_logits_path(setup, tmp_path):
    """training.chunked_ce (the masked-position head + cross-entropy in row chunks, no [N, V] logits kept) gives the
    logits path's losses, accuracy and weights to fp32 rounding over several steps of every mode."""
    over = dict(training__max_steps=5, training__loss_type="mixed", logging__save_freq=1000)
    plain = Trainer(make_cfg(setup, tmp_path / "plain", **over))
    chunked = Trainer(make_cfg(setup, tmp_path / "chunked", training__chunked_ce=True, **over))
    a, b = run(plain, 5), run(chunked, 5)
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["masked_acc"] == pytest.approx(y["masked_acc"], abs=1e-6)
    wa, wb = plain.trainable_tensors(), chunked.trainable_tensors()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < 1e-4, worst


def test_nonfinite_batch_is_skipped_and_logged(setup, tmp_path):
    trainer = Trainer(make_cfg(setup, tmp_path, training__max_steps=6, logging__log_freq=100))

    def plant(step, rank, batch):
        if step == 3:
            batch = dict(batch, latent=batch["latent"].clone())
            batch["latent"][1, 5] = float("nan")
        return batch

    trainer.batch_hook = plant
    run(trainer, 3)
    weights = {k: v.clone() for k, v in trainer.trainable_tensors().items()}
    opt_state = {k: v["exp_avg"].clone() for k, v in enumerate(trainer.optimizer.state.values())}
    rec = trainer.train_step()
    trainer._log(rec)
    assert rec["skipped"] == 1 and trainer.skipped == 1
    after = trainer.trainable_tensors()
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    assert all(torch.equal(v["exp_avg"], opt_state[k]) for k, v in enumerate(trainer.optimizer.state.values()))
    nxt = trainer.train_step()
    assert nxt["skipped"] == 0 and math.isfinite(nxt["loss"])
    assert not all(torch.equal(trainer.trainable_tensors()[k], weights[k]) for k in weights)
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert any(r.get("skipped") == 1 and r["step"] == 4 for r in logged)


def test_validation_is_the_masked_cross_entropy_with_the_latent_given(setup, tmp_path):
    """Trainer.evaluate reports what it computes: ``val_masked_ce_bits`` is the plain cross-entropy per masked token
    in bits with the latent given on every row (the same whatever the text weighting and the condition dropout of
    training), measured here by hand on the same corruption; ``val_latent_mse`` comes along."""
    import torch.nn.functional as F

    from rwkv_diffusion_rnn.train_data import collate
    from rwkv_diffusion_rnn.train_metrics import VALIDATION_SALT

    over = dict(data__validation_fraction=0.25, training__eval_batch_size=64)
    a = Trainer(make_cfg(setup, tmp_path / "a", **over))
    b = Trainer(make_cfg(setup, tmp_path / "b", diffusion__text_weighting="elbo", diffusion__p_uncond=0.9, **over))
    assert len(a.val_set) > 0
    ea, eb = a.evaluate(), b.evaluate()
    assert set(ea) == {"val_masked_ce_bits", "val_latent_mse"} and ea == pytest.approx(eb, rel=1e-6)
    assert math.isfinite(ea["val_latent_mse"]) and ea["val_latent_mse"] > 0

    a.objective.p_uncond = 0.0  # what validation uses: every row keeps its latent
    batch = collate([a.val_set[i] for i in range(len(a.val_set))], None)  # one batch holds every row
    c = a.objective.corrupt(batch, "l2t", 0, 0, salt=VALIDATION_SALT, clean_prefix=0.0)
    assert torch.all(c.t_latent == 0) and c.masked.any()
    with torch.no_grad():
        logits = a.model(c.noisy_ids, c.attention_mask, c.z_t, c.t_text, c.t_latent, text_select=c.masked).text_logits
    by_hand = float(F.cross_entropy(logits.float(), c.input_ids[c.masked])) / math.log(2)
    assert ea["val_masked_ce_bits"] == pytest.approx(by_hand, rel=1e-5)


def _torchrun(tmp_path, cfg: TrainConfig, nproc: int, name: str, *nan) -> list[dict]:
    cfg_file = tmp_path / f"{name}.json"
    cfg_file.write_text(json.dumps(asdict(cfg)))
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "_ddp_worker.py"), str(cfg_file), str(out), *map(str, nan)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(f"{out}.rank{i}.pt") for i in range(nproc)]


@pytest.mark.slow
def test_two_processes_equal_one_with_the_doubled_batch_and_skip_together(setup, tmp_path):
    one = make_cfg(setup, tmp_path, training__train_batch_size=8, training__max_steps=4, data__max_length=64)
    two = make_cfg(setup, tmp_path, training__train_batch_size=4, training__max_steps=4, data__max_length=64)
    ref = _torchrun(tmp_path, one, 1, "one")[0]
    res = _torchrun(tmp_path, two, 2, "two")
    # fp32 sums in another order: Adam normalises every element's step to ~lr, so an element whose gradient is at
    # rounding level can move differently. Compare each tensor's difference with how far training moved it.
    for k, v in ref["tensors"].items():
        moved = (v - ref["init"][k]).norm()
        assert torch.equal(ref["init"][k], res[0]["init"][k]), k  # same start
        assert (res[0]["tensors"][k] - v).norm() <= 1e-2 * moved + 1e-7, k
        assert torch.equal(res[0]["tensors"][k], res[1]["tensors"][k])  # ranks hold identical weights
    assert res[0]["losses"] == pytest.approx(ref["losses"], rel=1e-4)

    bad = _torchrun(tmp_path, two, 2, "nan", 2, 1)  # NaN on rank 1 at step 2
    assert bad[0]["skipped"] == bad[1]["skipped"] == [0, 0, 1, 0]
    assert all(torch.equal(bad[0]["tensors"][k], bad[1]["tensors"][k]) for k in bad[0]["tensors"])
    assert bad[0]["losses"][:2] == res[0]["losses"][:2] and math.isfinite(bad[0]["losses"][3])  # training continues
    for r in bad:  # the bad batch left weights and Adam moments untouched on both ranks
        nan = r["around_nan"]
        assert all(torch.equal(nan["before"][k], nan["after"][k]) for k in nan["before"])
        assert all(torch.equal(a, b) for a, b in zip(nan["adam_before"], nan["adam_after"], strict=True))


def _train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "rwkv_diffusion_rnn" / "train_rwkv.py"), "--config-name", "rwkv_mmdit",
            *overrides]  # fmt: skip


ORIGINAL_SMOKE = ["training.num_epochs=1", "training.train_batch_size=1", "training.eval_batch_size=1",
              "training.dtype=fp32", "data.num_workers=0", "data.max_samples=10", "logging.log_freq=1",
              "logging.eval_freq=100000", "tokenizer.local_files_only=false"]  # fmt: skip


def test_original_smoke_command_runs_with_a_local_checkpoint(setup, tmp_path):
    root, p = setup
    cmd = _train_cmd(*ORIGINAL_SMOKE, f"model.rwkv_name={root / 'bb.pth'}", f"data.json_path={p['json']}",
                     f"data.token_dir={p['token_dir']}", f"data.latent_dir={p['latent_dir']}",
                     f"logging.save_dir={tmp_path}")  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf"),
                       "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(tmp_path.glob("step_*")), "no checkpoint written"
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert lines and all(math.isfinite(x["loss"]) for x in lines if "loss" in x)


def test_offline_without_checkpoint_is_one_line(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(_train_cmd(*ORIGINAL_SMOKE), capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "model.rwkv_name" in err[0], r.stderr


def test_unknown_config_key_is_refused_by_name(tmp_path):
    r = subprocess.run(_train_cmd("training.no_such_key=1"), capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "no_such_key" in r.stderr


def test_diffrwkv_train_verb_finds_the_config(setup, tmp_path):
    root, p = setup
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.cli", "train", *ORIGINAL_SMOKE,
           f"model.rwkv_name={root / 'bb.pth'}", f"data.json_path={p['json']}", f"data.token_dir={p['token_dir']}",
           f"data.latent_dir={p['latent_dir']}", "data.max_samples=4", f"logging.save_dir={tmp_path}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(tmp_path.glob("step_*"))


def test_compact_vocabulary_round_trips_through_a_checkpoint(setup, tmp_path):
    from rwkv_diffusion_rnn.pipeline import load_trained

    cfg = make_cfg(setup, tmp_path, model__rwkv_name="scratch", model__n_layer=1, model__n_embd=64,
                   model__vocab="data", training__max_steps=2, data__pad_to_length=24)  # fmt: skip
    trainer = Trainer(cfg)
    world = set()
    for i in range(len(trainer.train_set)):
        world.update(trainer.train_set[i]["input_ids"].tolist())
    assert trainer.model.backbone.cfg.vocab_size == len(world | {0}) + 1  # + unknown
    run(trainer, 2)
    m = load_trained(trainer.save())
    text = trainer.train_set.text(0)
    ids = m.tokenizer.encode(text)
    assert max(ids) < m.denoiser.mask_id and m.tokenizer.decode(ids) == text
    assert m.tokenizer.decode(m.tokenizer.encode("zebra xylophone")) != "zebra xylophone"  # unseen -> unknown
    for name, t in trainer.trainable_tensors().items():
        assert torch.equal(dict(m.denoiser.named_parameters())[name], t), name


def test_unfreeze_after_n_steps_trains_only_the_matched_tensors_from_then_on(setup, tmp_path):
    cfg = make_cfg(setup, tmp_path, model__freeze_backbone=True, model__unfreeze_patterns=["blocks.1.*"],
                   model__unfreeze_after_steps=3, training__max_steps=6)  # fmt: skip
    trainer = Trainer(cfg)
    snap = lambda: {n: p.detach().clone() for n, p in trainer.model.backbone.named_parameters()}  # noqa: E731
    start = snap()
    run(trainer, 3)
    assert all(torch.equal(p, start[n]) for n, p in trainer.model.backbone.named_parameters())
    run(trainer, 3)
    changed = {n for n, p in trainer.model.backbone.named_parameters() if not torch.equal(p, start[n])}
    assert changed and all(n.startswith("blocks.1.") for n in changed)
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(trainer.model.backbone.blocks[1].att.key.weight) in in_opt
    assert id(trainer.model.backbone.blocks[0].att.key.weight) not in in_opt


def test_bf16_autocast_trains_with_fp32_master_weights(setup, tmp_path):
    trainer = Trainer(make_cfg(setup, tmp_path, training__dtype="bf16", training__max_steps=3))
    recs = run(trainer, 3)
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in recs)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


def resumes_exactly(setup, tmp_path, full, recs, **over):
    """A run of 3 steps with the settings ``over``, saved and resumed for 3 more, gives the losses ``recs[3:]`` of
    the 6-step run ``full`` and its final trainable tensors. Returns (the resumed trainer, ``full``'s tensors)."""
    first = Trainer(make_cfg(setup, tmp_path / "part", **over))
    run(first, 3)
    ckpt = first.save()
    second = Trainer(make_cfg(setup, tmp_path / "part", training__resume=str(ckpt), **over))
    assert [r["loss"] for r in run(second, 3)] == [r["loss"] for r in recs[3:]]
    a, b = full.trainable_tensors(), second.trainable_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return second, a


def test_master_weights_train_like_the_fp32_weights_and_resume_exactly(setup, tmp_path):
    """training.master_weights: the model trains on bf16 copies of its matmul weights while the checkpoints, the EMA
    and the resume see the fp32 masters; the losses follow the plain bf16 run's (same gradients; the update differs
    from the fused AdamW's by rounding); a resume is bit-exact; the model is fp32 again once training ends."""
    over = dict(training__dtype="bf16", training__max_steps=6, training__ema_decay=0.9, training__loss_type="mixed",
                logging__save_freq=1000)  # fmt: skip
    plain = Trainer(make_cfg(setup, tmp_path / "plain", training__master_weights=False, **over))
    full = Trainer(make_cfg(setup, tmp_path / "full", training__master_weights=True, **over))
    key = "backbone.blocks.0.att.key.weight"
    assert dict(full.model.named_parameters())[key].dtype == torch.bfloat16
    assert {t.dtype for t in full.trainable_tensors().values()} == {torch.float32}
    ref, recs = run(plain, 6), run(full, 6)
    assert recs[0]["loss"] == ref[0]["loss"]
    assert all(abs(a["loss"] - b["loss"]) <= 1e-3 * abs(b["loss"]) for a, b in zip(recs, ref, strict=True))

    second, a = resumes_exactly(setup, tmp_path, full, recs, training__master_weights=True, **over)
    ea, eb = full.ema.state_dict()["shadow"], second.ema.state_dict()["shadow"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)

    full.close()
    params = dict(full.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}
    assert all(torch.equal(params[n], t) for n, t in a.items())
    with pytest.raises(DiffRwkvError, match=r"training.master_weights needs training.dtype bf16 .*; got dtype fp16"):
        validate(make_cfg(setup, tmp_path / "c", training__master_weights=True, training__dtype="fp16"))
    with pytest.raises(DiffRwkvError, match=r"training.master_weights and training.strategy=fsdp"):
        validate(
            make_cfg(
                setup, tmp_path / "c", training__master_weights=True, training__strategy="fsdp", training__dtype="bf16"
            )
        )


def test_flat_adamw_trains_like_the_fused_adamw_and_resumes_exactly(setup, tmp_path):
    """training.flat_adamw: every trainable tensor stays fp32 (a view of the optimizer's flat buffer); the losses
    follow the plain run's (the same update up to the order of its fp32 operations); a resume is bit-exact; fsdp and
    a later unfreeze are refused in one line."""
    over = dict(training__max_steps=6, training__ema_decay=0.9, training__loss_type="mixed", logging__save_freq=1000)
    plain = Trainer(make_cfg(setup, tmp_path / "plain", **over))
    full = Trainer(make_cfg(setup, tmp_path / "full", training__flat_adamw=True, **over))
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
    assert isinstance(full.optimizer, MasterAdamW) and not isinstance(plain.optimizer, MasterAdamW)
    ref, recs = run(plain, 6), run(full, 6)
    assert recs[0]["loss"] == ref[0]["loss"]
    assert all(abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]) for a, b in zip(recs, ref, strict=True))

    resumes_exactly(setup, tmp_path, full, recs, training__flat_adamw=True, **over)
    with pytest.raises(DiffRwkvError, match=r"training.flat_adamw and training.strategy=fsdp"):
        validate(make_cfg(setup, tmp_path / "c", training__flat_adamw=True, training__strategy="fsdp"))
    with pytest.raises(DiffRwkvError, match=r"training.flat_adamw needs model.unfreeze_after_steps=0"):
        validate(make_cfg(setup, tmp_path / "c", training__flat_adamw=True, model__unfreeze_after_steps=5))


def test_flat_adamw_null_is_on_only_where_it_applies(setup, tmp_path):
    """null: on for one CUDA process with a fixed trainable set, no fsdp and no master weights; off wherever one of
    these fails (each case apart), and on the CPU (the trainer here keeps torch's AdamW); true / false as set."""
    on = dict(device_type="cuda", distributed=False, strategy="ddp", unfreeze_after_steps=0, master_weights=False)
    assert resolve_flat_adamw(None, **on)
    for change in (dict(device_type="cpu"), dict(distributed=True), dict(strategy="fsdp"),
                   dict(unfreeze_after_steps=10), dict(master_weights=True)):  # fmt: skip
        assert not resolve_flat_adamw(None, **{**on, **change}), change
        assert resolve_flat_adamw(True, **{**on, **change}) and not resolve_flat_adamw(False, **on)
    trainer = Trainer(make_cfg(setup, tmp_path / "cpu", training__max_steps=1))
    assert trainer.cfg.training.flat_adamw is None and not isinstance(trainer.optimizer, MasterAdamW)


def test_master_weights_null_is_on_only_where_it_applies(setup, tmp_path, monkeypatch):
    """null: on for one CUDA process under dtype bf16 with the update kernel, no fsdp and a fixed trainable set; off
    wherever one of these fails (each case apart), and on the CPU (the trainer here keeps torch's AdamW); true /
    false as set."""
    from rwkv_diffusion_rnn import improved_trainer

    on = dict(device_type="cuda", dtype="bf16", distributed=False, strategy="ddp", unfreeze_after_steps=0)
    assert resolve_master_weights(None, **on)
    for change in (dict(device_type="cpu"), dict(dtype="fp32"), dict(dtype="fp16"), dict(distributed=True),
                   dict(strategy="fsdp"), dict(unfreeze_after_steps=10)):  # fmt: skip
        assert not resolve_master_weights(None, **{**on, **change}), change
        assert resolve_master_weights(True, **{**on, **change}) and not resolve_master_weights(False, **on)
    monkeypatch.setattr(improved_trainer, "master_weights_kernel_available", lambda: False)
    assert not resolve_master_weights(None, **on)  # no Triton: torch's fused AdamW, not the torch path of the update
    trainer = Trainer(make_cfg(setup, tmp_path / "cpu", training__max_steps=1))
    assert trainer.cfg.training.master_weights is None and not trainer.master_weights


def test_memory_budget_reaches_the_compiled_blocks(setup, tmp_path):
    """training.memory_budget is handed to compile_blocks (the partitioner's share, read at the first compile; no
    step runs here), 1 included (a budget left by an earlier model is not inherited). (torch's own ``patch``
    restores the setting: pytest's monkeypatch deletes a torch config entry on undo.)"""
    import torch._functorch.config as functorch_config

    budget = 0.437  # not a value torch or an earlier test would leave behind
    with functorch_config.patch(activation_memory_budget=1.0):
        cfg = make_cfg(setup, tmp_path / "a", training__compile_blocks=True, training__memory_budget=budget)
        trainer = Trainer(cfg)
        assert functorch_config.activation_memory_budget == budget
        assert all(getattr(b, "_compiled_call_impl", None) is not None for b in trainer.model.backbone.blocks)
    with functorch_config.patch(activation_memory_budget=0.77):  # e.g. left by an earlier model in the process
        Trainer(make_cfg(setup, tmp_path / "b", training__compile_blocks=True))
        assert functorch_config.activation_memory_budget == 1.0  # the config's 1 applies: nothing inherited


def test_wkv_keep_states_reaches_the_denoisers_layers(setup, tmp_path):
    """training.wkv_keep_states sets which of the backbone's time-mix layers keep their WKV states (the first ones);
    out of range it is refused by name."""
    from rwkv_diffusion_rnn.config import validate
    from rwkv_diffusion_rnn.errors import DiffRwkvError

    trainer = Trainer(make_cfg(setup, tmp_path / "a", training__wkv_keep_states=0.5))
    layers = [b.att.keep_wkv_states for b in trainer.model.backbone.blocks]
    assert layers == [True] * (len(layers) // 2) + [False] * (len(layers) - len(layers) // 2) and len(layers) >= 2
    assert all(b.att.keep_wkv_states is None for b in Trainer(make_cfg(setup, tmp_path / "b")).model.backbone.blocks)
    with pytest.raises(DiffRwkvError, match=r"training.wkv_keep_states must be null or in \[0, 1\]; got 2"):
        validate(make_cfg(setup, tmp_path / "c", training__wkv_keep_states=2))


def test_bf16_residual_reaches_the_denoisers_blocks(setup, tmp_path):
    """training.bf16_residual sets every backbone block's stream to bf16; left null it follows training.dtype (on
    with bf16 only); set true with another autocast dtype it is refused by name."""
    from rwkv_diffusion_rnn.config import validate
    from rwkv_diffusion_rnn.errors import DiffRwkvError

    def streams(name, **over):
        blocks = Trainer(make_cfg(setup, tmp_path / name, **over)).model.backbone.blocks
        assert len(blocks) >= 2
        return {b.bf16_residual for b in blocks}

    assert streams("a", training__bf16_residual=True, training__dtype="bf16") == {True}
    assert streams("auto", training__dtype="bf16") == {True}
    assert streams("off", training__bf16_residual=False, training__dtype="bf16") == {False}
    assert streams("fp32", training__dtype="fp32") == {False}
    with pytest.raises(DiffRwkvError, match=r"training.bf16_residual needs training.dtype bf16 .*; got dtype fp16"):
        validate(make_cfg(setup, tmp_path / "c", training__bf16_residual=True, training__dtype="fp16"))


def test_compile_denoiser_trains_like_eager(setup, tmp_path):
    """training.compile_denoiser: the denoiser's regions around the blocks are compiled (training forward only) and
    training follows eager's losses; with training.compile it is refused by name."""
    from rwkv_diffusion_rnn.config import validate

    plain = Trainer(make_cfg(setup, tmp_path / "a", training__max_steps=3))
    fast = Trainer(make_cfg(setup, tmp_path / "b", training__max_steps=3, training__compile_denoiser=True))
    assert not plain.model.compiled_regions and fast.model.compiled_regions
    a, b = run(plain, 3), run(fast, 3)
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-5)
    with pytest.raises(DiffRwkvError, match="training.compile_denoiser"):
        validate(make_cfg(setup, tmp_path / "c", training__compile=True, training__compile_denoiser=True))


SCRATCH = {"model__rwkv_name": "scratch", "model__vocab": "data", "model__n_layer": 1, "model__n_embd": 64}


@pytest.mark.parametrize("over", [{}, {"data__pad_to_length": 12}, {**SCRATCH, "data__pad_to_length": 10}])
def test_device_cache_serves_the_same_batches(setup, tmp_path, over):
    """data.device_cache: batches indexed from the cached tensors equal the host path's, dtypes included, and
    training from them gives the same losses."""
    plain = Trainer(make_cfg(setup, tmp_path / "a", **over))
    cached = Trainer(make_cfg(setup, tmp_path / "b", data__device_cache=True, **over))
    assert plain.data.device_rows is None and cached.data.device_rows is not None
    for step in (0, 1, 5, 17):
        for x, y in zip(plain.data.load(step), cached.data.load(step), strict=True):
            assert x.keys() == y.keys()
            for k in x:
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (step, k)
    assert [r["loss"] for r in run(plain, 3)] == [r["loss"] for r in run(cached, 3)]
