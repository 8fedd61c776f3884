"""Resuming a Trainer from a hostile or foreign checkpoint: a pickle that would run code is refused (and nothing
runs), a checkpoint of another model configuration fails naming the mismatched tensor, and neither loads anything.

Already proven at the checkpoint level in tests/test_checkpoints.py, not repeated here: the evil optimizer.pt refused
by load_checkpoint (test_a_pickle_that_would_run_code_is_refused), damaged / truncated / checksum-mismatched files
(test_damaged_files_are_named_in_one_line), apply_model_tensors checking everything before copying
(test_apply_model_tensors_checks_everything_before_copying). These go through ``training.resume``.
"""

from __future__ import annotations

import json

import pytest
import torch

from rwkv_diffusion_rnn.checkpoints import file_sha256
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.improved_trainer import Trainer
from tests.reliability.conftest import tiny_cfg


def _reseal(folder, name):
    """What a forger does after replacing a file: fix its size and sha256 in meta.json."""
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
    (folder / "meta.json").write_text(json.dumps(meta))


def _weights(tr):
    return {k: v.clone() for k, v in tr.trainable_tensors().items()}


def _unchanged(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Evil:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("target", ["optimizer.pt", "rng_rank0.pt"])
def test_pickle_that_would_run_code_is_refused_on_resume(tiny, tmp_path, target):
    src = Trainer(tiny_cfg(tiny, tmp_path / "ckpt"))
    src.train_step()
    folder = src.save()
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    payload = {"optimizer": evil, "scheduler": None} if target == "optimizer.pt" else {"torch": evil}
    torch.save(payload, folder / target)
    _reseal(folder, target)

    fresh = Trainer(tiny_cfg(tiny, tmp_path / "other"))
    before = _weights(fresh)
    with pytest.raises(DiffRwkvError) as err:
        fresh._resume(str(folder))
    msg = str(err.value)
    assert "\n" not in msg and f"{target}: refused" in msg and "could run code" in msg, msg
    assert not marker.exists()  # nothing ran
    assert _unchanged(before, _weights(fresh)) and fresh.step == 0
    with pytest.raises(DiffRwkvError, match="refused"):  # the user-facing path: training.resume=<folder>
        Trainer(tiny_cfg(tiny, tmp_path / "other", training__resume=str(folder)))
    assert not marker.exists()


def _scratch(tiny, save_dir, n_embd, **over):
    return tiny_cfg(tiny, save_dir, model__rwkv_name="scratch", model__freeze_backbone=False, model__vocab="data",
                    model__n_layer=1, model__n_embd=n_embd, data__pad_to_length=24, **over)  # fmt: skip


def test_checkpoint_of_another_configuration_names_the_tensor_and_loads_nothing(tiny, tmp_path):
    src = Trainer(_scratch(tiny, tmp_path / "ckpt", 64))
    src.train_step()
    folder = src.save()
    other = Trainer(_scratch(tiny, tmp_path / "other", 128))
    before = _weights(other)
    opt_before = json.dumps(other.optimizer.state_dict()["param_groups"])
    with pytest.raises(DiffRwkvError) as err:
        other._resume(str(folder))
    msg = str(err.value)
    assert "\n" not in msg and str(folder) in msg, msg
    named = [n for n in before if f"'{n}'" in msg]
    assert named and before[named[0]].shape != src.trainable_tensors()[named[0]].shape, msg
    assert "(64" in msg or "64)" in msg or "64," in msg, msg  # both shapes are shown
    assert _unchanged(before, _weights(other)) and other.step == 0
    assert not other.optimizer.state and json.dumps(other.optimizer.state_dict()["param_groups"]) == opt_before


def test_tensor_of_another_dtype_is_refused_not_cast(tiny, tmp_path):
    """A checkpoint whose tensor is float16 (and meta.json says so, checksums resealed) must not be silently cast."""
    import safetensors.torch

    src = Trainer(tiny_cfg(tiny, tmp_path / "ckpt"))
    src.train_step()
    folder = src.save()
    tensors = safetensors.torch.load_file(str(folder / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].half()
    safetensors.torch.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    meta = json.loads((folder / "meta.json").read_text())
    meta["tensors"]["model"][name]["dtype"] = "float16"
    (folder / "meta.json").write_text(json.dumps(meta))
    _reseal(folder, "model.safetensors")
    other = Trainer(tiny_cfg(tiny, tmp_path / "other"))
    before = _weights(other)
    with pytest.raises(DiffRwkvError) as err:
        other._resume(str(folder))
    msg = str(err.value)
    assert "\n" not in msg and f"'{name}'" in msg and "float16" in msg, msg
    assert _unchanged(before, _weights(other))
