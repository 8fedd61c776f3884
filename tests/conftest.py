"""Shared test helpers: random RWKV-7 checkpoints and the optional real data in ../shared/data."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config
from rwkv_diffusion_rnn.models.rwkv7 import random_rwkv7 as make_random

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Used when ../shared/data is absent (a user's clone): real English, 40+ tokens.
FALLBACK_TEXT = (
    "Two young guys with shaggy hair look at their hands while hanging out in the yard. "
    "A man in a blue shirt is standing on a ladder cleaning windows, and a little girl climbs into a wooden playhouse."
)


def _seed_global_rngs() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def seeded_module_rngs():
    """Module-scoped fixtures (a trained tiny run shared by a file's tests) are built from seeded global generators
    too, whichever tests ran before the module: autouse fixtures of a scope are set up before the others of it."""
    _seed_global_rngs()


@pytest.fixture(autouse=True)
def seeded_global_rngs():
    """Every test starts from seeded global generators (torch, NumPy's legacy one, Python's), so a draw made without
    a generator of its own is the same on every run and a failure can be reproduced."""
    _seed_global_rngs()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's spin-waiting makes
    their steps up to 50x slower when another process holds a core; restored after the module that asked for it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_rwkv7(n_layer: int, n_embd: int, vocab_size: int = 65536, seed: int = 0) -> RWKV7:
    """An RWKV-7 with every tensor non-trivial (see :func:`rwkv_diffusion_rnn.models.rwkv7.random_rwkv7`)."""
    return make_random(RWKV7Config.for_shape(n_layer, n_embd, vocab_size), seed)


def real_text_lines(limit: int | None = None) -> list[str]:
    """Validation captions from ../shared/data, or skip the calling test when the folder is absent."""
    folder = SHARED_DATA / "flickr30k-captions"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present (real data lives outside the repo)")
    lines = []
    for k in range(1, 6):
        with gzip.open(folder / f"val.{k}.en.gz", "rt", encoding="utf-8") as f:
            lines += [line.rstrip("\n") for line in f]
    return lines[:limit] if limit else lines


def sample_text() -> str:
    """40+ tokens of real text: captions when available, the fallback paragraph otherwise."""
    folder = SHARED_DATA / "flickr30k-captions"
    if folder.is_dir():
        with gzip.open(folder / "val.1.en.gz", "rt", encoding="utf-8") as f:
            return " ".join(next(f).strip() for _ in range(4))
    return FALLBACK_TEXT
