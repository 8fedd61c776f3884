"""The recipe a g1 user runs, CPU-sized: a genuinely pretrained (if tiny) RWKV-7 language model, saved as a
BlinkDL ``.pth`` and loaded by path, with the backbone frozen, against the same recipe on the random backbone the
pretraining started from (same seed, batches and masks). With ``model.use_rwkv_lm_head`` the pretrained backbone's
text loss must fall far below the random one's; with a fresh text head (the default) both must learn and the
pretrained one must not be worse — at this scale its edge is small (4.61 vs 4.62 after 200 steps; the fresh head
reads position i, whose input is a mask the language model never saw, while the LM head reads position i - 1,
exactly what pretraining taught: docs/pretrained.md). The frozen weights must stay bit for bit what the file
holds. The GPU version of the
same comparison is bench/standin_pretrain.py + bench/captions_run.py (docs/pretrained.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv_diffusion_rnn import cli, corpus
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.improved_trainer import Trainer
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7
from rwkv_diffusion_rnn.pipeline import load_trained
from rwkv_diffusion_rnn.preprocess_tokenize_text import tokenize_json
from rwkv_diffusion_rnn.pretrained_rwkv import load_rwkv_model, save_pth
from rwkv_diffusion_rnn.tokenizer import load_tokenizer
from tests.train_helpers import make_cfg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

SHAPE = (2, 64)
STEPS = 60


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """``pretrained.pth``: next-token training on corpus sentences the denoiser never sees; ``random.pth``: the
    initialisation that training started from (same seed, same shape)."""
    from standin_pretrain import plain_copy, pretrain

    root = tmp_path_factory.mktemp("recipe")
    tok = load_tokenizer("BlinkDL/rwkv7-g1")
    ids: list[int] = []
    for row in tok.encode_batch(corpus.generate(3000, seed=11)):
        ids.extend(row + [0])
    torch.manual_seed(0)
    save_pth(random_rwkv7(RWKV7Config.for_shape(*SHAPE), seed=0).state_dict(), root / "random.pth")
    model, tr = pretrain(
        np.asarray(ids, dtype=np.uint16), n_layer=SHAPE[0], n_embd=SHAPE[1], length=24, batch=16, lr=4e-3,
        warmup=10, budget=120, budget_in_steps=True, device=torch.device("cpu"), seed=0, log=lambda s: None,
    )  # fmt: skip
    assert tr["timed_steps"] == 120 and tr["last"]["loss"] < 3.0, tr["last"]  # it learned the corpus' language
    save_pth(plain_copy(model, *SHAPE, "cpu").state_dict(), root / "pretrained.pth")
    # the denoiser's data: other sentences, latents from prepare-latents' hashing test encoder (so that
    # `diffrwkv evaluate` finds the data's encoder as with real data), tokenized
    src = root / "sentences.txt"
    src.write_text("\n".join(corpus.generate(120, seed=5)) + "\n")
    q = root / "data" / "qwen_32d"
    argv = ["prepare-latents", "--input", str(src), "--output_dir", str(q), "--encoder", "test-hash"]
    assert cli.main([*argv, "--validation-fraction", "0.2"]) == 0
    for split in ("train", "validation"):
        tokenize_json(q / f"{split}_data.json", root / "data" / "rwkv_tokens", max_length=64)
    paths = {"data": q, "json": q / "train_data.json", "token_dir": root / "data" / "rwkv_tokens" / "train",
             "latent_dir": q / "latents" / "train"}  # fmt: skip
    return root, paths


def train_frozen(backbones, name: str, save_dir: Path, **over) -> tuple[list[float], Trainer]:
    root, data = backbones
    cfg = make_cfg((root, data), save_dir, model__freeze_backbone=True, training__max_steps=STEPS,
                   training__train_batch_size=16, training__seed=0, **over)  # fmt: skip
    cfg.model.rwkv_name = str(root / name)
    trainer = Trainer(cfg)
    losses = [float(trainer.train_step()["text_loss"]) for _ in range(STEPS)]
    return losses, trainer


@pytest.mark.slow
@pytest.mark.parametrize("lm_head", [False, True], ids=["fresh-head", "rwkv-lm-head"])
def test_pretrained_frozen_backbone_learns_more_than_a_random_one(backbones, tmp_path, lm_head):
    runs = {}
    for name in ("pretrained.pth", "random.pth"):
        losses, trainer = train_frozen(backbones, name, tmp_path / name, model__use_rwkv_lm_head=lm_head)
        runs[name] = losses
        # frozen means frozen: every backbone tensor equals the file's, and none reached the optimizer
        ref = load_rwkv_model(backbones[0] / name).state_dict()
        for k, p in trainer.model.backbone.state_dict().items():
            assert torch.equal(p.cpu(), ref[k]), (name, k)
        in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert not any(id(p) in in_opt for p in trainer.model.backbone.parameters())
    first = {k: float(np.mean(v[:3])) for k, v in runs.items()}
    end = {k: float(np.mean(v[-15:])) for k, v in runs.items()}
    if lm_head:  # the pretrained head on the pretrained states: the text is mostly predicted from the first step
        assert end["pretrained.pth"] < 0.6 * end["random.pth"], (end, first)
        assert first["pretrained.pth"] < 0.7 * first["random.pth"], (end, first)
    else:  # a fresh head learns on either backbone; the pretrained one never does worse
        assert all(end[k] < 0.55 * first[k] for k in end), (end, first)
        assert end["pretrained.pth"] <= 1.01 * end["random.pth"], (end, first)


@pytest.mark.slow
def test_frozen_checkpoint_loads_samples_and_refuses_a_changed_backbone(backbones, tmp_path):
    root, data = backbones
    bb = tmp_path / "bb.pth"
    bb.write_bytes((root / "pretrained.pth").read_bytes())
    cfg = make_cfg((root, data), tmp_path / "run", model__freeze_backbone=True, training__max_steps=4,
                   data__pad_to_length=24)  # fmt: skip
    cfg.model.rwkv_name = str(bb)
    Trainer(cfg).fit()
    m = load_trained(tmp_path / "run")
    assert m.denoiser.backbone.head.weight.shape[0] == 65536  # the World vocabulary, as a g1 file has
    out = tmp_path / "l2t.jsonl"
    argv = ["sample", "--checkpoint", str(tmp_path / "run"), "--data", str(data["data"]), "--limit", "3",
            "--steps", "2", "--device", "cpu", "--no-progress", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0 and len(out.read_text().splitlines()) == 3
    argv = ["evaluate", "--checkpoint", str(tmp_path / "run"), "--data", str(data["data"].parent), "--num-samples", "3",
            "--batch-size", "3", "--steps", "2", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "ev")]  # fmt: skip
    assert cli.main(argv) == 0 and (tmp_path / "ev" / "metrics.json").is_file()

    moved = tmp_path / "elsewhere.pth"
    bb.rename(moved)
    with pytest.raises(DiffRwkvError, match="missing") as e:
        load_trained(tmp_path / "run")
    assert "\n" not in str(e.value)
    moved.rename(bb)
    with open(bb, "ab") as f:
        f.write(b"\0")
    with pytest.raises(DiffRwkvError, match="sha256 differs") as e:
        load_trained(tmp_path / "run")
    assert "\n" not in str(e.value)
