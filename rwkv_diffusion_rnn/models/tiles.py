"""A fused Triton operator's tile (a block of rows, the flattened tokens, by a block of channels): its indices, from
scalars only. Used by the operator of models/wkv_inputs.py.

Why from scalars only: torch.compile finds which arguments a user Triton kernel writes by following each store's
address back through the kernel's IR (``identify_accessed_tensors`` in torch/_higher_order_ops/triton_kernel_wrap.py),
and a value a called ``@triton.jit`` function returns counts as derived from every argument of that call. Addresses
computed in a helper that also loaded the inputs made those inputs look written: the compiled block then copied them
around each launch, or its partitioner refused the graph (docs/RESULTS.md, 2026-12-07). The kernels take their
addresses from :func:`tile` and load through :func:`load` or helpers of their own; tests/models/test_tiles.py
checks, for every kernel, that torch sees its outputs written and nothing else.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without Triton
    triton = None

if triton is not None:

    @triton.jit
    def tile(n_rows, C, ROWS: tl.constexpr, COLS: tl.constexpr):
        """(rows ``[ROWS]``, channels ``[COLS]``, the live rows ``[ROWS]`` (within ``n_rows``), the elements' offsets
        ``[ROWS, COLS]`` in a row-major ``[n_rows, C]`` tensor) of this program: rows by ``program_id(0)``, channels
        by ``program_id(1)``."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
        return rows, cols, rows < n_rows, rows[:, None].to(tl.int64) * C + cols[None, :]

    @triton.jit
    def load(ptr, off, mask):
        """The tile of ``ptr`` at ``off`` (from :func:`tile`), in fp32; masked elements read as 0."""
        return tl.load(ptr + off, mask=mask, other=0.0).to(tl.float32)
