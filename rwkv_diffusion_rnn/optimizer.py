"""AdamW with weight-decay groups, the warmup + cosine schedule, an EMA of the weights and gradient clipping.

What the trainer needs, in the order it uses it::

    opt = build_optimizer(model, lr=3e-4, weight_decay=0.1)          # trainable parameters only
    sched = build_scheduler(opt, warmup_steps=500, total_steps=20_000, min_lr_ratio=0.1)
    ema = EMA(model, decay=0.999)
    ...
    norm, finite = clip_and_check_grads(model.parameters(), max_norm=1.0)   # all-reduce `finite` across ranks
    if finite: opt.step(); sched.step(); ema.update(model)
    ...
    requires_grad_(True) on the unfrozen tensors, then add_params(opt, model); ema.add_params(model)
    with ema.swapped(model): evaluate(model)

Parameter names are those of ``model.named_parameters()`` on the *unwrapped* module (not DDP's ``module.`` nor
torch.compile's ``_orig_mod.`` prefix). Every param group carries them under the ``"param_names"`` key (PyTorch's own
convention since 2.6, set by hand here so older versions keep them too) and its role under ``"group"``
(``"decay"`` or ``"no_decay"``); :func:`group_sizes` summarises both for the log. Both groups always exist, possibly
empty, so the group structure (and a LambdaLR's per-group base LR) never changes when parameters are unfrozen.
Within a group the parameters are kept sorted by name: an optimizer rebuilt on resume from the currently trainable
parameters therefore lists them in the same order as the one that saved the state, however they were added.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.host_sync import DeviceCount

GROUPS = ("decay", "no_decay")
#: ``DIFFRWKV_FLAT_GRAD_NORM=0`` (read at import): the clipping's norm from torch's multi-tensor kernel even where the
#: flat AdamW offers its own (:func:`clip_grads_on_device`; for measuring)
FLAT_GRAD_NORM = os.environ.get("DIFFRWKV_FLAT_GRAD_NORM", "1") == "1"

# Opt-in: BlinkDL's RWKV-7 recipe decays only the big ``*.weight`` matrices, not the low-rank LoRA factors of the
# decay / in-context-LR / value-residual / gate paths nor ``r_k``. Pass as ``no_decay_patterns`` to match it.
RWKV7_BLINKDL_NO_DECAY: tuple[str, ...] = ("*.att.[wavg][12]", "*.att.r_k")


def _is_decayed(name: str, p: torch.Tensor, embedding_ids: set[int], patterns: Sequence[str]) -> bool:
    """Whether ``name`` gets weight decay: a matrix (>= 2 dims larger than 1), not an embedding, no pattern match.

    "Dims larger than 1" rather than ``p.dim() >= 2``: RWKV-7 stores per-channel vectors as ``[1, 1, C]``
    (``att.x_r``, ``att.w0``, ...), which are biases in all but shape and must not be pulled towards zero.
    """
    if id(p) in embedding_ids or any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
        return False
    return sum(s > 1 for s in p.shape) >= 2


def _embedding_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.99),
    eps: float = 1e-8,
    no_decay_patterns: Sequence[str] = (),
    master_weights: bool = False,
    flat: bool = False,
) -> torch.optim.AdamW:
    """AdamW over the parameters of ``model`` with ``requires_grad=True``; frozen ones never enter it.

    Args:
        model: the unwrapped module (names must match those the checkpoints and the EMA use).
        lr: peak learning rate (the schedule multiplies it).
        weight_decay: decoupled AdamW decay (Loshchilov & Hutter 2019) of the ``"decay"`` group.
        betas, eps: AdamW's moment coefficients and denominator guard.
        no_decay_patterns: ``fnmatch`` patterns of parameter names that never get decay (e.g. ``"*.mask_emb"``).
        master_weights: keep the fp32 weights of the matmul weights in the optimizer and bf16 copies in the model
            (:class:`~rwkv_diffusion_rnn.master_weights.MasterAdamW`; for bf16 autocast). The model changes in
            place: its matmul weights become bf16 and every trainable tensor a view of the optimizer's buffers.
        flat: the same optimizer without bf16 copies: every trainable tensor stays fp32 and becomes a view of its
            flat buffers, updated by one Triton launch a parameter group on CUDA (on an H100, 2026-12-07: 1.78 /
            4.22 ms against torch's fused AdamW's 2.41 / 5.60 ms a step over the 0.1B / 0.4B parameters). The
            trainer's ``training.flat_adamw`` (null: on for one CUDA process with a fixed trainable set).

    Returns:
        ``torch.optim.AdamW`` with groups ``[decay, no_decay]`` (both always present), each sorted by name and
        carrying ``"param_names"``; ``fused=True`` when every trainable parameter lives on CUDA, or every one on
        the CPU. The decay rule is kept on the optimizer (``optimizer.no_decay_patterns``) for :func:`add_params`.

    Raises:
        DiffRwkvError: no parameter is trainable, or a hyperparameter is out of range.
    """
    if not lr > 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or not eps > 0:
        raise DiffRwkvError(
            f"optimizer: need lr > 0, weight_decay >= 0, 0 <= betas < 1, eps > 0 "
            f"(got lr={lr}, weight_decay={weight_decay}, betas={tuple(betas)}, eps={eps})"
        )
    named = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda np_: np_[0])
    if not named:
        raise DiffRwkvError("optimizer: the model has no trainable parameter (everything has requires_grad=False)")
    patterns = tuple(no_decay_patterns)
    emb = _embedding_ids(model)
    decay = [(n, p) for n, p in named if _is_decayed(n, p, emb, patterns)]
    rest = [(n, p) for n, p in named if not _is_decayed(n, p, emb, patterns)]
    groups = [
        {"params": [p for _, p in ps], "param_names": [n for n, _ in ps], "group": g, "weight_decay": wd}
        for g, ps, wd in (("decay", decay, weight_decay), ("no_decay", rest, 0.0))
    ]
    # The fused kernel is one launch for all tensors (CUDA), and it can skip a step decided on the device
    # (``found_inf``; the trainer's step without host waits): used wherever every parameter is on CUDA or on the CPU.
    if master_weights or flat:
        from rwkv_diffusion_rnn.master_weights import MasterAdamW, matmul_weight_names

        low = matmul_weight_names(model) if master_weights else []
        opt = MasterAdamW(groups, low, lr=lr, betas=tuple(betas), eps=eps)
        opt.no_decay_patterns = patterns  # type: ignore[attr-defined]
        return opt
    kinds = {p.device.type for _, p in named}
    fused = len(kinds) == 1 and kinds <= {"cuda", "cpu"}
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)
    opt.no_decay_patterns = patterns  # type: ignore[attr-defined]
    return opt


def group_sizes(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, int]]:
    """``{"decay": {"tensors": n, "elements": m}, "no_decay": {...}}`` for the training log."""
    return {
        g.get("group", str(i)): {"tensors": len(g["params"]), "elements": sum(p.numel() for p in g["params"])}
        for i, g in enumerate(optimizer.param_groups)
    }


def add_params(optimizer: torch.optim.Optimizer, model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Let newly unfrozen parameters join ``optimizer`` (built by :func:`build_optimizer`) in their decay group.

    Args:
        names: parameter names to add; ``None`` adds every trainable parameter not yet in the optimizer.
            Names already present are skipped, so calling it twice is harmless.

    Returns:
        The names added, sorted. Their AdamW moments start at zero on their first step.

    Raises:
        DiffRwkvError: an unknown name, or a named parameter that still has ``requires_grad=False``.
    """
    by_name = dict(model.named_parameters())
    present = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if names is None:
        wanted = [n for n, p in by_name.items() if p.requires_grad]
    else:
        wanted = list(names)
        for n in wanted:
            if n not in by_name:
                raise DiffRwkvError(f"add_params: the model has no parameter named {n!r}")
            if not by_name[n].requires_grad:
                raise DiffRwkvError(f"add_params: parameter {n!r} is frozen; call requires_grad_(True) on it first")
    new = sorted({n for n in wanted if id(by_name[n]) not in present})
    if not new:
        return []
    groups = {g.get("group"): g for g in optimizer.param_groups}
    if set(GROUPS) - groups.keys() or any("param_names" not in g for g in groups.values()):
        raise DiffRwkvError("add_params: the optimizer was not built by build_optimizer (no decay/no_decay groups)")
    patterns = getattr(optimizer, "no_decay_patterns", ())
    emb = _embedding_ids(model)
    for n in new:
        g = groups["decay" if _is_decayed(n, by_name[n], emb, patterns) else "no_decay"]
        g["params"].append(by_name[n])
        g["param_names"].append(n)
    for g in groups.values():  # keep the canonical by-name order (state is keyed by tensor, so this is safe)
        order = sorted(range(len(g["params"])), key=g["param_names"].__getitem__)
        g["params"][:] = [g["params"][i] for i in order]
        g["param_names"][:] = [g["param_names"][i] for i in order]
    return new


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], where: str = "optimizer") -> None:
    """``optimizer.load_state_dict(state)`` after checking that it describes the same parameters; all or nothing.

    PyTorch only compares group sizes, so a state from another model configuration could load silently into the
    wrong tensors. Here every group's ``param_names`` and every moment's shape must match, else a one-line
    :class:`DiffRwkvError` names the first mismatched tensor (``where`` prefixes it, e.g. the checkpoint file).
    The implementation switches (``fused``/``foreach``/``capturable``) of the live optimizer are kept: they
    depend on the device this run uses, not on the one that saved the state.
    """
    saved = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(saved, list) or not isinstance(state.get("state"), Mapping):
        raise DiffRwkvError(f"{where}: not an optimizer state dict (no 'state' / 'param_groups')")
    if len(saved) != len(optimizer.param_groups):
        raise DiffRwkvError(f"{where}: {len(saved)} param groups, the optimizer has {len(optimizer.param_groups)}")
    for g, s in zip(optimizer.param_groups, saved, strict=True):
        live, old = list(g.get("param_names", [])), list(s.get("param_names", []))
        if live != old or len(s["params"]) != len(g["params"]):
            diff = sorted(set(live) ^ set(old)) or [a for a, b in zip(live, old, strict=False) if a != b] or ["?"]
            raise DiffRwkvError(
                f"{where}: group {g.get('group', '?')!r} holds other parameters than this model's trainable ones "
                f"(first difference: {diff[0]!r}; saved {len(old)}, live {len(live)})"
            )
        for idx, name, p in zip(s["params"], live, g["params"], strict=True):
            for key, v in state["state"].get(idx, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise DiffRwkvError(
                        f"{where}: state {key!r} of {name!r} has shape {tuple(v.shape)}, the parameter {tuple(p.shape)}"
                    )
    impl = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(dict(state))
    for g, keep in zip(optimizer.param_groups, impl, strict=True):
        g.update(keep)


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> Callable[[int], float]:
    """LR multiplier for optimizer step ``s`` (0-based): linear warmup, cosine decay, then flat.

    ``(s + 1) / warmup_steps`` for ``s < warmup_steps`` (the first step already moves, at ``1 / warmup_steps``);
    then ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps))) / 2``
    (SGDR, Loshchilov & Hutter 2017, without restarts) which is 1 at ``s = warmup_steps`` and ``min_lr_ratio`` at
    ``s = total_steps``; ``min_lr_ratio`` for every step after that.
    """
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps or not 0.0 <= min_lr_ratio <= 1.0:
        raise DiffRwkvError(
            f"LR schedule: need 0 <= warmup_steps <= total_steps, total_steps >= 1 and 0 <= min_lr_ratio <= 1 "
            f"(got warmup_steps={warmup_steps}, total_steps={total_steps}, min_lr_ratio={min_lr_ratio})"
        )
    decay_steps = total_steps - warmup_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step >= total_steps:
            return min_lr_ratio
        progress = (step - warmup_steps) / decay_steps
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :func:`warmup_cosine_lambda` on every group; call ``step()`` after each optimizer step.

    The lambda is a plain function, so the scheduler's state dict holds only counters (the schedule itself is
    rebuilt from the config on resume) and loads with ``torch.load(weights_only=True)``.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(warmup_steps, total_steps, min_lr_ratio))


