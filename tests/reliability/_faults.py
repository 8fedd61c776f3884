"""Kill -9 / resume trials shared by ``test_kill_resume.py`` (a few trials in CI) and ``bench/faults.py`` (>= 20).

One trial: start the training worker, SIGKILL it at a moment drawn from a seeded RNG — either inside a step (after
some number of logged steps plus a random delay) or inside a checkpoint write (as soon as a ``.tmp-step_*`` folder
appears) — check that only complete checkpoints are listed and each verifies, resume from the newest (or start
over when there is none), repeat for the trial's kills, then run to the end. Every step's loss of every attempt must
equal the uninterrupted run's loss of that step exactly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rwkv_diffusion_rnn.checkpoints import list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "reliability" / "_train_worker.py"
SLOW_SAVE = "0.15"  # seconds before each .pt file of a checkpoint: a kill can land inside the write


@dataclass
class Trial:
    seed: int
    kills: list[str] = field(default_factory=list)  # "step@<n>+<ms>ms" or "ckpt-write#<k>"
    outcomes: list[str] = field(default_factory=list)  # what each kill left: "resumed@<step>", "fresh", ...
    resumed_steps_checked: int = 0
    ok: bool = False


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DIFFRWKV_SLOW_SAVE=SLOW_SAVE)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(cfg_file: Path, losses: Path, resume: Path | None) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), str(cfg_file), str(losses)] + ([str(resume)] if resume else [])
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({proc.returncode}): {err[-3000:]}")


def read_losses(path: Path) -> dict[int, float]:
    """step -> loss from a worker's losses file; a line cut by the kill (no newline yet) is ignored."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().split("\n")[:-1]:
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def write_config(cfg, path: Path) -> Path:
    path.write_text(json.dumps(asdict(cfg)))
    return path


def reference_run(cfg, folder: Path) -> dict[int, float]:
    """The uninterrupted run: step -> loss."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg.logging.save_dir = str(folder / "ckpt")
    losses = folder / "losses.jsonl"
    _finish(_start(write_config(cfg, folder / "cfg.json"), losses, None))
    return read_losses(losses)


def _kill_when(
    proc: subprocess.Popen, save_dir: Path, losses: Path, kind: str, n: int, delay: float, before: set[Path]
) -> bool:
    """Wait for the moment and SIGKILL; False when the run ended first (the kill came too late). ``before``: the
    ``.tmp-*`` leftovers of an earlier kill, which do not count as a save in progress."""
    deadline = time.monotonic() + 300
    seen_tmp = 0
    was_tmp = False
    while proc.poll() is None and time.monotonic() < deadline:
        if kind == "step":
            if len(read_losses(losses)) >= n:
                time.sleep(delay)
                break
        else:
            tmp = save_dir.is_dir() and any(p not in before for p in save_dir.glob(".tmp-step_*"))
            if tmp and not was_tmp:
                seen_tmp += 1
                if seen_tmp >= n:
                    break
            was_tmp = tmp
        time.sleep(0.002)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    return True


def check_checkpoints(save_dir: Path) -> int | None:
    """Only complete checkpoints are listed and every one verifies; the newest step (None when there is none)."""
    listed = list_checkpoints(save_dir)
    for c in listed:
        assert (c / "meta.json").is_file(), c
        ck = load_checkpoint(c, verify=True)
        assert ck.step == int(c.name.split("_")[1])
    for p in save_dir.glob("step_*") if save_dir.is_dir() else []:
        assert p in listed, f"{p}: a step_* folder that is not a complete checkpoint"
    return load_checkpoint(save_dir).step if listed else None


def run_trial(cfg, folder: Path, reference: dict[int, float], seed: int, save_freq: int) -> Trial:
    rng = random.Random(seed)
    trial = Trial(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_dir = folder / "ckpt"
    cfg.logging.save_dir = str(save_dir)
    cfg_file = write_config(cfg, folder / "cfg.json")
    total = max(reference)
    resume: Path | None = None
    start_step = 0
    for attempt in range(rng.choice([1, 2])):
        losses = folder / f"losses{attempt}.jsonl"
        saves_left = (total - start_step) // save_freq - 1  # never the last save: the run would end with it
        if saves_left >= 1 and rng.random() < 0.5:
            kind, n, delay = "ckpt", rng.randint(1, saves_left), 0.0
            label = f"ckpt-write#{n}"
        else:
            kind, n, delay = "step", rng.randint(1, max(1, total - start_step - 1)), rng.uniform(0, 0.05)
            label = f"step@{n}+{delay * 1000:.0f}ms"
        # the kill moment counts from this attempt's start: the n-th step / save after it
        tmp_before = set(save_dir.glob(".tmp-*")) if save_dir.is_dir() else set()
        proc = _start(cfg_file, losses, resume)
        killed = _kill_when(proc, save_dir, losses, kind, n, delay, tmp_before)
        got = read_losses(losses)
        for step, loss in got.items():
            assert loss == reference[step], (seed, attempt, step, loss, reference[step])
        trial.resumed_steps_checked += len([s for s in got if s > start_step]) if attempt else 0
        if not killed:
            trial.kills.append(label + " (run ended first)")
            trial.outcomes.append("completed")
            trial.ok = max(got) == total
            return trial
        left_tmp = bool(set(save_dir.glob(".tmp-*")) - tmp_before) if save_dir.is_dir() else False
        trial.kills.append(label + (" [mid-write]" if left_tmp else ""))
        newest = check_checkpoints(save_dir)
        if newest is None:
            resume, start_step = None, 0
            trial.outcomes.append("fresh")
        else:
            resume, start_step = save_dir, newest
            trial.outcomes.append(f"resumed@{newest}")
    losses = folder / "final.jsonl"
    proc = _start(cfg_file, losses, resume)
    _finish(proc)
    got = read_losses(losses)
    assert sorted(got) == list(range(start_step + 1, total + 1)), (seed, sorted(got), start_step)
    for step, loss in got.items():
        assert loss == reference[step], (seed, step, loss, reference[step])
    trial.resumed_steps_checked += len(got)
    check_checkpoints(save_dir)
    assert not list(save_dir.glob(".tmp-*")), "leftovers of a killed save were not removed by the next save"
    trial.ok = True
    return trial
