"""How every entry point runs: a user error is one line, not a traceback.

:func:`run_main` is shared by ``diffrwkv <verb>`` (:mod:`rwkv_diffusion_rnn.cli`) and by each module's own
``python rwkv_diffusion_rnn/<module>.py`` block, so the library never imports the CLI front.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from rwkv_diffusion_rnn.errors import DiffRwkvError


def run_main(fn: Callable[[list[str] | None], int | None], argv: list[str] | None) -> int:
    """Call an entry point, turning a DiffRwkvError into one line on stderr and exit status 2.

    ``DIFFRWKV_DEBUG=1`` re-raises the error instead (full traceback); Ctrl-C prints "interrupted" and
    returns 130.
    """
    try:
        return int(fn(argv) or 0)
    except DiffRwkvError as exc:
        if os.environ.get("DIFFRWKV_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