class EMA:
    """Exponential moving average of the trainable parameters, kept as fp32 shadow copies by name.

    ``shadow = d * shadow + (1 - d) * param`` after each optimizer step, with ``d = decay``, or with decay warmup
    ``d = min(decay, (1 + n) / (10 + n))`` where ``n`` is the number of earlier updates (so early weights, far
    from the final ones, are forgotten fast). Frozen parameters are not tracked: they equal the model's.

    Where it reads weights (construction, :meth:`add_params`, :meth:`update`), ``model`` may also be a mapping
    name -> tensor of the trainable weights (a master-weight optimizer's fp32 masters, master_weights.py);
    :meth:`copy_to` and :meth:`swapped` write into the module's parameters.
    """

    def __init__(
        self, model: nn.Module | Mapping[str, torch.Tensor], decay: float = 0.999, warmup: bool = True
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise DiffRwkvError(f"EMA: decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self._count = DeviceCount()
        self.shadow: dict[str, torch.Tensor] = {}
        self.add_params(model)
        if not self.shadow:
            raise DiffRwkvError("EMA: the model has no trainable parameter to average")

    @torch.no_grad()
    def add_params(
        self, model: nn.Module | Mapping[str, torch.Tensor], names: Iterable[str] | None = None
    ) -> list[str]:
        """Start averaging newly trainable parameters (default: all trainable, untracked ones) from their value now."""
        if isinstance(model, Mapping):  # the trainable weights themselves
            by_name = dict(model)
            wanted = list(by_name) if names is None else list(names)
        else:
            by_name = dict(model.named_parameters())
            wanted = [n for n, p in by_name.items() if p.requires_grad] if names is None else list(names)
        new = sorted(n for n in wanted if n not in self.shadow)
        for n in new:
            if n not in by_name:
                raise DiffRwkvError(f"EMA: the model has no parameter named {n!r}")
            self.shadow[n] = by_name[n].detach().to(torch.float32, copy=True)
        return new

    def _params(self, model: nn.Module | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        by_name = dict(model) if isinstance(model, Mapping) else dict(model.named_parameters())
        missing = [n for n in self.shadow if n not in by_name]
        if missing:
            raise DiffRwkvError(f"EMA: the model has no parameter named {missing[0]!r} (tracked by the EMA)")
        return [by_name[n] for n in self.shadow]

    def current_decay(self) -> float:
        """The ``d`` the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @property
    def num_updates(self) -> int:
        """Updates folded in so far (reading it waits for the device when :meth:`update` was given ``apply``)."""
        return int(self._count)

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self._count = DeviceCount(value)

    @torch.no_grad()
    def update(self, model: nn.Module | Mapping[str, torch.Tensor], apply: torch.Tensor | None = None) -> None:
        """Fold the model's current trainable weights into the average (call after each optimizer step).

        ``apply``: a 0-dim bool tensor on the parameters' device; where it is False nothing changes (a skipped
        step). The decision, the decay warmup and the update count then stay on the device: the host does not
        wait (host_sync.py)."""
        shadow, params = list(self.shadow.values()), [p.detach().float() for p in self._params(model)]
        if apply is None:
            d = self.current_decay()
            torch._foreach_mul_(shadow, d)
            torch._foreach_add_(shadow, params, alpha=1.0 - d)
            self._count.add(1)
            return
        n = self._count.tensor(apply.device, torch.float64)
        d = torch.full_like(n, self.decay)
        if self.warmup:
            d = torch.minimum(d, (1 + n) / (10 + n))
        w = torch.where(apply, 1 - d, 0.0).float()  # a skipped step: weight 0, the shadow stays as it is
        for s, p in zip(shadow, params, strict=True):  # in place, one tensor at a time: no copy of all the weights
            s.lerp_(p, w)  # s + w (p - s) = d s + (1 - d) p
        self._count.add(apply.long())

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's tracked parameters with the averages (cast to each parameter's dtype)."""
        for s, p in zip(self.shadow.values(), self._params(model), strict=True):
            p.copy_(s)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate with the EMA weights: load them into ``model``, yield it, then restore the training weights.

        The training weights are restored bit-exactly (a copy is kept), also when the body raises.
        """
        params = self._params(model)
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """``{"shadow": {name: fp32 tensor}, "num_updates": int, "decay": float, "warmup": bool}``.

        The tensors are the live shadows (not copies); the checkpoint writer copies them to CPU.
        """
        return {
            "shadow": dict(self.shadow),
            "num_updates": self.num_updates,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any], where: str = "EMA") -> None:
        """Restore :meth:`state_dict` output; the tracked names and shapes must match exactly (nothing loads else)."""
        shadow = state.get("shadow")
        if not isinstance(shadow, Mapping):
            raise DiffRwkvError(f"{where}: no 'shadow' tensors in the EMA state")
        extra, missing = sorted(set(shadow) - set(self.shadow)), sorted(set(self.shadow) - set(shadow))
        if extra or missing:
            name = (extra or missing)[0]
            raise DiffRwkvError(
                f"{where}: tensor {name!r} is {'not tracked by this EMA' if extra else 'missing from the state'}"
            )
        for n, s in self.shadow.items():
            if tuple(shadow[n].shape) != tuple(s.shape):
                raise DiffRwkvError(
                    f"{where}: tensor {n!r} has shape {tuple(shadow[n].shape)}, expected {tuple(s.shape)}"
                )
        for n, s in self.shadow.items():
            s.copy_(shadow[n])
        self.num_updates = int(state.get("num_updates", 0))
        self.decay = float(state.get("decay", self.decay))
        self.warmup = bool(state.get("warmup", self.warmup))


@torch.no_grad()
def clip_grads_on_device(
    params: Iterable[torch.Tensor],
    max_norm: float,
    also_finite: torch.Tensor | None = None,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`clip_and_check_grads` without reading anything back: the norm and the finiteness flag stay 0-dim
    tensors on the first gradient's device, and the clipping factor is applied there (1 where the norm is within
    ``max_norm`` or not finite), so the host never waits (host_sync.py). The flag is bool; a step that is not
    finite must be skipped by the caller, e.g. through a fused optimizer's ``found_inf``.

    ``sum_over_ranks`` (e.g. :func:`distributed.all_reduce_sum`; every rank must call then) is for gradients
    sharded over processes (FSDP2's DTensors): the norm is the root of the ranks' summed local squared norms, the
    same on every rank, so every rank clips by the same factor; ``also_finite`` is still this rank's, so the caller
    combines the flags over the ranks (:func:`distributed.all_true`) before stepping.

    ``optimizer``: where it is a fused optimizer (torch's fused AdamW), the clipping is left to its step instead of
    a pass over every gradient here: its ``grad_scale`` is set to the inverse factor, which the fused kernel divides
    each gradient by as it reads it (one read of the gradients saved; the caller deletes ``grad_scale`` after the
    step, see :func:`fold_clip_into`). Not for a loss scaler's step (it sets ``grad_scale`` itself) nor for
    sharded gradients (``sum_over_ranks``)."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    # the flat AdamW's own norm kernel where it reads exactly these gradients (master_weights.py); it may replace a
    # non-contiguous gradient by a contiguous copy, so the list is taken again after it
    total = _optimizer_norm(optimizer, grads) if sum_over_ranks is None and grads else None
    if total is not None:
        grads = [p.grad for p in params if p.grad is not None]
    if sum_over_ranks is not None:
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    elif not grads:
        ok = torch.ones((), dtype=torch.bool) if also_finite is None else torch.isfinite(also_finite).all()
        return torch.zeros((), device=ok.device), ok
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
        # one dtype a list: a list of bf16 and fp32 gradients (master weights) leaves the multi-tensor kernel for a
        # reduction per tensor (2.4 ms instead of 0.3 at 0.1B on an H100)
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    first = grads[0].device if grads else also_finite.device if also_finite is not None else torch.device("cpu")
    if total is None:
        norms = [
            n.to(first, torch.float32)
            for gs in by_kind.values()
            for n in torch._foreach_norm(gs, 2.0, dtype=torch.float32)
        ]
        if sum_over_ranks is None:
            total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        else:
            sq = torch.stack(norms).pow(2).sum() if norms else torch.zeros((), device=first)
            total = sum_over_ranks(sq).sqrt()
    finite = torch.isfinite(total)
    if also_finite is not None:
        finite = finite & torch.isfinite(also_finite).all().to(first)
    if max_norm > 0:
        clip = finite & (total > max_norm)
        one = torch.ones((), device=first)
        if optimizer is not None and sum_over_ranks is None and fold_clip_into(optimizer):
            optimizer.grad_scale = torch.where(clip, (total + 1e-6) / max_norm, one)  # the step divides by it
        else:
            coef = torch.where(clip, max_norm / (total + 1e-6), one)
            for dev, gs in by_device.items():
                torch._foreach_mul_(gs, coef.to(dev))
    return total, finite


def _optimizer_norm(optimizer: torch.optim.Optimizer | None, grads: list[torch.Tensor]) -> torch.Tensor | None:
    """``optimizer.grad_norm()`` (the flat AdamW's one-launch norm) where it has one and its parameters' gradients
    are exactly ``grads``; else None (the caller's multi-tensor norm)."""
    norm = getattr(optimizer, "grad_norm", None)
    if norm is None or not FLAT_GRAD_NORM:
        return None
    theirs = {id(p.grad) for p in optimizer.module_params() if p.grad is not None}
    return norm() if theirs == {id(g) for g in grads} else None


def fold_clip_into(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the gradient clipping can ride on ``optimizer``'s step (:func:`clip_grads_on_device`): every group
    fused (torch's fused Adam/AdamW divide each gradient by ``optimizer.grad_scale`` as they read it)."""
    return bool(optimizer.param_groups) and all(g.get("fused") for g in optimizer.param_groups)


@torch.no_grad()
def clip_and_check_grads(
    params: Iterable[torch.Tensor],
    max_norm: float,
    also_finite: torch.Tensor | None = None,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[float, bool]:
    """Global L2 norm of the gradients, and whether it is finite; clip to ``max_norm`` only when it is.

    A non-finite norm leaves the gradients untouched: the caller skips the step (after all-reducing the flag, so
    every rank skips together) and zeroes them. ``max_norm <= 0`` measures without clipping. Parameters without
    a gradient are ignored. The norm is accumulated in fp32 per device, then summed on the first device.
    ``also_finite`` (e.g. the step's loss sums): ``finite`` also requires every value of it to be finite, read in
    the same device sync. :func:`clip_grads_on_device` is the same without the sync (``sum_over_ranks``: there).

    Returns:
        ``(total_norm, finite)``; the norm is a Python float (one device sync).
    """
    total, finite = clip_grads_on_device(params, max_norm, also_finite, sum_over_ranks, optimizer)
    total_f, ok = torch.stack([total.float(), finite.to(total.device, torch.float32)]).tolist()
    return total_f, ok == 1.0
