"""A trained model from Python in three lines: :class:`DiffRwkv`.

    from rwkv_diffusion_rnn import DiffRwkv
    model = DiffRwkv.from_pretrained("outputs/demo/run")        # a checkpoint, its save_dir, or a saved folder
    print(model.decode(model.embed(["A dog runs on the beach."])))   # the data's encoder, then latent -> text

The conventions of the libraries it sits beside: ``from_pretrained`` / ``save_pretrained`` as in diffusers,
``encode(sentences, batch_size=...)`` returning an array as in sentence-transformers, ``device`` and ``dtype``
arguments, and seeds that reproduce (a row's draws do not depend on the batch it is in). Every method is batched,
takes numpy or torch input, and shows no progress bar unless asked (``progress=True``).

* :meth:`DiffRwkv.encode` -- text -> latent with the model (T2L), ``[B, D]`` in the data's latent space.
* :meth:`DiffRwkv.decode` -- latent -> text (L2T) with the recommended decoder (``sampling.sample_l2t``'s defaults);
  any of its options can be passed (``strategy``, ``temperature``, ``guidance_scale``, ``candidates``, ...).
* :meth:`DiffRwkv.generate` -- text and latent together from noise (joint).
* :meth:`DiffRwkv.interpolate` -- decode points on the arc between two texts or latents.
* :meth:`DiffRwkv.embed` -- the data's own encoder (e.g. all-MiniLM-L6-v2 + PCA-32), the latents the model was
  trained on; :meth:`DiffRwkv.nearest` -- the training sentences closest to a latent.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from rwkv_diffusion_rnn import sampling
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.latent_files import read_data_latents
from rwkv_diffusion_rnn.pipeline import LoadedModel, build_model, load_trained
from rwkv_diffusion_rnn.saved_model import ModelRecord, encoder_dir_of, find_data_dir, is_saved_folder, read_folder

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
#: arguments the API sets itself; every other keyword of the sampler may be passed through
_OWN = {"m", "latents", "token_ids", "n", "num_steps", "batch_size", "seed", "device", "progress"}


class Interpolation(NamedTuple):
    """:meth:`DiffRwkv.interpolate`'s answer: the mixing weights of ``b``, the latents and their decoded texts."""

    alphas: np.ndarray  # [n]
    latents: np.ndarray  # [n, D]
    texts: list[str]


