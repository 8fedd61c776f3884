"""Loading and converting checkpoints: formats, integrity errors, no code execution, offline hub."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import torch

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.pretrained_rwkv import (
    blink_to_fla,
    convert_main,
    fla_to_blink,
    load_rwkv_model,
    read_local_checkpoint,
    save_pth,
)
from tests.conftest import random_rwkv7


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def pth(tmp_path):
    path = tmp_path / "model.pth"
    save_pth(random_rwkv7(2, 128, vocab_size=500, seed=1234).state_dict(), path)
    return path


def _logits(path, ids):
    with torch.no_grad():
        return load_rwkv_model(path)(ids)


def test_pth_to_hf_to_pth_identical(tmp_path, pth):
    ids = torch.randint(1, 500, (2, 12))
    assert convert_main([str(pth), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    assert torch.equal(_logits(pth, ids), _logits(tmp_path / "hf", ids))
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "back.pth")]) == 0
    a, b = read_local_checkpoint(pth), read_local_checkpoint(tmp_path / "back.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fla_names_round_trip_and_match_fla_layout(pth):
    sd = read_local_checkpoint(pth)
    fla = blink_to_fla(sd)
    assert fla["model.layers.1.attn.w_lora.lora.0.weight"].shape == sd["blocks.1.att.w1"].shape[::-1]
    assert fla["model.layers.0.attn.k_k"].ndim == 1 and fla["model.layers.0.attn.x_r"].shape == (1, 1, 128)
    assert "model.layers.0.attn.v_lora.lora.0.weight" not in fla  # layer 0 has no value-residual LoRA
    back = fla_to_blink(fla)
    assert all(torch.equal(back[k], sd[k]) for k in back) and set(sd) - set(back) <= {"blocks.0.att.v0"}


def test_missing_file_names_it(tmp_path):
    with pytest.raises(DiffRwkvError, match="nope.pth: checkpoint not found"):
        load_rwkv_model(tmp_path / "nope.pth")


def test_truncated_pth_names_file(tmp_path, pth):
    data = pth.read_bytes()
    bad = tmp_path / "cut.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DiffRwkvError, match=r"cut.pth: cannot read checkpoint") as e:
        load_rwkv_model(bad)
    assert "\n" not in str(e.value)


def test_truncated_safetensors_names_file(tmp_path, pth):
    convert_main([str(pth), str(tmp_path / "hf")])
    f = tmp_path / "hf" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(DiffRwkvError, match=r"model.safetensors: cannot read safetensors"):
        load_rwkv_model(tmp_path / "hf")


def test_wrong_shape_names_tensor(tmp_path, pth):
    sd = read_local_checkpoint(pth)
    sd["blocks.1.att.key.weight"] = torch.zeros(128, 64)
    save_pth(sd, tmp_path / "bad.pth")
    with pytest.raises(
        DiffRwkvError, match=r"bad.pth: tensor 'blocks.1.att.key.weight' has shape \[128, 64\], expected \[128, 128\]"
    ):
        load_rwkv_model(tmp_path / "bad.pth")


def test_missing_and_unexpected_tensor(tmp_path, pth):
    sd = read_local_checkpoint(pth)
    del sd["blocks.1.ffn.x_k"]
    save_pth(sd, tmp_path / "missing.pth")
    with pytest.raises(DiffRwkvError, match=r"missing.pth: missing tensor 'blocks.1.ffn.x_k'"):
        load_rwkv_model(tmp_path / "missing.pth")
    sd = read_local_checkpoint(pth)
    sd["blocks.1.att.extra"] = torch.zeros(3)
    save_pth(sd, tmp_path / "extra.pth")
    with pytest.raises(DiffRwkvError, match=r"extra.pth: unexpected tensor 'blocks.1.att.extra'"):
        load_rwkv_model(tmp_path / "extra.pth")


class _Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capfd):
    path = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "x": _Boom()}, path)
    with pytest.raises(DiffRwkvError, match="evil.pth: refused to unpickle"):
        load_rwkv_model(path)
    assert "this must never run" not in capfd.readouterr().out


def test_offline_hub_error_names_file_and_option(tmp_path):
    with pytest.raises(DiffRwkvError) as e:
        load_rwkv_model(
            "BlinkDL/rwkv7-g1", filename="rwkv7-g1a-0.1b.pth", cache_dir=str(tmp_path), local_files_only=True
        )
    msg = str(e.value)
    assert "rwkv7-g1a-0.1b.pth" in msg and "BlinkDL/rwkv7-g1" in msg and "model.rwkv_name" in msg and "\n" not in msg


def test_unreachable_hub_fails_fast_in_one_line(tmp_path, monkeypatch):
    """Not cached and no hub: our one line at once, not the hub client's retries first."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.close()  # a port nothing listens on
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    name = f"no-such-org/rwkv-{time.time_ns()}"
    t0 = time.perf_counter()
    with pytest.raises(DiffRwkvError) as e:
        load_rwkv_model(name, filename="model.pth", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert "\n" not in msg and name in msg and "unreachable" in msg and "model.rwkv_name" in msg


def test_convert_cli_one_line_error(tmp_path):
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.cli", "convert", str(tmp_path / "x.pth"), str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith(f"error: {tmp_path / 'x.pth'}: checkpoint not found; expected") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_dtype_and_device_arguments(pth):
    model = load_rwkv_model(pth, dtype="bf16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training


def test_a_run_on_a_changed_hf_folder_backbone_is_refused_at_load_and_resume(tmp_path):
    """A frozen backbone given as a Hugging Face folder is recorded with its digest; loading the run, or resuming
    it, after the folder's weights changed is refused in one line (as for a .pth)."""
    import shutil

    from rwkv_diffusion_rnn.checkpoints import backbone_sha256, peek_checkpoint
    from rwkv_diffusion_rnn.improved_trainer import Trainer
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config
    from rwkv_diffusion_rnn.models.rwkv7 import random_rwkv7 as blink_random
    from rwkv_diffusion_rnn.pipeline import config_from_dict, load_trained
    from rwkv_diffusion_rnn.pretrained_rwkv import save_hf
    from tests.api_helpers import tiny_run

    folder = tmp_path / "bb_hf"
    save_hf(blink_random(RWKV7Config.for_shape(1, 64), seed=1).state_dict(), folder)
    run = tiny_run(tmp_path, steps=2, model__rwkv_name=str(folder), model__freeze_backbone=True,
                   model__vocab="full", model__n_layer=1)  # fmt: skip
    _, meta = peek_checkpoint(run["save_dir"])
    assert meta["backbone"]["sha256"] == backbone_sha256(folder) and meta["backbone"]["path"] == str(folder)
    load_trained(run["save_dir"])  # unchanged: loads

    sd = read_local_checkpoint(folder)
    sd["blocks.0.ffn.key.weight"] = sd["blocks.0.ffn.key.weight"] + 1
    shutil.rmtree(folder)
    save_hf(sd, folder)
    with pytest.raises(DiffRwkvError, match="backbone .*bb_hf changed since training") as err:
        load_trained(run["save_dir"])
    assert "\n" not in str(err.value)
    cfg = config_from_dict(meta["config"])
    cfg.training.resume = str(run["save_dir"])
    with pytest.raises(DiffRwkvError, match="trained on backbone .*bb_hf") as err:
        Trainer(cfg)
    assert "\n" not in str(err.value)
