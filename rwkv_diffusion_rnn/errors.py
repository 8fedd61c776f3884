"""The one exception type user-facing code raises for bad input.

A :class:`DiffRwkvError` carries a single line that names the file, row, key or tensor at fault and what was
expected. The ``diffrwkv`` command prints it as ``error: <message>`` and exits with status 2 instead of showing a
traceback; library callers can catch it like any other ``ValueError``.
"""

from __future__ import annotations


class DiffRwkvError(ValueError):
    """Bad input or configuration, described in one line."""