def _pick_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DiffRwkvError(f"device {device!r} is not a device; expected 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffRwkvError(f"device {device!r}: CUDA is not available on this machine; expected 'cpu' or 'auto'")
    return dev


def _pick_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise DiffRwkvError(f"dtype {dtype!r} is not supported; expected one of fp32, bf16, fp16 (or the torch dtype)")


@contextlib.contextmanager
def _no_loading_bar():
    """transformers draws a bar while it loads a sentence encoder's weights: off here, as every API bar is."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _check_options(fn, options: dict[str, Any], where: str) -> None:
    allowed = set(inspect.signature(fn).parameters) - _OWN
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DiffRwkvError(f"{where}: unknown option {unknown[0]!r}; expected one of {', '.join(sorted(allowed))}")


class DiffRwkv:
    """A trained DiffRwkv denoiser with its tokenizer, latent normaliser and (where found) the data's encoder.

    Make one with :meth:`from_pretrained`. ``model.loaded`` is the :class:`~rwkv_diffusion_rnn.pipeline.LoadedModel`
    underneath, for the functions of :mod:`rwkv_diffusion_rnn.sampling` and :mod:`rwkv_diffusion_rnn.evaluate`.
    """

    def __init__(self, loaded: LoadedModel, record: ModelRecord, dtype: torch.dtype = torch.float32) -> None:
        self.loaded = loaded
        self.record = record
        self.dtype = dtype
        self._encoder = None
        self._train: tuple[np.ndarray, list[str]] | None = None

    # ------------------------------------------------------------------------------------------- load / save
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        ema: bool = True,
        data_dir: str | Path | None = None,
    ) -> DiffRwkv:
        """Load a training checkpoint (a ``step_*`` folder, or a ``save_dir``: its newest one) or a folder written by
        :meth:`save_pretrained`.

        ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``. ``dtype``: the compute precision (fp32 default; bf16
        or fp16 run the network under autocast, the weights stay as trained). ``ema``: a checkpoint's EMA weights
        where the run kept an EMA (a saved folder holds the weights chosen when it was saved). ``data_dir``: the
        prepare-latents folder of the training data (for :meth:`embed` and :meth:`nearest`), when it is not where
        the checkpoint's config says."""
        p = Path(path)
        if not p.exists():
            raise DiffRwkvError(f"{p}: not found; expected a checkpoint folder, a save_dir, or a save_pretrained "
                                "folder")  # fmt: skip
        dev, dt = _pick_device(device), _pick_dtype(dtype)
        if is_saved_folder(p):
            record, tensors = read_folder(p)
            loaded = build_model(record.config, record.extra, record.backbone, tensors, p, record.step, dev)
        else:
            from rwkv_diffusion_rnn.checkpoints import load_checkpoint, peek_checkpoint

            loaded = load_trained(p, device=dev, ema=ema)
            _, meta = peek_checkpoint(loaded.path)
            names = sorted((meta.get("tensors") or {}).get("model") or {})
            if not names:  # a sharded checkpoint's meta.json lists no tensors: read their names from the shards
                names = sorted(load_checkpoint(loaded.path, verify=False).model_tensors)
            data = find_data_dir(meta.get("config") or {}, loaded.path)
            record = ModelRecord(
                config=meta.get("config") or {}, extra=meta.get("extra") or {}, backbone=meta.get("backbone"),
                tensor_names=names, step=loaded.step, source=loaded.path,
                ema=bool(ema and meta.get("ema") is not None),
                encoder_dir=encoder_dir_of(data), data_dir=data,
            )  # fmt: skip
        if data_dir is not None:
            d = Path(data_dir)
            inside = sorted(c.parent for c in d.glob("*/train_data.json"))
            d = inside[0] if not (d / "train_data.json").is_file() and len(inside) == 1 else d  # or its parent
            if not (d / "train_data.json").is_file():
                raise DiffRwkvError(f"{d / 'train_data.json'}: not found; expected data_dir to be the "
                                    "prepare-latents folder of the training data (or its parent)")  # fmt: skip
            record.data_dir = d.resolve()
            record.encoder_dir = encoder_dir_of(record.data_dir) or record.encoder_dir
        return cls(loaded, record, dt)

    def save_pretrained(self, path: str | Path, *, copy_backbone: bool = False) -> Path:
        """Write a self-contained folder (see :mod:`rwkv_diffusion_rnn.saved_model`): the trained tensors in
        safetensors, config, normaliser, vocabulary map and the data's encoder description; a frozen pretrained
        backbone by path + sha256, or copied in with ``copy_backbone=True``. Returns the folder."""
        from rwkv_diffusion_rnn.saved_model import save_folder

        state = self.loaded.denoiser.state_dict()
        tensors = {name: state[name] for name in self.record.tensor_names}
        return save_folder(path, self.record, tensors, copy_backbone=copy_backbone)

    # ------------------------------------------------------------------------------------------- properties
    @property
    def latent_dim(self) -> int:
        return int(self.loaded.normalizer.dim)

    @property
    def device(self) -> torch.device:
        return next(self.loaded.denoiser.parameters()).device

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def __repr__(self) -> str:
        return f"DiffRwkv(step={self.record.step}, latent_dim={self.latent_dim}, source='{self.record.source}')"

    # ---------------------------------------------------------------------------------------------- inputs
    def _texts(self, texts: str | Sequence[str], where: str) -> tuple[list[str], bool]:
        single = isinstance(texts, str)
        rows = [texts] if single else texts
        if isinstance(rows, np.ndarray):
            rows = rows.tolist()
        if not isinstance(rows, Sequence):
            raise DiffRwkvError(f"{where}: texts is a {type(texts).__name__}; expected a string or a list of strings")
        rows = list(rows)
        if not rows:
            raise DiffRwkvError(f"{where}: texts is empty; expected at least one sentence")
        for i, t in enumerate(rows):
            if not isinstance(t, str):
                raise DiffRwkvError(f"{where}: texts[{i}] is a {type(t).__name__}; expected a string")
            if not t.strip():
                raise DiffRwkvError(f"{where}: texts[{i}] is empty; expected a sentence")
        return rows, single

    def as_latents(self, latents, where: str = "latents") -> tuple[np.ndarray, bool]:
        """``latents`` (numpy, torch or nested lists; ``[N, D]`` or one ``[D]``) as float32 ``[N, D]``, checked
        (width, finite, not empty; a one-line error naming ``where``), and whether a single ``[D]`` was given."""
        if isinstance(latents, torch.Tensor):
            z = latents.detach().to("cpu", torch.float32).numpy()
        else:
            try:
                z = np.asarray(latents, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise DiffRwkvError(f"{where}: latents are not numbers ({exc}); expected an array [N, "
                                    f"{self.latent_dim}]") from None  # fmt: skip
        single = z.ndim == 1
        z = z[None] if single else z
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise DiffRwkvError(f"{where}: latents have shape {list(np.shape(latents))}; expected [N, "
                                f"{self.latent_dim}] or [{self.latent_dim}]")  # fmt: skip
        if z.shape[0] == 0:
            raise DiffRwkvError(f"{where}: latents are empty; expected at least one row")
        bad = ~np.isfinite(z).all(1)
        if bad.any():
            raise DiffRwkvError(f"{where}: latent row {int(np.flatnonzero(bad)[0])} holds NaN or infinity; "
                                "expected finite values")  # fmt: skip
        return z, single

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @staticmethod
    def _steps(steps: int | None, where: str) -> dict[str, int]:
        if steps is None:
            return {}
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
            raise DiffRwkvError(f"{where}: steps is {steps!r}; expected an int >= 1")
        return {"num_steps": int(steps)}

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode(t) for t in texts]

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --------------------------------------------------------------------------------------------- methods
    def encode(
        self,
        texts: str | Sequence[str],
        *,
        batch_size: int = 64,
        steps: int | None = None,
        seed: int = 0,
        progress: bool = False,
        **options,
    ) -> np.ndarray:
        """Text -> latent with the model (T2L): float32 ``[B, D]`` in the data's latent space (``[D]`` for one
        string). ``steps`` and ``options`` (``method``, ``eta``, ``guidance_scale``, ``clip_x0``) default to
        :func:`~rwkv_diffusion_rnn.sampling.sample_t2l`'s."""
        rows, single = self._texts(texts, "encode")
        _check_options(sampling.sample_t2l, options, "encode")
        with self._autocast():
            z = sampling.sample_t2l(self.loaded, self._ids(rows), batch_size=batch_size, seed=seed,
                                    progress=progress, **self._steps(steps, "encode"), **options)  # fmt: skip
        return z[0] if single else z

    def decode(
        self,
        latents,
        *,
        batch_size: int = 64,
        steps: int | None = None,
        seed: int = 0,
        progress: bool = False,
        **options,
    ) -> list[str] | str:
        """Latent -> text (L2T): one string per row of ``latents`` (numpy or torch, ``[B, D]``; ``[D]`` gives one
        string). The decoder is :func:`~rwkv_diffusion_rnn.sampling.sample_l2t` with its defaults, the recommended
        one; ``steps`` and ``options`` (``strategy``, ``temperature``, ``top_p``, ``guidance_scale``,
        ``block_size``, ``candidates``, ``length``, ...) change them."""
        z, single = self.as_latents(latents, "decode")
        _check_options(sampling.sample_l2t, options, "decode")
        with self._autocast():
            ids = sampling.sample_l2t(self.loaded, z, batch_size=batch_size, seed=seed, progress=progress,
                                      **self._steps(steps, "decode"), **options)  # fmt: skip
        texts = [self._text(r) for r in ids]
        return texts[0] if single else texts

    def generate(
        self,
        n: int,
        *,
        batch_size: int = 64,
        steps: int | None = None,
        seed: int = 0,
        progress: bool = False,
        **options,
    ) -> tuple[list[str], np.ndarray]:
        """``n`` texts and their latents ``[n, D]`` drawn together from noise (joint); ``options`` are
        :func:`~rwkv_diffusion_rnn.sampling.sample_joint`'s (``length`` for models trained on variable lengths)."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise DiffRwkvError(f"generate: n is {n!r}; expected an int >= 1")
        _check_options(sampling.sample_joint, options, "generate")
        with self._autocast():
            ids, z = sampling.sample_joint(self.loaded, int(n), batch_size=batch_size, seed=seed, progress=progress,
                                           **self._steps(steps, "generate"), **options)  # fmt: skip
        return [self._text(r) for r in ids], z

    def _point(self, x, where: str) -> np.ndarray:
        if isinstance(x, str):
            return self.embed(x) if self.has_encoder else self.encode(x)
        z, single = self.as_latents(x, where)
        if not single:
            raise DiffRwkvError(f"{where}: expected one latent [{self.latent_dim}] or a string; got {z.shape[0]} rows")
        return z[0]

    def interpolate(self, a, b, n: int = 8, *, seed: int = 0, **options) -> Interpolation:
        """Decode ``n`` points from ``a`` to ``b`` (each a string or a latent ``[D]``; a string is embedded with the
        data's encoder when it is available, else with :meth:`encode`). The points lie on the great-circle arc
        between the two (the data's latents are unit vectors; a straight line where either is zero or they are
        parallel), and every point is decoded with the same seed, so the text changes only with the latent.
        ``options`` go to :meth:`decode`."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 2:
            raise DiffRwkvError(f"interpolate: n is {n!r}; expected an int >= 2")
        za, zb = self._point(a, "interpolate a"), self._point(b, "interpolate b")
        alphas = np.linspace(0.0, 1.0, int(n))
        na, nb = float(np.linalg.norm(za)), float(np.linalg.norm(zb))
        omega = float(np.arccos(np.clip(za @ zb / max(na * nb, 1e-12), -1.0, 1.0))) if na and nb else 0.0
        if omega < 1e-4 or np.pi - omega < 1e-4:
            pts = (1 - alphas)[:, None] * za + alphas[:, None] * zb
        else:  # slerp of the directions, the norm interpolated linearly
            ua, ub = za / na, zb / nb
            w = np.stack([np.sin((1 - alphas) * omega), np.sin(alphas * omega)], 1) / np.sin(omega)
            pts = (w[:, :1] * ua + w[:, 1:] * ub) * ((1 - alphas) * na + alphas * nb)[:, None]
        pts = pts.astype(np.float32)
        texts = [self.decode(p[None], seed=seed, **options)[0] for p in pts]  # row 0 each: the same noise
        return Interpolation(alphas, pts, texts)

    # ------------------------------------------------------------------------------------------ the data side
    @property
    def has_encoder(self) -> bool:
        return self.record.encoder_dir is not None

    def embed(self, texts: str | Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """The data's own encoder (the sentence encoder + projection prepare-latents used): float32 ``[B, D]`` unit
        latents, the ones the model was trained on (``[D]`` for one string)."""
        rows, single = self._texts(texts, "embed")
        if self._encoder is None:
            if self.record.encoder_dir is None:
                raise DiffRwkvError(
                    f"{self.record.source}: the data's encoder is not available (no latent_encoder.json beside the "
                    "training data); pass data_dir= to from_pretrained, or load a save_pretrained folder"
                )
            from rwkv_diffusion_rnn.latent_encoder import LatentEncoder

            with _no_loading_bar():
                self._encoder = LatentEncoder.from_dir(self.record.encoder_dir, device=str(self.device))
        z = self._encoder.encode(rows, batch_size=batch_size)
        return z[0] if single else z

    def _training_rows(self) -> tuple[np.ndarray, list[str]]:
        if self._train is None:
            if self.record.data_dir is None:
                raise DiffRwkvError(f"{self.record.source}: the training data is not on this machine; pass data_dir= "
                                    "to from_pretrained (the prepare-latents folder)")  # fmt: skip
            z, texts, _ = read_data_latents(self.record.data_dir, "train")
            norms = np.linalg.norm(z, axis=1, keepdims=True)
            self._train = (z / np.maximum(norms, 1e-12), [t or "" for t in texts])
        return self._train

    @property
    def has_data(self) -> bool:
        return self.record.data_dir is not None

    def nearest(self, latents, k: int = 5) -> list[list[tuple[str, float]]]:
        """For each latent ``[B, D]`` (or one ``[D]``), the ``k`` training sentences whose latents are closest in
        cosine: ``[(text, cosine), ...]`` best first."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise DiffRwkvError(f"nearest: k is {k!r}; expected an int >= 1")
        z, single = self.as_latents(latents, "nearest")
        bank, texts = self._training_rows()
        q = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        sims = q @ bank.T
        k = min(int(k), len(texts))
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        out = [[(texts[j], float(sims[i, j])) for j in row] for i, row in enumerate(top)]
        return out[0] if single else out
