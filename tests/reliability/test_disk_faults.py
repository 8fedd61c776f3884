"""A full disk or an unwritable output during a Trainer save: one line naming the folder, the previous checkpoint
intact and loadable, the run's step and weights unchanged, and training continues on the same trajectory.

The library-level versions (save_checkpoint under ENOSPC / KeyboardInterrupt, a save_dir that is a file) are in
tests/test_checkpoints.py (test_crash_mid_save_leaves_no_step_folder, test_unwritable_save_dir_is_a_one_line_error);
these go through the Trainer.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch

from rwkv_diffusion_rnn import checkpoints
from rwkv_diffusion_rnn.checkpoints import list_checkpoints, load_checkpoint
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.improved_trainer import Trainer
from tests.reliability.conftest import tiny_cfg


def _state(tr: Trainer):
    return tr.step, {k: v.clone() for k, v in tr.trainable_tensors().items()}


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def _fails_then_continues(tiny, tmp_path, monkeypatch, fault, expect: str):
    save_dir = tmp_path / "ckpt"
    ref = Trainer(tiny_cfg(tiny, tmp_path / "ref"))
    ref_losses = [ref.train_step()["loss"] for _ in range(6)]
    tr = Trainer(tiny_cfg(tiny, save_dir))
    losses = [tr.train_step()["loss"] for _ in range(2)]
    first = tr.save()
    first_files = {p.name: p.read_bytes() for p in first.iterdir()}
    losses += [tr.train_step()["loss"] for _ in range(2)]
    before = _state(tr)
    with monkeypatch.context() as m:
        fault(m)
        with pytest.raises(DiffRwkvError) as err:
            tr.save()
    msg = str(err.value)
    assert "\n" not in msg and str(save_dir) in msg and expect in msg, msg
    assert _same(before, _state(tr))  # the failed save changed nothing in the run
    assert list_checkpoints(save_dir) == [first]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == first_files
    assert load_checkpoint(first, verify=True).step == 2
    assert not [p for p in save_dir.iterdir() if p.name.startswith(".tmp-")]
    losses += [tr.train_step()["loss"] for _ in range(2)]
    assert losses == ref_losses  # training continued on the uninterrupted trajectory
    assert load_checkpoint(tr.save(), verify=True).step == 6  # and the next save (disk freed) works


def test_disk_full_during_a_save(tiny, tmp_path, monkeypatch):
    write = checkpoints._write_torch

    def enospc(m):
        def half_then_full(path, obj):  # optimizer.pt: half of it reaches the disk, then ENOSPC
            write(path, obj)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        m.setattr(checkpoints, "_write_torch", half_then_full)

    _fails_then_continues(tiny, tmp_path, monkeypatch, enospc, "No space left on device")


def test_save_dir_becomes_unwritable(tiny, tmp_path, monkeypatch):
    save_dir = tmp_path / "ckpt"

    def readonly(m):
        if os.geteuid() != 0:
            os.chmod(save_dir, 0o500)
        else:  # root ignores permission bits: refuse the temporary folder as a read-only mount would
            real = os.mkdir

            def mkdir(path, *a, **k):
                if os.path.basename(str(path)).startswith(".tmp-step_"):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
                return real(path, *a, **k)

            m.setattr(os, "mkdir", mkdir)

    try:
        _fails_then_continues(tiny, tmp_path, _RestoreMode(monkeypatch, save_dir), readonly, "cannot create")
    finally:
        os.chmod(save_dir, 0o755)


class _RestoreMode:
    """monkeypatch.context() whose exit also makes save_dir writable again (the chmod variant)."""

    def __init__(self, monkeypatch, save_dir):
        self.mp, self.save_dir = monkeypatch, save_dir

    def context(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            with self.mp.context() as m:
                try:
                    yield m
                finally:
                    os.chmod(self.save_dir, 0o755)

        return ctx()


def test_unwritable_save_dir_from_the_start(tiny, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    tr = Trainer(tiny_cfg(tiny, blocker / "ckpt"))
    tr.train_step()
    before = _state(tr)
    with pytest.raises(DiffRwkvError) as err:
        tr.save()
    msg = str(err.value)
    assert "\n" not in msg and str(blocker) in msg and "cannot create a checkpoint folder" in msg, msg
    assert _same(before, _state(tr))
    assert tr.train_step()["step"] == 2
