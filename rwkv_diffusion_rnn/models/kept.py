"""Keep a traced operator's outputs for the backward of a compiled block instead of letting the partitioner recompute
them (:func:`kept`).

Under a memory budget below 1 (``training.memory_budget``) the partitioner of a compiled graph may recompute, in the
backward, any node it is not told to keep, and it weighs a custom or Triton operator by its FLOPs (none counted:
free). So it re-ran the WKV forward kernel in the backward to drop the states that kernel keeps (H100, 2026-12-06:
0.4B WKV time 22.2 -> 32.0 ms a step), and the WKV operands' operator's forward once more a layer to drop its four
outputs (1.2 ms a step at 0.4B, 2026-12-07). A selective-checkpoint region whose policy marks the operator
MUST_SAVE bans that recomputation and leaves every other node to the partitioner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


def kept(fn: Callable, *args, ops: tuple = ()):
    """``fn(*args)``; inside a compiled graph, with the outputs of ``ops`` (``OpOverload`` s; empty: every
    operator ``fn`` runs) marked for the partitioner to save, never to recompute. ``fn`` must not modify its inputs
    in place (a selective-checkpoint region under ``torch.compile``)."""
    if not torch.compiler.is_compiling():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=partial(_contexts, ops))


def _contexts(ops: tuple):
    def policy(_ctx, op, *_args, **_kwargs):
        return CheckpointPolicy.MUST_SAVE if not ops or op in ops else CheckpointPolicy.PREFER_SAVE

    return create_selective_checkpoint_contexts(policy)


class _SelectiveCheckpointNote(logging.Filter):
    """Drops torch's once-a-process note that a checkpointed region under torch.compile must hold no in-place op
    (ours hold none): the selective checkpoint is ours, not the user's, and the note is not for them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


logging.getLogger("torch._higher_order_ops.wrap").addFilter(_SelectiveCheckpointNote())
