"""What the GPU check scripts (bench/gpu_check_*.py) share."""

from __future__ import annotations

import torch


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``|x - ref| / |ref|`` (Frobenius norms) in fp64: a tensor's relative error against its reference."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))
