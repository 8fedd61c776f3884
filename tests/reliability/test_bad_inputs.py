"""The bad-input corpus across config, data and checkpoints: each case is a one-line error naming the key or file
(no newline, no traceback from deep inside), or a documented, asserted behaviour — never a silent zero sample.

Counted together with the data cases already proven elsewhere (not repeated here):

* tests/test_data_bad_input.py — 15 loader cases (wrong latent dimension, NaN latent, inf latent, missing latent,
  missing tokens, row without text, JSON not a list, extra token file, JSON changed after tokenizing, empty text,
  truncated .npy, truncated .npz, garbage .npz, path traversal ``../../etc/passwd`` in latent_path, duplicate row),
  each also through ``pack`` and ``check-data``; plus prepare-latents (empty line, NaN / inf .npy, wrong dimension,
  counts disagree), pack (counts disagree) and on_bad_sample=skip.
* tests/test_checkpoints.py — flipped / truncated / deleted checkpoint files, meta.json newer format_version,
  path traversal in meta.json's file list, step / tensor-list edits of meta.json.
* tests/reliability/test_checkpoint_security.py — code-running pickle, another configuration, float16 tensor.

Config cases go through the user-facing command (``python -m rwkv_diffusion_rnn.cli train ...``); the rest run
in-process to stay fast.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from rwkv_diffusion_rnn.checkpoints import file_sha256
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.improved_trainer import Trainer
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7
from rwkv_diffusion_rnn.pretrained_rwkv import save_pth
from tests.conftest import REPO
from tests.data_helpers import rewrite_json
from tests.reliability.conftest import tiny_cfg


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg.strip(), msg
    assert "Traceback" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------- config (the CLI)

CONFIG_CASES = {
    "unknown_key": ("training.no_such_key=1", ["training.no_such_key", "not in"]),
    "unknown_top_level_key_added": ("+foo=1", ["+foo=1", "'foo' not in"]),
    "wrong_type": ("training.lr=fast", ["training.lr=fast", "could not be converted to Float"]),
    "loss_type_misspelled": ("training.loss_type=mixd", ["training.loss_type", "'mixd'"]),
    "validation_fraction_out_of_range": ("data.validation_fraction=1.5", ["validation_fraction is 1.5"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_case_is_one_error_line_from_the_command(tiny, tmp_path, case):
    root, p = tiny
    override, expect = CONFIG_CASES[case]
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.cli", "train", "training.max_steps=1", "training.dtype=fp32",
           "training.train_batch_size=4", "logging.progress=false", "logging.tensorboard=false",
           f"model.rwkv_name={root / 'bb.pth'}", f"data.json_path={p['json']}", f"data.token_dir={p['token_dir']}",
           f"data.latent_dir={p['latent_dir']}", f"logging.save_dir={tmp_path / 'out'}", override]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for part in expect:
        assert part in lines[0], lines[0]
    out = tmp_path / "out"  # Hydra may have made its run folder; nothing was trained or saved in it
    assert not list(out.glob("step_*")) and not (out / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------------------- data


@pytest.fixture
def data_copy(tiny, tmp_path):
    """A private copy of the tiny dataset (cases edit it) and a config pointing at it."""
    root, p = tiny
    shutil.copytree(p["root"], tmp_path / "ds")
    data = tmp_path / "ds" / "qwen_32d"
    paths = {"root": root, "json": data / "train_data.json", "latent_dir": data / "latents" / "train",
             "token_dir": tmp_path / "ds" / "rwkv_tokens" / "train", "data": data}  # fmt: skip

    def cfg(**over):
        c = tiny_cfg(tiny, tmp_path / "out", **over)
        c.data.json_path, c.data.token_dir, c.data.latent_dir = (
            str(paths["json"]), str(paths["token_dir"]), str(paths["latent_dir"])
        )  # fmt: skip
        return c

    return paths, cfg


def test_max_samples_above_the_data_size_is_a_clamp(tiny, tmp_path):
    """Documented behaviour: data.max_samples is an upper bound (``rows[:max_samples]``), so 1000 on 16 rows trains
    on all 16 — not an error and not fewer rows."""
    tr = Trainer(tiny_cfg(tiny, tmp_path, data__max_samples=1000))
    assert len(tr.train_set) == 16
    assert tr.train_step()["step"] == 1


def test_max_samples_zero_is_an_error_not_a_silent_empty_run(tiny, tmp_path):
    with pytest.raises(DiffRwkvError) as err:
        Trainer(tiny_cfg(tiny, tmp_path, data__max_samples=0))
    assert "training split is empty" in one_line(err)


def test_validation_split_of_size_zero_trains_and_skips_evaluation(tiny, tmp_path):
    """No validation rows (fraction 0, no validation folder beside the data): evaluation is skipped, not NaN."""
    tr = Trainer(tiny_cfg(tiny, tmp_path, training__max_steps=2, logging__eval_freq=1))
    assert len(tr.val_set) == 0 and tr.evaluate() == {}
    last = tr.fit()
    assert last["step"] == 2 and not any(k.startswith("val_") for k in last)
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert logged and not any(k.startswith("val_") for r in logged for k in r)


def test_batch_larger_than_the_data_is_an_error(tiny, tmp_path):
    with pytest.raises(DiffRwkvError) as err:
        Trainer(tiny_cfg(tiny, tmp_path, training__train_batch_size=64))
    assert "training.train_batch_size" in one_line(err) and "16 training rows" in str(err.value)


def test_latent_dim_of_config_and_data_disagree(data_copy):
    paths, cfg = data_copy
    c = cfg()
    c.model.latent_dim = 16
    with pytest.raises(DiffRwkvError) as err:
        Trainer(c)
    msg = one_line(err)
    assert str(paths["json"]) in msg and "(32,)" in msg and "expected (16,)" in msg, msg


def test_empty_dataset(data_copy):
    paths, cfg = data_copy
    paths["json"].write_text("[]")
    for f in paths["token_dir"].glob("*"):
        if f.is_file():
            f.unlink()
    with pytest.raises(DiffRwkvError) as err:
        Trainer(cfg())
    msg = one_line(err)
    assert str(paths["json"]) in msg or str(paths["token_dir"]) in msg, msg


def test_absolute_latent_path_outside_the_data_folder(data_copy):
    paths, cfg = data_copy
    rewrite_json(paths["json"], lambda rows: rows[4].update(latent_path="/etc/passwd"))
    with pytest.raises(DiffRwkvError) as err:
        Trainer(cfg())
    msg = one_line(err)
    assert str(paths["json"]) in msg and "row 4" in msg and "/etc/passwd" in msg, msg


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture
def saved(tiny, tmp_path):
    tr = Trainer(tiny_cfg(tiny, tmp_path / "ckpt"))
    tr.train_step()
    return tr.save()


def _resume(tiny, tmp_path, where, **over):
    return Trainer(tiny_cfg(tiny, tmp_path / "again", training__resume=str(where), **over))


def test_truncated_model_safetensors(tiny, tmp_path, saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DiffRwkvError) as err:
        _resume(tiny, tmp_path, saved)
    assert str(f) in one_line(err) and "truncated" in str(err.value)


def test_meta_json_tensor_shape_edited(tiny, tmp_path, saved):
    meta = json.loads((saved / "meta.json").read_text())
    name = sorted(meta["tensors"]["model"])[0]
    meta["tensors"]["model"][name]["shape"] = [7, 7]
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DiffRwkvError) as err:
        _resume(tiny, tmp_path, saved)
    msg = one_line(err)
    assert "model.safetensors" in msg and f"'{name}'" in msg and "meta.json says" in msg, msg


def test_meta_json_not_json(tiny, tmp_path, saved):
    (saved / "meta.json").write_text("{ this is not json")
    with pytest.raises(DiffRwkvError) as err:
        _resume(tiny, tmp_path, saved)
    assert str(saved / "meta.json") in one_line(err) and "unreadable" in str(err.value)


def test_resume_path_not_found(tiny, tmp_path):
    with pytest.raises(DiffRwkvError) as err:
        _resume(tiny, tmp_path, tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in one_line(err) and "not found" in str(err.value)


def test_resume_from_a_save_dir_holding_only_a_killed_save(tiny, tmp_path):
    save_dir = tmp_path / "ckpt"
    (save_dir / ".tmp-step_00000004-deadbeef").mkdir(parents=True)
    (save_dir / ".tmp-step_00000004-deadbeef" / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(DiffRwkvError) as err:
        _resume(tiny, tmp_path, save_dir)
    assert str(save_dir) in one_line(err) and "no complete checkpoint" in str(err.value)


def test_resume_on_another_backbone(tiny, tmp_path, saved):
    other = tmp_path / "other.pth"
    save_pth(random_rwkv7(RWKV7Config.for_shape(2, 64), seed=99).state_dict(), other)
    with pytest.raises(DiffRwkvError) as err:
        _resume(tiny, tmp_path, saved, model__rwkv_name=str(other))
    msg = one_line(err)
    assert str(other) in msg and "trained on backbone" in msg, msg


def test_optimizer_state_of_another_shape_resealed(tiny, tmp_path, saved):
    """A forged optimizer.pt (checksums fixed) whose state does not match the parameters: one line, nothing loaded."""
    import torch

    payload = torch.load(saved / "optimizer.pt", weights_only=True)
    first = next(iter(payload["optimizer"]["state"].values()))
    first["exp_avg"] = torch.zeros(3)
    torch.save(payload, saved / "optimizer.pt")
    meta = json.loads((saved / "meta.json").read_text())
    meta["files"]["optimizer.pt"] = {"bytes": (saved / "optimizer.pt").stat().st_size,
                                     "sha256": file_sha256(saved / "optimizer.pt")}  # fmt: skip
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DiffRwkvError) as err:
        _resume(tiny, tmp_path, saved)
    assert "optimizer.pt" in one_line(err), str(err.value)
