"""Every test of the model code starts from a seeded global generator, so draws made without a generator of their
own (``torch.randn(...)``, ``torch.randint(...)``) are the same on every run."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def seeded_global_rng() -> None:
    torch.manual_seed(0)
