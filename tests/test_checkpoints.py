"""Atomic step checkpoints: bit-exact round trips and resume, verification, crashes, pruning, refused pickles."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from rwkv_diffusion_rnn import checkpoints
from rwkv_diffusion_rnn.checkpoints import (
    FORMAT_VERSION,
    apply_model_tensors,
    backbone_reference,
    backbone_sha256,
    capture_rng_state,
    file_sha256,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_backbone,
)
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.optimizer import EMA, build_optimizer, build_scheduler, load_optimizer_state

V, C = 24, 12


class Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.frozen = nn.Linear(C, C)
        self.frozen.requires_grad_(False)
        self.emb = nn.Embedding(V, C)
        self.body = nn.Linear(C, C)
        self.head = nn.Linear(C, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.frozen(self.emb(ids))
        h = h + torch.randn_like(h) * 0.01  # a draw from the global RNG each step: resume must replay it
        return self.head(torch.tanh(self.body(h)))


class Run:
    """Model, optimizer, schedule and EMA, advanced one step at a time on batches fixed by the step number."""

    def __init__(self, seed: int = 0) -> None:
        self.model = Net(seed)
        self.opt = build_optimizer(self.model, lr=3e-2, weight_decay=0.1)
        self.sched = build_scheduler(self.opt, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
        self.ema = EMA(self.model, decay=0.9)
        self.losses: list[float] = []

    def step(self, s: int) -> None:
        g = torch.Generator().manual_seed(s)
        ids, tgt = torch.randint(0, V, (3, 5), generator=g), torch.randint(0, V, (3, 5), generator=g)
        loss = F.cross_entropy(self.model(ids).flatten(0, 1), tgt.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.ema.update(self.model)
        self.losses.append(loss.item())

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self, save_dir: Path, step: int, **kw) -> Path:
        args = dict(
            model_tensors=self.trainable(),
            optimizer=self.opt.state_dict(),
            scheduler=self.sched.state_dict(),
            ema=self.ema.state_dict(),
            rng=capture_rng_state(),
            data_state={"epoch": 0, "position": step * 3, "seed": 7},
            config={"training": {"lr": 3e-2, "steps": 10}, "model": {"name": "net"}},
            backbone={"path": "/models/rwkv.pth", "sha256": "ab" * 32},
            extra={"losses": self.losses},
        )
        args.update(kw)
        return save_checkpoint(save_dir, step, **args)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every global RNG starts from a fixed state in every test."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Run, Path]:
    run = Run()
    for s in range(3):
        run.step(s)
    return run, run.save(tmp_path / "ckpt", 3)


def test_round_trip_is_bit_exact(saved: tuple[Run, Path]) -> None:
    run, path = saved
    assert path.name == "step_00000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors", "meta.json", "model.safetensors", "optimizer.pt", "rng_rank0.pt"
    ]  # fmt: skip
    ck = load_checkpoint(path)
    assert ck.step == 3 and ck.path == path
    assert ck.model_tensors.keys() == run.trainable().keys()
    assert not any(n.startswith("frozen.") for n in ck.model_tensors)  # the backbone is referenced, not copied
    for n, t in run.trainable().items():
        assert torch.equal(ck.model_tensors[n], t) and ck.model_tensors[n].dtype == t.dtype
    assert ck.ema["num_updates"] == 3 and ck.ema["decay"] == 0.9
    assert all(torch.equal(ck.ema["shadow"][n], s) for n, s in run.ema.shadow.items())
    ref = run.opt.state_dict()
    assert ck.optimizer["param_groups"] == ref["param_groups"]
    for i, st in ref["state"].items():
        assert st.keys() == ck.optimizer["state"][i].keys()
        assert all(torch.equal(st[k], ck.optimizer["state"][i][k]) for k in st)
    assert ck.scheduler == run.sched.state_dict()
    assert ck.data_state == {"epoch": 0, "position": 9, "seed": 7}
    assert ck.config["training"]["lr"] == 3e-2 and ck.backbone["sha256"] == "ab" * 32
    assert ck.extra["losses"] == run.losses
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["rng_ranks"] == [0]
    assert meta["tensors"]["model"]["head.weight"] == {"dtype": "float32", "shape": [V, C]}
    assert meta["files"]["model.safetensors"]["sha256"] == file_sha256(path / "model.safetensors")
    assert ck.rng_for(0)["torch"].dtype == torch.uint8


def test_other_dtypes_and_tied_tensors_round_trip(tmp_path: Path) -> None:
    w = torch.randn(4, 3)
    tensors = {"a": w, "tied": w, "half": torch.randn(5).bfloat16(), "ids": torch.arange(6), "view": w[1:, :2]}
    path = save_checkpoint(
        tmp_path, 0, model_tensors=tensors, optimizer=None, scheduler=None, ema=None,
        rng=capture_rng_state(), data_state={}, config={}, backbone=None,
    )  # fmt: skip
    ck = load_checkpoint(path)
    assert ck.ema is None and ck.optimizer is None and ck.backbone is None
    for n, t in tensors.items():
        assert ck.model_tensors[n].dtype == t.dtype and torch.equal(ck.model_tensors[n], t), n


def test_resume_equals_the_uninterrupted_run_bitwise(tmp_path: Path) -> None:
    torch.manual_seed(123)
    straight = Run()
    for s in range(6):
        straight.step(s)

    torch.manual_seed(123)
    first = Run()
    for s in range(3):
        first.step(s)
    first.save(tmp_path, 3)
    for s in range(3, 5):  # the crashed run went on a little; those steps are lost
        first.step(s)
    torch.manual_seed(999)  # the new process starts from another RNG state

    ck = load_checkpoint(tmp_path)
    resumed = Run(seed=5)  # other initial weights: everything must come from the checkpoint
    apply_model_tensors(resumed.model, ck.model_tensors, require=resumed.trainable())
    load_optimizer_state(resumed.opt, ck.optimizer)
    resumed.sched.load_state_dict(ck.scheduler)
    resumed.ema.load_state_dict(ck.ema)
    restore_rng_state(ck.rng_for(0))
    resumed.losses = list(ck.extra["losses"])
    with torch.no_grad():  # the frozen backbone is loaded from its own file in real runs
        for a, b in zip(resumed.model.frozen.parameters(), straight.model.frozen.parameters(), strict=True):
            a.copy_(b)
    for s in range(3, 6):
        resumed.step(s)

    assert resumed.losses == straight.losses
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), n
    assert all(torch.equal(straight.ema.shadow[n], s) for n, s in resumed.ema.shadow.items())
    assert straight.ema.num_updates == resumed.ema.num_updates == 6
    assert [g["lr"] for g in straight.opt.param_groups] == [g["lr"] for g in resumed.opt.param_groups]
    ref = straight.opt.state_dict()["state"]
    got = resumed.opt.state_dict()["state"]
    assert all(torch.equal(ref[i][k], got[i][k]) for i in ref for k in ref[i])


def test_rng_restore_reproduces_draws(tmp_path: Path) -> None:
    state = capture_rng_state()

    def draws() -> tuple:
        return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4).tolist()

    first = draws()
    restore_rng_state(state)
    assert draws() == first
    path = save_checkpoint(
        tmp_path, 1, model_tensors={}, optimizer=None, scheduler=None, ema=None,
        rng={0: state, 1: capture_rng_state()}, data_state={}, config={}, backbone=None,
    )  # fmt: skip
    ck = load_checkpoint(path)
    restore_rng_state(ck.rng_for(0))
    assert draws() == first
    assert sorted(ck.rng) == [0, 1] and (path / "rng_rank1.pt").is_file()
    with pytest.raises(DiffRwkvError, match="no RNG state for rank 2") as err:
        ck.rng_for(2)
    one_line(err)
    with pytest.raises(DiffRwkvError, match="RNG state: malformed"):
        restore_rng_state({"torch": torch.zeros(3)})


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        ("flip", "model.safetensors", "sha256 does not match"),
        ("flip", "optimizer.pt", "sha256 does not match"),
        ("truncate", "optimizer.pt", "truncated"),
        ("truncate", "ema.safetensors", "truncated"),
        ("delete", "ema.safetensors", "missing"),
        ("delete", "rng_rank0.pt", "missing"),
        ("truncate", "meta.json", "unreadable"),
        ("delete", "meta.json", "missing"),
    ],
)
def test_damaged_files_are_named_in_one_line(saved: tuple[Run, Path], damage: str, file: str, message: str) -> None:
    _, path = saved
    target = path / file
    if damage == "flip":
        _flip_byte(target, target.stat().st_size // 2)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.unlink()
    with pytest.raises(DiffRwkvError, match=message) as err:
        load_checkpoint(path)
    assert file in one_line(err)


def test_without_verify_a_truncated_file_still_fails_cleanly(saved: tuple[Run, Path]) -> None:
    _, path = saved
    target = path / "model.safetensors"
    target.write_bytes(target.read_bytes()[:40])
    with pytest.raises(DiffRwkvError, match="model.safetensors: unreadable") as err:
        load_checkpoint(path, verify=False)
    one_line(err)


def test_a_pickle_that_would_run_code_is_refused(saved: tuple[Run, Path], tmp_path: Path) -> None:
    _, path = saved
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"optimizer": Evil(), "scheduler": None}, path / "optimizer.pt")
    meta = json.loads((path / "meta.json").read_text())  # a forger fixes the checksums too
    meta["files"]["optimizer.pt"] = {
        "bytes": (path / "optimizer.pt").stat().st_size,
        "sha256": file_sha256(path / "optimizer.pt"),
    }
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DiffRwkvError, match="optimizer.pt: refused") as err:
        load_checkpoint(path)
    one_line(err)
    assert not marker.exists()


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.pt"])
def test_non_finite_values_are_refused_even_with_fixed_up_checksums(saved: tuple[Run, Path], file: str) -> None:
    _, path = saved
    if file == "model.safetensors":
        tensors = safetensors.torch.load_file(str(path / file))
        g = torch.Generator().manual_seed(5)
        name = sorted(tensors)[int(torch.randint(0, len(tensors), (), generator=g))]
        flat = tensors[name].view(-1)
        flat[int(torch.randint(0, flat.numel(), (), generator=g))] = float("nan")
        safetensors.torch.save_file(tensors, str(path / file))
    else:
        payload = torch.load(path / file, weights_only=True)
        pid, entry = next(iter(payload["optimizer"]["state"].items()))
        name = f"state.{pid}.exp_avg_sq"
        entry["exp_avg_sq"].view(-1)[0] = float("inf")
        torch.save(payload, path / file)
    meta = json.loads((path / "meta.json").read_text())
    meta["files"][file] = {"bytes": (path / file).stat().st_size, "sha256": file_sha256(path / file)}
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DiffRwkvError, match="NaN or infinite") as err:
        load_checkpoint(path)
    assert name in one_line(err) and file in one_line(err)


def test_crash_mid_save_leaves_no_step_folder(saved: tuple[Run, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    run, first = saved
    save_dir = first.parent
    run.step(3)

    def disk_full(path: Path, obj: object) -> None:  # model.safetensors and ema.safetensors are already written
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoints, "_write_torch", disk_full)
    with pytest.raises(DiffRwkvError, match="No space left on device") as err:
        run.save(save_dir, 4)
    assert "step_00000004" in one_line(err)
    assert [p.name for p in save_dir.iterdir()] == ["step_00000003"]  # no step_4, no .tmp-* left
    assert load_checkpoint(save_dir).step == 3

    def interrupted(path: Path, obj: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "_write_torch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.save(save_dir, 4)
    assert [p.name for p in save_dir.iterdir()] == ["step_00000003"]


def test_leftovers_of_a_killed_save_are_ignored_then_removed(saved: tuple[Run, Path]) -> None:
    run, first = saved
    save_dir = first.parent
    partial = save_dir / ".tmp-step_00000004-deadbeef"  # what kill -9 during a write leaves
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    assert list_checkpoints(save_dir) == [first] and latest_checkpoint(save_dir) == first
    assert load_checkpoint(save_dir).step == 3
    run.save(save_dir, 5)
    assert sorted(p.name for p in save_dir.iterdir()) == ["step_00000003", "step_00000005"]


def test_unwritable_save_dir_is_a_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DiffRwkvError, match="cannot create a checkpoint folder") as err:
        Run().save(blocker / "ckpt", 1)
    assert str(blocker) in one_line(err)


def test_keep_last_prunes_oldest_and_keeps_the_new_one(tmp_path: Path) -> None:
    run = Run()
    for s in range(1, 6):
        run.save(tmp_path, s, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    with pytest.warns(UserWarning, match="later steps"):
        run.save(tmp_path, 2, keep_last=2)  # an older step (a rollback) is kept although not among the newest
    assert [_step(p) for p in list_checkpoints(tmp_path)] == [2, 4, 5]
    run.save(tmp_path, 6, keep_last=None)
    assert [_step(p) for p in list_checkpoints(tmp_path)] == [2, 4, 5, 6]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_same_step_is_replaced(tmp_path: Path) -> None:
    run = Run()
    run.save(tmp_path, 7, data_state={"v": 1})
    run.save(tmp_path, 7, data_state={"v": 2})
    assert load_checkpoint(tmp_path / "step_00000007").data_state == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000007"]


def _step(p: Path) -> int:
    return int(p.name.split("_")[1])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"optimizer": {"state": {0: {"x": np.zeros(2)}}}}, r"optimizer.pt\['optimizer'\]\['state'\]\[0\]\['x'\]"),
        ({"config": {"training": {"lr": float("nan")}}}, r"config.training.lr: nan"),
        ({"data_state": {"gen": torch.zeros(2)}}, r"data_state.gen: a Tensor"),
        ({"model_tensors": {"w": [1.0]}}, r"model_tensors: entry 'w' is not a tensor"),
        ({"config": OmegaConf.create({"a": 1})}, r"config: a DictConfig cannot be written"),
        ({"backbone": {"path": "x"}}, r"backbone: expected a reference"),
        ({"rng": {"python": 1}}, r"rng: expected capture_rng_state"),
    ],
)
def test_bad_arguments_write_nothing(tmp_path: Path, kw: dict, message: str) -> None:
    with pytest.raises(DiffRwkvError, match=message) as err:
        Run().save(tmp_path / "ckpt", 1, **kw)
    one_line(err)
    assert not (tmp_path / "ckpt").exists()


def test_load_resolution_and_bad_meta(saved: tuple[Run, Path], tmp_path: Path) -> None:
    run, path = saved
    run.save(path.parent, 9)
    assert load_checkpoint(path.parent).step == 9
    assert load_checkpoint(path).step == 3
    with pytest.raises(DiffRwkvError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffRwkvError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty")
    meta = json.loads((path / "meta.json").read_text())
    for change, message in (
        ({"format_version": FORMAT_VERSION + 1}, "newer than this code reads"),
        ({"files": {**meta["files"], "../../etc/passwd": {"bytes": 1, "sha256": "0"}}}, "path traversal"),
        ({"step": 4}, "does not match the folder name"),
        ({"tensors": {**meta["tensors"], "model": {}}}, "tensor 'body.bias'"),
    ):
        (path / "meta.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(DiffRwkvError, match=message) as err:
            load_checkpoint(path, verify=False)
        assert "meta.json" in one_line(err) or "model.safetensors" in str(err.value)


def test_apply_model_tensors_checks_everything_before_copying(saved: tuple[Run, Path]) -> None:
    _, path = saved
    ck = load_checkpoint(path)
    target = Net(seed=4)
    before = {n: t.clone() for n, t in target.state_dict().items()}
    wrong = dict(ck.model_tensors)
    wrong["head.weight"] = torch.zeros(V + 1, C)  # another vocabulary size
    for tensors, message in (
        (wrong, "'head.weight' is torch.float32 \\(25, 12\\)"),
        ({**ck.model_tensors, "extra.weight": torch.zeros(1)}, "'extra.weight' does not exist"),
        ({**ck.model_tensors, "body.bias": ck.model_tensors["body.bias"].double()}, "'body.bias' is torch.float64"),
    ):
        with pytest.raises(DiffRwkvError, match=message) as err:
            apply_model_tensors(target, tensors, where=str(path))
        one_line(err)
        assert all(torch.equal(t, before[n]) for n, t in target.state_dict().items())
    with pytest.raises(DiffRwkvError, match="'body.weight' is missing"):
        apply_model_tensors(target, {}, require=["body.weight"])
    apply_model_tensors(target, ck.model_tensors)
    assert torch.equal(target.head.weight, ck.model_tensors["head.weight"])


def test_file_sha256_and_backbone_reference(tmp_path: Path) -> None:
    data = np.random.default_rng(1).bytes(10_000)
    f = tmp_path / "backbone.pth"
    f.write_bytes(data)
    assert file_sha256(f, chunk=7) == hashlib.sha256(data).hexdigest()
    ref = backbone_reference(f)
    assert ref == {"path": str(f.resolve()), "sha256": hashlib.sha256(data).hexdigest(), "bytes": 10_000}
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(data)
    r1 = backbone_reference(folder)
    (folder / "config.json").write_text('{"n_layer": 2}')
    assert backbone_reference(folder)["sha256"] != r1["sha256"]
    verify_backbone(ref, copy.deepcopy(ref), "ckpt")
    with pytest.raises(DiffRwkvError, match="trained on backbone") as err:
        verify_backbone(ref, r1, "ckpt")
    one_line(err)
    with pytest.raises(DiffRwkvError, match="cannot be read"):
        file_sha256(tmp_path / "missing")


def test_hf_folder_backbone_is_hashed_and_a_changed_one_refused(tmp_path: Path) -> None:
    """A folder backbone's digest covers its weight files and config.json in name order (not tokenizer files); a
    checkpoint records it even when the reference came without one, and a changed folder is refused in one line."""
    rng = np.random.default_rng(2)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "rwkv7"}')
    (folder / "model-00002-of-00002.safetensors").write_bytes(rng.bytes(300))
    (folder / "model-00001-of-00002.safetensors").write_bytes(rng.bytes(500))
    (folder / "tokenizer.json").write_text("{}")
    names = ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    lines = "".join(f"{f}\0{file_sha256(folder / f)}\n" for f in names)
    digest = hashlib.sha256(lines.encode()).hexdigest()
    assert backbone_sha256(folder) == digest
    assert backbone_reference(folder) == {"path": str(folder.resolve()), "sha256": digest, "bytes": 823}
    (folder / "tokenizer.json").write_text('{"changed": true}')  # not part of the backbone
    assert backbone_sha256(folder) == digest

    run = Run()
    run.step(0)
    as_given = {"path": str(folder), "sha256": None}  # what the trainer passes for a folder
    ck = load_checkpoint(run.save(tmp_path / "ckpt", 1, backbone=as_given))
    assert ck.backbone == {"path": str(folder), "sha256": digest}
    verify_backbone(ck.backbone, as_given, str(ck.path))  # unchanged: resumes
    (folder / "model-00002-of-00002.safetensors").write_bytes(rng.bytes(300))  # same size, other weights
    with pytest.raises(DiffRwkvError, match="trained on backbone .*hf") as err:
        verify_backbone(ck.backbone, as_given, str(ck.path))
    one_line(err)
    verify_backbone({"path": str(folder), "sha256": None}, as_given, "old")  # recorded without one: not checked
    (folder / "model-00001-of-00002.safetensors").unlink()
    (folder / "model-00002-of-00002.safetensors").unlink()
    (folder / "config.json").unlink()
    with pytest.raises(DiffRwkvError, match="holds no \\*.safetensors") as err:
        backbone_sha256(folder)
    one_line(err)
