"""kill -9 / resume reliability bench: the CI test's code path (tests/reliability/_faults.py), >= 20 trials.

    python bench/faults.py [--trials 20] [--seed0 1000]

Each trial trains a tiny model on CPU in a subprocess, SIGKILLs it at a seeded random moment (inside a step, or
inside a checkpoint write), checks that only complete, checksum-verified checkpoints are listed, resumes, and
compares every continued step's loss with the uninterrupted run's (exact equality). Prints one row per trial.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config, random_rwkv7  # noqa: E402
from rwkv_diffusion_rnn.pretrained_rwkv import save_pth  # noqa: E402
from tests.data_helpers import make_dataset  # noqa: E402
from tests.reliability._faults import reference_run, run_trial  # noqa: E402
from tests.reliability.conftest import tiny_cfg  # noqa: E402

SAVE_FREQ = 3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed0", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_dataset(root / "ds", n=16, seed=7)
        save_pth(random_rwkv7(RWKV7Config.for_shape(2, 64), seed=11).state_dict(), root / "bb.pth")
        tiny = (root, paths)
        reference = reference_run(tiny_cfg(tiny, root / "ref", logging__save_freq=SAVE_FREQ), root / "ref")
        rows, failures = [], 0
        print(f"{'trial':>5}  {'seed':>5}  {'kill moments':<44}  {'outcomes':<26}  {'steps checked':>13}  result")
        for i in range(args.trials):
            seed = args.seed0 + i
            folder = root / f"t{i}"
            try:
                t = run_trial(tiny_cfg(tiny, folder, logging__save_freq=SAVE_FREQ), folder, reference, seed, SAVE_FREQ)
                result = "ok" if t.ok else "FAIL"
            except AssertionError as exc:
                failures += 1
                print(f"{i:>5}  {seed:>5}  FAIL: {' '.join(str(exc).split())[:200]}")
                continue
            failures += not t.ok
            rows.append(t)
            print(f"{i:>5}  {seed:>5}  {', '.join(t.kills):<44}  {', '.join(t.outcomes):<26}  "
                  f"{t.resumed_steps_checked:>13}  {result}")  # fmt: skip
        kinds = Counter(k.split("@")[0].split("#")[0] for t in rows for k in t.kills)
        mid = sum("[mid-write]" in k for t in rows for k in t.kills)
        outcomes = Counter(o.split("@")[0] for t in rows for o in t.outcomes)
        print(f"\ntrials {args.trials}, kills {sum(kinds.values())} ({dict(kinds)}), killed inside a checkpoint "
              f"write {mid}, outcomes {dict(outcomes)}, failures {failures}")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
