"""data_io.extract_tar: the same archives extracted and the same ones refused, with tarfile's "data" filter and,
where a Python lacks it (3.10 before .12, 3.11 before .4), by hand."""

from __future__ import annotations

import io
import tarfile

import pytest

from rwkv_diffusion_rnn.data_io import extract_tar
from rwkv_diffusion_rnn.errors import DiffRwkvError


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("with_filter", [True, False])
def test_plain_members_come_out_and_an_escaping_one_is_refused(tmp_path, monkeypatch, with_filter):
    if not with_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile data filter")
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    _tar(good, {"run/result.json": b"{}", "run/texts.txt": b"a\n"})
    _tar(bad, {"ok.txt": b"x", "../escaped.txt": b"y"})
    with tarfile.open(good) as tf:
        extract_tar(tf, tmp_path / "out")
    assert (tmp_path / "out" / "run" / "texts.txt").read_bytes() == b"a\n"
    with tarfile.open(bad) as tf, pytest.raises((DiffRwkvError, tarfile.TarError)):
        extract_tar(tf, tmp_path / "out2")
    assert not (tmp_path / "escaped.txt").exists()
    if not with_filter:  # by hand: refused before anything is written
        assert not (tmp_path / "out2").exists()
