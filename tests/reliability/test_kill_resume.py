"""kill -9 at random moments (inside steps and inside checkpoint writes), then resume: the continued losses equal
the uninterrupted run's exactly, and no partial checkpoint is ever listed or loaded. ``bench/faults.py`` runs the
same trials (>= 20) and prints a table."""

from __future__ import annotations

import pytest

from tests.reliability._faults import reference_run, run_trial
from tests.reliability.conftest import tiny_cfg

SAVE_FREQ = 3
CI_TRIALS = 5


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    return reference_run(tiny_cfg(tiny, folder, logging__save_freq=SAVE_FREQ), folder)


@pytest.mark.parametrize("seed", range(CI_TRIALS))
def test_kill9_then_resume_continues_the_same_losses(tiny, reference, tmp_path, seed):
    assert sorted(reference) == list(range(1, 13))
    trial = run_trial(tiny_cfg(tiny, tmp_path, logging__save_freq=SAVE_FREQ), tmp_path, reference, seed, SAVE_FREQ)
    assert trial.ok, trial
    print(trial)
