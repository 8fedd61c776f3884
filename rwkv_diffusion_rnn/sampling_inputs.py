"""How the sampling loops (:mod:`rwkv_diffusion_rnn.sampling`) read their inputs and hand results back.

The model's data settings (``data.pad_to_length``, ``data.max_length``, the tokenizer's end-of-text), the device to
run on, RAW latents checked and standardised, condition text formatted exactly as training formatted it, generation
lengths, row batches, the progress bar, and generated ids cut clean. ``m`` is a loaded model
(:class:`~rwkv_diffusion_rnn.pipeline.LoadedModel` or anything with its attributes).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from rwkv_diffusion_rnn.errors import DiffRwkvError


def data_setting(m, section: str, key: str, default=None):
    return getattr(getattr(getattr(m, "config", None), section, None), key, default)


def run_device(m, device: str | torch.device | None) -> torch.device:
    """Where to run: ``device`` ("auto": CUDA when available), the denoiser being moved there if it is elsewhere;
    None: the denoiser's own device."""
    param = next(iter(m.denoiser.parameters()), None) if hasattr(m.denoiser, "parameters") else None
    here = param.device if param is not None else torch.device("cpu")
    if device is None:
        return here
    dev = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else torch.device(device)
    )
    if param is not None and here != dev:
        m.denoiser.to(dev)
    return dev


def row_batches(n: int, size: int) -> Iterator[list[int]]:
    if size < 1:
        raise DiffRwkvError(f"batch_size must be >= 1, got {size}")
    for lo in range(0, n, size):
        yield list(range(lo, min(n, lo + size)))


def eot_id(m) -> int:
    return int(getattr(getattr(m, "tokenizer", None), "eot_id", 0) or 0)


def resolve_lengths(m, length: int | Sequence[int] | None, n: int) -> list[int]:
    """Generation length of each of ``n`` rows: ``length`` (an int or one per row), else ``data.pad_to_length``."""
    if length is None:
        pad = data_setting(m, "data", "pad_to_length")
        if not pad:
            raise DiffRwkvError("this model was trained on variable-length rows (data.pad_to_length is unset); "
                                "give a length (one int, or one per row)")  # fmt: skip
        return [int(pad)] * n
    lengths = [int(length)] * n if isinstance(length, int | np.integer) else [int(x) for x in length]
    if len(lengths) != n or any(x < 1 for x in lengths):
        raise DiffRwkvError(f"length must be an int >= 1 or {n} such ints; got {len(lengths)} values")
    return lengths


def condition_text(m, token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean condition text formatted as in training: ``(ids [N, T] long, attention_mask [N, T] long)``.

    With ``data.pad_to_length`` L: the text cut to L - 1 tokens, then end-of-text up to L (all attended; exactly
    ``data_simple.pad_with_eot``). Otherwise: cut to ``data.max_length``, right-padded with attention 0."""
    from rwkv_diffusion_rnn.data_simple import pad_with_eot

    mask_id = int(m.denoiser.mask_id)
    rows = [[int(i) for i in r] for r in token_ids]
    for k, r in enumerate(rows):
        if any(not 0 <= i < mask_id for i in r):
            raise DiffRwkvError(f"text row {k} has a token id outside the model's vocabulary 0..{mask_id - 1}")
    max_len = data_setting(m, "data", "max_length")
    rows = [r[:max_len] if max_len else r for r in rows]
    T = max([len(r) for r in rows] + [1])
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[k, : len(r)] = 1
    pad = data_setting(m, "data", "pad_to_length")
    if pad:
        batch = pad_with_eot({"input_ids": ids, "attention_mask": attn}, int(pad), eot_id(m))
        ids, attn = batch["input_ids"], batch["attention_mask"]
    return ids, attn


def clean_ids(ids: Sequence[int], eot_id: int, mask_id: int) -> list[int]:
    """Generated ids cut at the first end-of-text (= pad), without ``<mask>``."""
    out = []
    for i in ids:
        if int(i) == eot_id:
            break
        if int(i) != mask_id:
            out.append(int(i))
    return out


def standardised_latents(m, latents, dev: torch.device) -> torch.Tensor:
    """RAW latents (array, tensor or nested lists) ``[N, D]`` -> standardised float32 ``[N, D]`` on ``dev``."""
    if isinstance(latents, torch.Tensor):
        z = latents.detach().to("cpu", torch.float32)
    else:
        z = torch.as_tensor(np.asarray(latents, dtype=np.float32))
    if z.dim() != 2 or z.shape[1] != m.normalizer.dim:
        raise DiffRwkvError(f"latents must be [N, {m.normalizer.dim}]; got shape {list(z.shape)}")
    if not bool(torch.isfinite(z).all()):
        raise DiffRwkvError(f"latent row {int((~torch.isfinite(z)).any(1).nonzero()[0])} is not finite")
    return m.normalizer.normalize(z.to(dev)).float()


def progress_bar(progress: bool, total: int, desc: str):
    if not progress:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
