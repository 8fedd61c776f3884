"""AdamW with the fp32 weights in the optimizer and bf16 matmul weights in the module (``training.master_weights``).

Why: under bf16 autocast every forward casts each matmul weight to bf16 (4 bytes read, 2 written) and every
backward casts its bf16 gradient back to the fp32 parameter (2 read, 4 written); torch's fused AdamW then reads the
fp32 gradient, weight and both moments and writes the weight and the moments (28 bytes). :class:`MasterAdamW`
keeps the fp32 weights ("masters") and the moments itself and leaves bf16 copies of the matmul weights in the
module: autocast has nothing to cast, their gradients stay bf16, and one update reads the bf16 gradient, the fp32
master and moments and writes them back with the bf16 copy the next forward uses: 28 bytes a weight where the casts
and torch's AdamW move 40. The numbers do not change in kind: the forward sees the bf16 weights autocast would have
made, the gradient carries the bits it had (autocast's fp32 copy of a bf16 gradient adds none), and the update is
torch.optim.AdamW's, in fp32. Measured (docs/RESULTS.md, 2026-12-07, H100, against the same update without bf16
copies): 0.7 / 2.4 ms of kernels off the 0.1B / 0.4B step for +0.1 GiB of peak memory, once the update's loads and
stores were 16-byte vectors (the address and size hints of :meth:`MasterAdamW._grad_table`'s segments). On by
default for one bf16 CUDA process (``improved_trainer.resolve_master_weights``).

Which tensors: every trainable ``nn.Linear`` weight and RWKV-7's low-rank factors (``*.att.[wavg][12]``), which only
ever meet a matmul (:func:`matmul_weight_names`). Every other trainable tensor (embeddings, norms, per-channel
vectors, biases, adapters) stays an fp32 parameter, updated in place by the same kernel.

Layout: the fp32 weights (the masters, and the other parameters themselves), both moments and the bf16 copies are
views into flat buffers, each tensor starting at a multiple of the block (:data:`BLOCK` elements by default), so one
launch per parameter
group and kind (with or without a bf16 copy) updates every tensor; gradients stay where autograd put them, and the
kernel finds them through a table of addresses (copied to the device only when an address changes). On the CPU, or
without Triton, the same update runs tensor by tensor in torch (:meth:`MasterAdamW.step`, the reference the GPU check
``bench/gpu_check_master.py`` compares the kernel with).

The optimizer's parameters are the masters (and the fp32 parameters), so its state dict has the layout, names and
fp32 moments of the plain :func:`~rwkv_diffusion_rnn.optimizer.build_optimizer` AdamW: either resumes the other's.
What a caller uses instead of the module's parameters: :meth:`MasterAdamW.master_tensors` (name -> fp32 weight:
checkpoints, the EMA, a resume), :meth:`MasterAdamW.sync_module` after writing into them, and
:meth:`MasterAdamW.release` to give the module its fp32 weights back when training ends. Like torch's fused AdamW,
the step honours ``grad_scale`` (each gradient divided by it; the clipping of optimizer.py) and ``found_inf`` (a
non-zero value leaves weights, moments and step counts as they are), both device tensors: the host never waits.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rwkv_diffusion_rnn.errors import DiffRwkvError

try:  # the GPU kernel; the CPU path needs none of it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU install on other platforms
    triton = None

BLOCK = 2048  # elements a program updates; every tensor starts at a multiple of it in the flat buffers
NUM_WARPS = 8
LOW_RANK_FACTORS = ("*.att.[wavg][12]",)  # RWKV-7's decay / in-context-LR / value-residual / gate factors


def kernel_available() -> bool:
    """Whether the update kernel can run here (Triton imported); on CUDA without it the torch path runs."""
    return triton is not None


def matmul_weight_names(model: nn.Module) -> list[str]:
    """The trainable parameters of ``model`` that only feed matmuls: ``nn.Linear`` weights and RWKV-7's low-rank
    factors (``x @ w1`` ...). Under autocast these are the ones cast to its dtype at every use. Sorted."""
    names = {f"{m}.weight" if m else "weight" for m, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    out = []
    for n, p in model.named_parameters():
        if p.requires_grad and (n in names or any(fnmatch.fnmatchcase(n, pat) for pat in LOW_RANK_FACTORS)):
            out.append(n)
    return sorted(out)


if triton is not None:
    # this program's chunk of the tables: its tensor, where the chunk starts in the flat buffers, its indices within
    # the tensor, the mask (none where the tensor has no gradient, or with SKIPPABLE where found_ptr says skip) and
    # the gradient in fp32
    @triton.jit
    def _chunk_gradient(grads_ptr, chunk_ptr, start_ptr, off_ptr, numel_ptr, found_ptr, BLOCK: tl.constexpr,
                        LOW: tl.constexpr, GRAD_ALIGNED: tl.constexpr, SKIPPABLE: tl.constexpr):  # fmt: skip
        c = tl.program_id(0)
        t = tl.load(chunk_ptr + c)
        # tensors and chunks start at multiples of BLOCK in the flat buffers: told to the compiler, so that (with the
        # hints on the size and the gradient below) it can move 16 bytes a thread at once
        start = tl.multiple_of(tl.load(start_ptr + c), BLOCK)
        base = tl.multiple_of(tl.load(off_ptr + t), BLOCK)
        n = tl.load(numel_ptr + t)
        gaddr = tl.load(grads_ptr + t)
        if GRAD_ALIGNED:  # so the mask, the flat buffers and the gradient all go 16 bytes a thread at a time
            n = tl.multiple_of(n, 16)
        idx = (start - base) + tl.arange(0, BLOCK)  # within the tensor
        live = (gaddr != 0).to(tl.int64)  # no gradient: nothing
        if SKIPPABLE:
            live = live * (tl.load(found_ptr) == 0).to(tl.int64)  # a skipped step: nothing
        mask = idx < n * live
        gp = gaddr.to(tl.pointer_type(tl.bfloat16 if LOW else tl.float32))
        if GRAD_ALIGNED:  # the hint must sit on the pointer: the integer's does not survive the cast
            gp = tl.multiple_of(gp, 16)
        return t, start, idx, mask, tl.load(gp + idx, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _adamw_kernel(
        p_ptr,
        m_ptr,
        v_ptr,
        low_ptr,  # flat fp32 weights / moments, flat bf16 copies
        grads_ptr,
        chunk_ptr,
        start_ptr,
        off_ptr,
        numel_ptr,
        low_off_ptr,
        steps_ptr,  # per tensor / per chunk
        scale_ptr,
        found_ptr,  # 0-dim fp32: the gradients' divisor, and non-zero to skip the step
        lr,
        beta1,
        beta2,
        eps,
        decay,
        log2_beta1,
        log2_beta2,
        BLOCK: tl.constexpr,
        LOW: tl.constexpr,
        GRAD_ALIGNED: tl.constexpr,  # every gradient's address a multiple of 16 bytes, every size of 16 elements
    ):
        t, start, idx, mask, g = _chunk_gradient(
            grads_ptr, chunk_ptr, start_ptr, off_ptr, numel_ptr, found_ptr, BLOCK, LOW, GRAD_ALIGNED, True
        )
        g = g / tl.load(scale_ptr)
        flat = start + tl.arange(0, BLOCK)
        p = tl.load(p_ptr + flat, mask=mask, other=0.0)
        m = tl.load(m_ptr + flat, mask=mask, other=0.0)
        v = tl.load(v_ptr + flat, mask=mask, other=0.0)
        step = tl.load(steps_ptr + t)
        bc1 = 1.0 - tl.exp2(step * log2_beta1)
        bc2 = 1.0 - tl.exp2(step * log2_beta2)
        p = p * (1.0 - lr * decay)
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        p = p - (lr / bc1) * (m / (tl.sqrt(v) / tl.sqrt(bc2) + eps))
        tl.store(p_ptr + flat, p, mask=mask)
        tl.store(m_ptr + flat, m, mask=mask)
        tl.store(v_ptr + flat, v, mask=mask)
        if LOW:
            lo = tl.multiple_of(tl.load(low_off_ptr + t), BLOCK)
            tl.store(low_ptr + lo + idx, p.to(tl.bfloat16), mask=mask)

    @triton.jit
    def _sq_sum_kernel(
        grads_ptr,
        chunk_ptr,
        start_ptr,
        off_ptr,
        numel_ptr,  # the update kernel's tables
        out_ptr,  # fp32 [chunks]: each chunk's sum of squared gradient entries
        BLOCK: tl.constexpr,
        LOW: tl.constexpr,
        GRAD_ALIGNED: tl.constexpr,
    ):
        _, _, _, _, g = _chunk_gradient(
            grads_ptr, chunk_ptr, start_ptr, off_ptr, numel_ptr, out_ptr, BLOCK, LOW, GRAD_ALIGNED, False
        )
        tl.store(out_ptr + tl.program_id(0), tl.sum(g * g, axis=0))


@dataclass
class _Segment:
    """The tensors of one parameter group with (``low``) or without a bf16 copy in the module, and their tables."""

    low: bool
    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)  # the module's (bf16 where low)
    weights: list[torch.Tensor] = field(default_factory=list)  # the fp32 ones the optimizer updates
    offsets: list[int] = field(default_factory=list)  # into the flat fp32 buffers
    low_offsets: list[int] = field(default_factory=list)  # into the flat bf16 buffer (low only)
    steps: torch.Tensor | None = None  # fp32 [n]: each tensor's step count (state["step"] is a view)
    tables: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_ptrs: tuple[int, ...] = ()
    grads_aligned: bool = False


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


class MasterAdamW(torch.optim.AdamW):
    """AdamW over fp32 masters of the matmul weights named ``low_names`` (bf16 copies left in the module) and over
    the other parameters in place. ``groups`` as :func:`~rwkv_diffusion_rnn.optimizer.build_optimizer` builds
    them (module parameters, ``param_names``, ``group``, ``weight_decay``). ``kernel``: the Triton update (None: on
    CUDA where Triton is installed; the tests pass True to run it in Triton's CPU interpreter)."""

    def __init__(
        self,
        groups: Sequence[dict],
        low_names: Sequence[str],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        kernel: bool | None = None,
        block: int = BLOCK,
        num_warps: int = NUM_WARPS,
    ) -> None:
        if block < 128 or block & (block - 1):
            raise DiffRwkvError(f"master weights: block must be a power of two >= 128, got {block}")
        self.block, self.num_warps = block, num_warps
        params = [p for g in groups for p in g["params"]]
        if not params:
            raise DiffRwkvError("master weights: no trainable parameter")
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise DiffRwkvError(
                f"master weights: the trainable parameters on one device, got {sorted(map(str, devices))}"
            )
        bad = [(n, p.dtype) for g in groups for n, p in zip(g["param_names"], g["params"], strict=True)
               if p.dtype != torch.float32]  # fmt: skip
        if bad:
            raise DiffRwkvError(f"master weights: parameter {bad[0][0]!r} is {bad[0][1]}, not fp32")
        self.device = next(iter(devices))
        self.kernel = (self.device.type == "cuda" and triton is not None) if kernel is None else bool(kernel)
        if self.kernel and triton is None:
            raise DiffRwkvError("master weights: the update kernel needs triton (pip install triton)")
        low = set(low_names)
        segments: list[list[_Segment]] = []
        n_flat = n_low = 0
        for g in groups:
            segs = [_Segment(low=False), _Segment(low=True)]
            for name, p in zip(g["param_names"], g["params"], strict=True):
                s = segs[name in low]
                s.names.append(name)
                s.params.append(p)
                s.offsets.append(n_flat)
                n_flat += _padded(p.numel(), block)
                if s.low:
                    s.low_offsets.append(n_low)
                    n_low += _padded(p.numel(), block)
            segments.append(segs)
        dev = self.device
        self.flat = torch.zeros(n_flat, device=dev)
        # the moments come at the first step or load (as torch's AdamW makes its state): a training step before
        # that (a CUDA graph's capture, the compiler's warm-up) peaks without them
        self.flat_m: torch.Tensor | None = None
        self.flat_v: torch.Tensor | None = None
        self.flat_low = torch.zeros(max(n_low, 1), device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            for segs in segments:
                for s in segs:
                    for i, (p, o) in enumerate(zip(s.params, s.offsets, strict=True)):
                        w = self.flat[o : o + p.numel()].view_as(p)
                        w.copy_(p.detach())
                        if s.low:
                            lo = s.low_offsets[i]
                            p.data = self.flat_low[lo : lo + p.numel()].view_as(p)
                            p.copy_(w)
                        else:
                            p.data = w  # the module's fp32 parameter is the flat view itself
                        s.weights.append(w)
                    s.steps = torch.zeros(len(s.params), device=dev)
                    s.tables = self._tables(s)
        self.segments = segments
        opt_groups = [
            {k: v for k, v in g.items() if k != "params"} | {"params": [w for s in segs for w in s.weights],
                                                               "param_names": [n for s in segs for n in s.names]}
            for g, segs in zip(groups, segments, strict=True)
        ]  # fmt: skip
        super().__init__(opt_groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
        self._built = True

    # ------------------------------------------------------------------ layout
    def _tables(self, s: _Segment) -> dict[str, torch.Tensor]:
        chunks = [(i, o + j) for i, (p, o) in enumerate(zip(s.params, s.offsets, strict=True))
                  for j in range(0, _padded(p.numel(), self.block), self.block)]  # fmt: skip
        dev = self.device
        return {  # per chunk: its tensor and where it starts in the flat buffers; then per tensor
            "chunk": torch.tensor([i for i, _ in chunks], dtype=torch.int32, device=dev),
            "start": torch.tensor([o for _, o in chunks], dtype=torch.int64, device=dev),
            "off": torch.tensor(s.offsets, dtype=torch.int64, device=dev),
            "numel": torch.tensor([p.numel() for p in s.params], dtype=torch.int64, device=dev),
            "low_off": torch.tensor(s.low_offsets or [0] * len(s.params), dtype=torch.int64, device=dev),
            "grads": torch.zeros(len(s.params), dtype=torch.int64, device=dev),
        }

    def _pairs(self) -> Iterator[tuple[_Segment, int, torch.Tensor]]:
        for segs in self.segments:
            for s in segs:
                for i, w in enumerate(s.weights):
                    yield s, i, w

    @torch.no_grad()
    def _bind_state(self) -> None:
        """Point every tensor's state at its views of the flat buffers, keeping what the state holds (a load); the
        moments' buffers are allocated here the first time."""
        if self.flat_m is None:
            self.flat_m, self.flat_v = torch.zeros_like(self.flat), torch.zeros_like(self.flat)
        for s, i, w in self._pairs():
            o, n = s.offsets[i], w.numel()
            m, v = self.flat_m[o : o + n].view_as(w), self.flat_v[o : o + n].view_as(w)
            old = self.state.get(w, {})
            for key, view in (("exp_avg", m), ("exp_avg_sq", v)):
                src = old.get(key)
                if src is not None and src is not view:
                    view.copy_(src)
                elif src is None:
                    view.zero_()
            step = old.get("step", 0.0)
            if step is not s.steps[i]:
                s.steps[i] = torch.as_tensor(step, dtype=torch.float32).to(self.device)
            self.state[w] = {"step": s.steps[i], "exp_avg": m, "exp_avg_sq": v}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._bind_state()

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_built", False):
            raise DiffRwkvError("master weights: parameters cannot join after the optimizer is built")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ what callers read
    def master_tensors(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by name, fp32: the masters of the bf16 copies and the other parameters."""
        return {n: w for segs in self.segments for s in segs for n, w in zip(s.names, s.weights, strict=True)}

    def module_params(self) -> list[nn.Parameter]:
        """The module's trainable parameters (bf16 where they have a master): where the gradients land."""
        return [p for segs in self.segments for s in segs for p in s.params]

    @torch.no_grad()
    def sync_module(self) -> None:
        """Copy the masters into the module's bf16 copies (after writing into :meth:`master_tensors`)."""
        for s, i, w in self._pairs():
            if s.low:
                s.params[i].copy_(w)

    @torch.no_grad()
    def release(self) -> None:
        """Give the module fp32 weights again (values of the masters) and drop their gradients; the optimizer must
        not step after this."""
        for s, i, w in self._pairs():
            if s.low:
                s.params[i].grad = None
                s.params[i].data = w.detach().clone()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.module_params():
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise DiffRwkvError("master weights: step(closure) is not supported")
        scale = getattr(self, "grad_scale", None)
        found = getattr(self, "found_inf", None)
        dev = self.device
        scale = torch.ones((), device=dev) if scale is None else scale.to(dev, torch.float32).reshape(())
        found = torch.zeros((), device=dev) if found is None else found.to(dev, torch.float32).reshape(())
        keep = 1.0 - (found != 0).float()
        if self.flat_m is None:
            self._bind_state()
        for group, segs in zip(self.param_groups, self.segments, strict=True):
            b1, b2 = group["betas"]
            lr, eps, decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            for s in segs:
                if not s.params:
                    continue
                grads = [p.grad for p in s.params]  # torch keeps each in its parameter's dtype and shape
                has = self._grad_table(s, grads)
                s.steps.add_(has * keep)
                if self.kernel:
                    _adamw_kernel[(len(s.tables["chunk"]),)](
                        self.flat, self.flat_m, self.flat_v, self.flat_low,
                        s.tables["grads"], s.tables["chunk"], s.tables["start"], s.tables["off"], s.tables["numel"],
                        s.tables["low_off"], s.steps, scale, found,
                        lr, b1, b2, eps, decay, math.log2(b1) if b1 > 0 else -1e30, math.log2(b2) if b2 > 0 else -1e30,
                        BLOCK=self.block, LOW=s.low, GRAD_ALIGNED=s.grads_aligned, num_warps=self.num_warps,
                    )  # fmt: skip
                else:
                    self._reference(s, grads, scale, found, lr, b1, b2, eps, decay)
        return None

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor | None:
        """The 2-norm over every gradient the next step reads (a 0-dim fp32 tensor on the device, nothing read back),
        through the update kernel's tables: one launch a segment and one sum, where torch's multi-tensor norm takes
        a launch for every few dozen tensors (24 at the 0.4B shape). None without the kernel (the torch path)."""
        if not self.kernel:
            return None
        parts = []
        for segs in self.segments:
            for s in segs:
                if not s.params:
                    continue
                self._grad_table(s, [p.grad for p in s.params])
                out = torch.empty(len(s.tables["chunk"]), device=self.device)
                _sq_sum_kernel[(len(out),)](
                    s.tables["grads"], s.tables["chunk"], s.tables["start"], s.tables["off"], s.tables["numel"], out,
                    BLOCK=self.block, LOW=s.low, GRAD_ALIGNED=s.grads_aligned, num_warps=self.num_warps,
                )  # fmt: skip
                parts.append(out)
        return torch.cat(parts).sum().sqrt()

    def _grad_table(self, s: _Segment, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """1.0 for each tensor with a gradient (fp32 [n] on the device); the kernel's address table brought up to
        date (one copy from pinned memory, only when an address changed)."""
        ptrs = []
        for i, g in enumerate(grads):
            if g is not None and not g.is_contiguous():
                g = grads[i] = s.params[i].grad = g.contiguous()
            ptrs.append(0 if g is None else g.data_ptr())
        ptrs = tuple(ptrs)
        if ptrs != s.grad_ptrs:
            host = torch.tensor(ptrs, dtype=torch.int64, pin_memory=s.tables["grads"].is_cuda)
            s.tables["grads"].copy_(host, non_blocking=True)
            s.grad_ptrs = ptrs
            s.grads_aligned = all(p % 16 == 0 for p in ptrs) and all(p.numel() % 16 == 0 for p in s.params)
            s.tables["has"] = (s.tables["grads"] != 0).float()
        return s.tables["has"]

    def _reference(self, s: _Segment, grads, scale, found, lr, b1, b2, eps, decay) -> None:
        """The update tensor by tensor in torch (torch.optim.AdamW's formula): the CPU path and the kernel's
        reference. Reads ``found`` on the host."""
        if bool(found != 0):
            return
        for i, (w, g) in enumerate(zip(s.weights, grads, strict=True)):
            if g is None:
                continue
            state = self.state[w]
            m, v, step = state["exp_avg"], state["exp_avg_sq"], float(state["step"])
            g = g.float() / scale
            w.mul_(1.0 - lr * decay)
            m.lerp_(g, 1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            bc1, bc2 = 1.0 - b1**step, 1.0 - b2**step
            w.addcdiv_(m, v.sqrt().div_(math.sqrt(bc2)).add_(eps), value=-lr / bc1)
            if s.low:
                s.params[i].copy_(w)
