"""The Python API (``DiffRwkv``) on a tiny model trained the way the demo trains its own: shapes, seeds, the save /
load round trip, the data's encoder and neighbours, and one-line errors for bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from rwkv_diffusion_rnn import DiffRwkv, DiffRwkvError, sampling
from rwkv_diffusion_rnn.saved_model import find_data_dir
from tests.api_helpers import tiny_run

TEXTS = ["A dog runs on the beach.", "Two cats sleep in the kitchen.", "The old fisherman sings."]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    return tiny_run(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def model(run):
    return DiffRwkv.from_pretrained(run["save_dir"])


def one_line_error(fn, *fragments: str) -> str:
    with pytest.raises(DiffRwkvError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    return msg


# ----------------------------------------------------------------------------------------------------- shapes


def test_encode_decode_generate_shapes(model):
    z = model.encode(TEXTS, steps=3)
    assert z.shape == (3, 32) and z.dtype == np.float32 and np.isfinite(z).all()
    assert model.encode(TEXTS[0], steps=3).shape == (32,)
    texts = model.decode(z, steps=3)
    assert isinstance(texts, list) and len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert isinstance(model.decode(z[0], steps=3), str)
    gen, zg = model.generate(2, steps=3)
    assert len(gen) == 2 and zg.shape == (2, 32)


def test_decode_is_the_samplers_default_decoder(model):
    """No decoder option is set by the API: decode() is sample_l2t with its own defaults, plus the given ones."""
    z = model.embed(TEXTS)
    want = [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in sampling.sample_l2t(model.loaded, z)]
    assert model.decode(z) == want
    ids = sampling.sample_l2t(model.loaded, z, num_steps=2, strategy="ancestral", temperature=0.5, seed=4)
    got = model.decode(z, steps=2, strategy="ancestral", temperature=0.5, seed=4)
    assert got == [model.tokenizer.decode(r, skip_special_tokens=True) for r in ids]


def test_numpy_and_torch_inputs_agree(model):
    z = model.embed(TEXTS)
    assert model.decode(torch.from_numpy(z), steps=3) == model.decode(z, steps=3)
    assert model.decode(z.tolist(), steps=3) == model.decode(z, steps=3)
    assert model.nearest(torch.from_numpy(z), k=2) == model.nearest(z, k=2)


# ------------------------------------------------------------------------------------------------------ seeds


def test_seeds_reproduce_and_rows_do_not_depend_on_the_batch(model):
    a = model.encode(TEXTS, steps=3, seed=7)
    np.testing.assert_array_equal(a, model.encode(TEXTS, steps=3, seed=7))
    assert not np.allclose(a, model.encode(TEXTS, steps=3, seed=8))
    np.testing.assert_allclose(model.encode(TEXTS, steps=3, seed=7, batch_size=1), a, atol=1e-5)
    z = model.embed(TEXTS)
    t = model.decode(z, steps=3, seed=3, temperature=1.5)
    assert t == model.decode(z, steps=3, seed=3, temperature=1.5)
    assert model.decode(z, steps=3, seed=3, temperature=1.5, batch_size=1) == t
    assert model.generate(3, steps=3, seed=5)[0] == model.generate(3, steps=3, seed=5)[0]


def test_progress_is_off_by_default(model, capsys):
    model.encode(TEXTS, steps=2)
    assert capsys.readouterr().err == ""
    model.encode(TEXTS, steps=2, progress=True)
    assert "text->latent" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ save / load


def test_save_pretrained_round_trip_gives_identical_outputs(model, run, tmp_path):
    out = model.save_pretrained(tmp_path / "saved")
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"diffrwkv.json", "model.safetensors", "config.json", "normalizer.json", "vocab.json",
            "latent_encoder/latent_encoder.json", "latent_encoder/latent_projection.npz"} <= names  # fmt: skip
    again = DiffRwkv.from_pretrained(out)
    z = model.embed(TEXTS)
    np.testing.assert_array_equal(again.embed(TEXTS), z)
    np.testing.assert_array_equal(again.encode(TEXTS, steps=3), model.encode(TEXTS, steps=3))
    assert again.decode(z, steps=3) == model.decode(z, steps=3)
    assert again.generate(2, steps=3)[0] == model.generate(2, steps=3)[0]
    assert again.nearest(z, k=3) == model.nearest(z, k=3)
    # saving again over a saved folder replaces it; a folder holding anything else is refused
    model.save_pretrained(out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    one_line_error(lambda: model.save_pretrained(tmp_path / "other"), "holds other files")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_saved_folder_is_self_contained_and_checked(model, tmp_path):
    out = model.save_pretrained(tmp_path / "saved")
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    again = DiffRwkv.from_pretrained(moved)
    np.testing.assert_array_equal(again.embed(TEXTS), model.embed(TEXTS))
    data = bytearray((moved / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (moved / "model.safetensors").write_bytes(bytes(data))
    one_line_error(lambda: DiffRwkv.from_pretrained(moved), "model.safetensors", "sha256")


def test_frozen_backbone_by_reference_or_copied_in(tmp_path):
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7
    from rwkv_diffusion_rnn.pretrained_rwkv import save_pth

    save_pth(random_rwkv7(RWKV7Config.for_shape(1, 64), seed=1).state_dict(), tmp_path / "bb.pth")
    run = tiny_run(tmp_path, steps=2, model__rwkv_name=str(tmp_path / "bb.pth"), model__freeze_backbone=True,
                   model__vocab="full", model__n_layer=1)  # fmt: skip
    m = DiffRwkv.from_pretrained(run["save_dir"])
    z = m.encode(TEXTS, steps=2)
    ref = m.save_pretrained(tmp_path / "ref")
    copy = m.save_pretrained(tmp_path / "copy", copy_backbone=True)
    assert not (ref / "backbone").exists() and (copy / "backbone" / "bb.pth").is_file()
    assert "blocks.0.att.key.weight" not in m.record.tensor_names  # the frozen backbone is not saved as weights
    np.testing.assert_array_equal(DiffRwkv.from_pretrained(ref).encode(TEXTS, steps=2), z)
    (tmp_path / "bb.pth").unlink()
    np.testing.assert_array_equal(DiffRwkv.from_pretrained(copy).encode(TEXTS, steps=2), z)
    one_line_error(lambda: DiffRwkv.from_pretrained(ref), "bb.pth", "missing")


# -------------------------------------------------------------------------------------------- the data side


def test_embed_and_nearest_use_the_datas_encoder(model, run):
    import json

    rows = json.loads((run["data"] / "train_data.json").read_text())
    texts = [r["text"] for r in rows[:3]]
    stored = np.stack([np.load(run["data"] / r["latent_path"]) for r in rows[:3]])
    z = model.embed(texts)
    np.testing.assert_allclose(z, stored, atol=1e-5)  # the encoder that made the training latents
    near = model.nearest(z, k=2)
    assert [n[0][0] for n in near] == texts and all(abs(n[0][1] - 1) < 1e-5 for n in near)
    assert near[0][0][1] >= near[0][1][1]


def test_interpolate_runs_from_a_to_b_with_one_seed(model):
    za, zb = model.embed(TEXTS[:2])
    path = model.interpolate(za, zb, n=4, steps=3, seed=2)
    assert path.latents.shape == (4, 32) and len(path.texts) == 4 and list(path.alphas) == [0, 1 / 3, 2 / 3, 1]
    np.testing.assert_allclose(path.latents[0], za, atol=1e-6)
    np.testing.assert_allclose(path.latents[-1], zb, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(path.latents, axis=1), 1.0, atol=1e-5)  # on the arc
    assert path.texts[0] == model.decode(za, steps=3, seed=2)
    assert path.texts[-1] == model.decode(zb, steps=3, seed=2)
    from_text = model.interpolate(TEXTS[0], TEXTS[1], n=4, steps=3, seed=2)  # strings: the data's encoder
    np.testing.assert_allclose(from_text.latents, path.latents, atol=1e-6)


def test_relative_data_paths_resolve_against_the_checkpoints_folders(tmp_path, monkeypatch):
    data = tmp_path / "outputs" / "demo" / "data" / "qwen_32d"
    data.mkdir(parents=True)
    (data / "train_data.json").write_text("[]")
    step = tmp_path / "outputs" / "demo" / "run" / "step_00000001"
    step.mkdir(parents=True)
    monkeypatch.chdir(step)
    cfg = {"data": {"json_path": "outputs/demo/data/qwen_32d/train_data.json"}}
    assert find_data_dir(cfg, step) == data.resolve()
    assert find_data_dir({"data": {"json_path": "nowhere/train_data.json"}}, step) is None


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_errors(model, run, tmp_path):
    z = model.embed(TEXTS)
    one_line_error(lambda: DiffRwkv.from_pretrained(tmp_path / "nope"), "nope", "not found")
    one_line_error(lambda: model.decode(np.zeros((2, 16))), "decode", "[2, 16]", "expected [N, 32]")
    bad = z.copy()
    bad[1, 3] = np.nan
    one_line_error(lambda: model.decode(bad), "latent row 1", "NaN")
    one_line_error(lambda: model.decode(np.zeros((0, 32))), "latents are empty")
    one_line_error(lambda: model.decode([["a"] * 32]), "not numbers")
    one_line_error(lambda: model.encode([]), "encode", "texts is empty")
    one_line_error(lambda: model.encode(["fine", "  "]), "texts[1] is empty")
    one_line_error(lambda: model.encode(["fine", 3]), "texts[1] is a int")
    one_line_error(lambda: model.embed([]), "embed", "texts is empty")
    one_line_error(lambda: model.decode(z, steps=0), "steps is 0")
    one_line_error(lambda: model.decode(z, stratgy="confidence"), "unknown option 'stratgy'", "strategy")
    one_line_error(lambda: model.generate(0), "n is 0")
    one_line_error(lambda: model.nearest(z, k=0), "k is 0")
    one_line_error(lambda: model.interpolate(z, z[0]), "interpolate a", "expected one latent")
    one_line_error(lambda: DiffRwkv.from_pretrained(run["save_dir"], dtype="int8"), "dtype 'int8'")
    one_line_error(lambda: DiffRwkv.from_pretrained(run["save_dir"], device="gpu0"), "device 'gpu0'")
    if not torch.cuda.is_available():
        one_line_error(lambda: DiffRwkv.from_pretrained(run["save_dir"], device="cuda"), "CUDA is not available")
    one_line_error(lambda: DiffRwkv.from_pretrained(run["save_dir"], data_dir=tmp_path), "train_data.json")


def test_missing_encoder_and_data_are_one_line_errors(run, tmp_path):
    moved = tmp_path / "data"
    shutil.move(run["root"] / "data", moved)
    try:
        m = DiffRwkv.from_pretrained(run["save_dir"])
        assert not m.has_encoder and not m.has_data
        one_line_error(lambda: m.embed(TEXTS), "encoder is not available", "data_dir=")
        one_line_error(lambda: m.nearest(np.ones(32)), "training data is not on this machine")
        again = DiffRwkv.from_pretrained(run["save_dir"], data_dir=moved / "qwen_32d")
        assert again.embed(TEXTS).shape == (3, 32) and len(again.nearest(np.ones(32), k=2)) == 2
        assert DiffRwkv.from_pretrained(run["save_dir"], data_dir=moved).record.data_dir == again.record.data_dir
    finally:
        shutil.move(moved, run["root"] / "data")


def test_bf16_compute_runs(run):
    m = DiffRwkv.from_pretrained(run["save_dir"], dtype="bf16")
    z = m.encode(TEXTS, steps=2)
    assert z.shape == (3, 32) and z.dtype == np.float32 and np.isfinite(z).all()
    assert len(m.decode(z, steps=2)) == 3
