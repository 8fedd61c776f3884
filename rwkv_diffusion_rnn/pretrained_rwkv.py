"""Load RWKV-7 weights from wherever a user keeps them, and convert between the two file formats.

Sources accepted by :func:`load_rwkv_model` (and :func:`load_rwkv_state_dict`):

* a local BlinkDL ``.pth`` (the format of ``BlinkDL/rwkv7-g1``), read with ``torch.load(weights_only=True)`` so a
  pickle cannot run code;
* a local ``.safetensors`` file, or a folder in the fla-hub Hugging Face format (``config.json`` + safetensors with
  fla's ``RWKV7ForCausalLM`` names), converted to BlinkDL's names on load;
* a hub repo id (``BlinkDL/rwkv7-g1`` + ``filename``, or an fla-hub repo), fetched through ``huggingface_hub`` with
  ``revision`` (pin it), ``cache_dir`` and ``local_files_only``.

Nothing here runs remote code: weights are plain tensors, read by safetensors or by the restricted unpickler.
Every failure is a one-line :class:`DiffRwkvError` naming the file and, for bad tensors, the tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}  # fmt: skip

# ---------------------------------------------------------------------------------------------------------------
# BlinkDL <-> fla-hub tensor names. Per layer: (BlinkDL suffix, fla suffix, how the tensor changes):
# "same" as is; "T" transposed (BlinkDL's low-rank matrices are [in, out], nn.Linear's are [out, in]);
# "vec" [1, 1, C] <-> [C].
_LAYER_MAP: list[tuple[str, str, str]] = [
    ("ln0.weight", "pre_norm.weight", "same"), ("ln0.bias", "pre_norm.bias", "same"),
    ("ln1.weight", "attn_norm.weight", "same"), ("ln1.bias", "attn_norm.bias", "same"),
    ("ln2.weight", "ffn_norm.weight", "same"), ("ln2.bias", "ffn_norm.bias", "same"),
    *[(f"att.x_{c}", f"attn.x_{c}", "same") for c in "rwkvag"],
    *[(f"att.{c}1", f"attn.{c}_lora.lora.0.weight", "T") for c in "wavg"],
    *[(f"att.{c}2", f"attn.{c}_lora.lora.2.weight", "T") for c in "wavg"],
    *[(f"att.{c}0", f"attn.{c}_lora.lora.2.bias", "vec") for c in "wav"],
    ("att.k_k", "attn.k_k", "vec"), ("att.k_a", "attn.k_a", "vec"), ("att.r_k", "attn.r_k", "same"),
    ("att.receptance.weight", "attn.r_proj.weight", "same"), ("att.key.weight", "attn.k_proj.weight", "same"),
    ("att.value.weight", "attn.v_proj.weight", "same"), ("att.output.weight", "attn.o_proj.weight", "same"),
    ("att.ln_x.weight", "attn.g_norm.weight", "same"), ("att.ln_x.bias", "attn.g_norm.bias", "same"),
    ("ffn.x_k", "ffn.x_k", "vec"), ("ffn.key.weight", "ffn.key.weight", "same"),
    ("ffn.value.weight", "ffn.value.weight", "same"),
]  # fmt: skip
_TOP_MAP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
            "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}  # fmt: skip
_BLINK_LAYER = {b: (f, how) for b, f, how in _LAYER_MAP}
_FLA_LAYER = {f: (b, how) for b, f, how in _LAYER_MAP}
_FLA_TOP = {f: b for b, f in _TOP_MAP.items()}


def _move(t: torch.Tensor, how: str, to_fla: bool) -> torch.Tensor:
    if how == "T":
        return t.t().contiguous()
    if how == "vec":
        return t.reshape(-1) if to_fla else t.reshape(1, 1, -1)
    return t


def blink_to_fla(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BlinkDL names -> fla ``RWKV7ForCausalLM`` names (layer 0's unused v0/v1/v2 are dropped)."""
    out = {}
    for name, t in sd.items():
        if name in _TOP_MAP:
            out[_TOP_MAP[name]] = t
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if not m or m.group(2) not in _BLINK_LAYER:
            raise DiffRwkvError(f"tensor '{name}' has no fla-hub name (not an RWKV-7 x070 checkpoint?)")
        layer, suffix = int(m.group(1)), m.group(2)
        if layer == 0 and suffix in ("att.v0", "att.v1", "att.v2"):
            continue
        fla, how = _BLINK_LAYER[suffix]
        out[f"model.layers.{layer}.{fla}"] = _move(t, how, to_fla=True)
    return out


def fla_to_blink(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """fla ``RWKV7ForCausalLM`` names -> BlinkDL names."""
    out = {}
    for name, t in sd.items():
        if name in _FLA_TOP:
            out[_FLA_TOP[name]] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if not m or m.group(2) not in _FLA_LAYER:
            raise DiffRwkvError(f"{source}: tensor '{name}' is not an fla RWKV-7 tensor name")
        blink, how = _FLA_LAYER[m.group(2)]
        out[f"blocks.{m.group(1)}.{blink}"] = _move(t, how, to_fla=False)
    return out


def fla_config(cfg: RWKV7Config, dtype: torch.dtype = torch.float32) -> dict:
    """``config.json`` for fla's ``RWKV7Config`` (model_type ``rwkv7``)."""
    return {
        "model_type": "rwkv7",
        "architectures": ["RWKV7ForCausalLM"],
        "attn_mode": "chunk",
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "head_dim": cfg.head_size,
        "num_heads": cfg.n_head,
        "hidden_ratio": cfg.dim_ffn / cfg.n_embd,
        "intermediate_size": cfg.dim_ffn,
        "decay_low_rank_dim": cfg.d_decay,
        "a_low_rank_dim": cfg.d_aaa,
        "v_low_rank_dim": cfg.d_mv,
        "gate_low_rank_dim": cfg.d_gate,
        "value_dim": [cfg.n_embd] * cfg.n_layer,
        "hidden_act": "sqrelu",
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": 1e-5,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------------------------------------------------------
# reading files
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise DiffRwkvError(
                f"{path}: refused to unpickle it: the file holds Python objects besides tensors, and loading those "
                "could run code (only weights_only checkpoints are read)"
            ) from exc
        raise DiffRwkvError(f"{path}: cannot read checkpoint ({_first_line(exc)}); is the file truncated?") from exc
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DiffRwkvError(f"{path}: expected a dict of tensors (BlinkDL's .pth format)")
    return dict(sd)


def _read_safetensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for p in paths:
        try:
            sd.update(load_file(str(p), device="cpu"))
        except Exception as exc:
            raise DiffRwkvError(f"{p}: cannot read safetensors ({_first_line(exc)}); is the file truncated?") from exc
    return sd


def _to_blink_names(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    if "emb.weight" in sd:
        return sd
    if "model.embeddings.weight" in sd:
        return fla_to_blink(sd, source)
    raise DiffRwkvError(
        f"{source}: neither BlinkDL ('emb.weight') nor fla-hub ('model.embeddings.weight') tensor names"
    )


def read_local_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a local ``.pth``, ``.safetensors`` or HF folder into a BlinkDL-named state dict (on the CPU)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            pths = sorted(p.glob("*.pth"))
            if len(pths) == 1:
                return _read_pth(pths[0])
            raise DiffRwkvError(f"{p}: folder holds no *.safetensors (HF format) and not exactly one .pth")
        cfg_file = p / "config.json"
        if cfg_file.is_file():
            try:
                model_type = json.loads(cfg_file.read_text()).get("model_type")
            except json.JSONDecodeError as exc:
                raise DiffRwkvError(f"{cfg_file}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
            if model_type not in (None, "rwkv7"):
                raise DiffRwkvError(f"{cfg_file}: model_type is '{model_type}', expected 'rwkv7'")
        return _to_blink_names(_read_safetensors(files), str(p))
    if not p.exists():
        raise DiffRwkvError(f"{p}: checkpoint not found")
    if p.suffix == ".safetensors":
        return _to_blink_names(_read_safetensors([p]), str(p))
    return _to_blink_names(_read_pth(p), str(p))


#: hub owners whose RWKV repos hold raw BlinkDL ``.pth`` files (several per repo), not one HF-format model
PTH_REPO_OWNERS = ("BlinkDL",)
PTH_EXAMPLE = "rwkv7-g1a-0.1b-<date>-ctx4096.pth"  # the repo's file list gives the dates


def _looks_like_repo_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and not os.path.exists(s)


def resolve_checkpoint(
    path_or_id: str | os.PathLike,
    filename: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local file or folder for ``path_or_id``, downloading from the hub if it is a repo id."""
    s = str(path_or_id)
    if not _looks_like_repo_id(s):
        p = Path(s).expanduser()
        if filename and p.is_dir():
            p = p / filename
        if not p.exists():
            raise DiffRwkvError(f"{p}: checkpoint not found; expected a BlinkDL .pth, a .safetensors, an HF folder or "
                                "a hub repo id (in a training config: model.rwkv_name)")  # fmt: skip
        return p
    import huggingface_hub as hub

    what = filename or "config.json + *.safetensors"
    hint = (
        f"download it where there is a network and pass the local path instead (/path/to/{filename or 'folder'}; "
        "in a training config model.rwkv_name), or point cache_dir at a Hugging Face cache that holds it"
    )
    if not filename and s.split("/")[0] in PTH_REPO_OWNERS:  # a repo of raw .pth files: the user must name one
        what = "a checkpoint"
        hint = (
            f"'{s}' holds BlinkDL .pth files, so name one with model.rwkv_filename (filename=), e.g. "
            f"model.rwkv_filename={PTH_EXAMPLE}, or download one where there is a network and pass its local path "
            "as model.rwkv_name"
        )
    if not local_files_only:
        from rwkv_diffusion_rnn.hub import hub_unreachable

        # An offline machine would spend ~30 s in the hub client's retries before failing: serve a cached copy,
        # else say at once that the hub cannot be reached.
        unreachable = hub_unreachable()
        if unreachable:
            try:
                return resolve_checkpoint(s, filename, revision, cache_dir, local_files_only=True)
            except DiffRwkvError:
                raise DiffRwkvError(
                    f"cannot fetch {what} from hub repo '{s}': not in the local cache and the hub is unreachable "
                    f"({unreachable}); {hint}"
                ) from None
    try:
        if filename:
            return Path(hub.hf_hub_download(s, filename, revision=revision, cache_dir=cache_dir,
                                            local_files_only=local_files_only))  # fmt: skip
        if not local_files_only:
            pths = [f for f in hub.list_repo_files(s, revision=revision) if f.endswith(".pth")]
            if pths:
                raise DiffRwkvError(
                    f"hub repo '{s}' holds BlinkDL .pth files; choose one with filename= (model.rwkv_filename), "
                    f"e.g. {', '.join(sorted(pths)[:4])}"
                )
        return Path(hub.snapshot_download(s, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                          allow_patterns=["config.json", "*.safetensors", "*.json"]))  # fmt: skip
    except DiffRwkvError:
        raise
    except Exception as exc:  # offline, 404, gated repo, auth...
        raise DiffRwkvError(f"cannot fetch {what} from hub repo '{s}' ({_first_line(exc)}); {hint}") from exc


def load_rwkv_state_dict(path_or_id: str | os.PathLike, **resolve_kwargs) -> tuple[dict[str, torch.Tensor], str]:
    """BlinkDL-named state dict and a description of where it came from (for messages)."""
    path = resolve_checkpoint(path_or_id, **resolve_kwargs)
    return read_local_checkpoint(path), str(path)


def check_state_dict(model: RWKV7, sd: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Every tensor the model needs, with its shape, and nothing else (layer 0's unused v0/v1/v2 tolerated)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    out = {}
    for name, shape in expected.items():
        if name not in sd:
            raise DiffRwkvError(f"{source}: missing tensor '{name}' (expected shape {list(shape)})")
        t = sd[name]
        if t.shape != shape:
            if t.numel() == shape.numel() and len(shape) == 3 and shape[:2] == (1, 1):
                t = t.reshape(shape)  # some exporters squeeze [1, 1, C] vectors
            else:
                raise DiffRwkvError(f"{source}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
        if not t.is_floating_point():
            raise DiffRwkvError(f"{source}: tensor '{name}' has dtype {t.dtype}, expected a floating-point type")
        out[name] = t
    extra = [k for k in sd if k not in expected and k not in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")]
    if extra:
        raise DiffRwkvError(f"{source}: unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all)")
    return out


def load_rwkv_model(
    path_or_id: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    filename: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    wkv_backend: str | None = None,
) -> RWKV7:
    """Build an :class:`RWKV7` with the checkpoint's sizes and load its weights (see the module docstring)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise DiffRwkvError(f"unknown dtype '{dtype}'; expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    sd, source = load_rwkv_state_dict(
        path_or_id, filename=filename, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )
    cfg = RWKV7Config.from_state_dict(sd, source)
    with torch.device("meta"):
        model = RWKV7(cfg, wkv_backend=wkv_backend, init=False)
    sd = check_state_dict(model, sd, source)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, assign=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# writing files (atomically: a temporary name in the same folder, then a rename)
def save_pth(sd: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a BlinkDL-format ``.pth`` (a plain dict of contiguous CPU tensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({k: v.detach().cpu().contiguous() for k, v in sd.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_hf(sd: Mapping[str, torch.Tensor], out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write an fla-hub folder: ``config.json`` + ``model.safetensors`` with fla's names."""
    from safetensors.torch import save_file

    cfg = RWKV7Config.from_state_dict(sd)
    fla = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in blink_to_fla(sd).items()}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        save_file(fla, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        dt = dtype or next(iter(fla.values())).dtype
        (tmp / "config.json").write_text(json.dumps(fla_config(cfg, dt), indent=2) + "\n")
        if out_dir.exists():
            if any(out_dir.iterdir()):
                raise DiffRwkvError(f"{out_dir}: output folder exists and is not empty")
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()


def convert_main(argv: list[str] | None = None) -> int:
    """``diffrwkv convert IN OUT``: ``.pth`` -> HF folder, or HF folder / ``.safetensors`` -> ``.pth``."""
    ap = argparse.ArgumentParser(
        prog="diffrwkv convert",
        description="Convert an RWKV-7 checkpoint between BlinkDL's .pth and the fla-hub Hugging Face format. "
        "OUT ending in .pth writes BlinkDL's format; any other OUT is a folder (config.json + model.safetensors).",
    )
    ap.add_argument("src", help="a .pth, a .safetensors, an HF folder, or a hub repo id")
    ap.add_argument("out", help="output .pth file or HF folder")
    ap.add_argument("--filename", help="file inside a hub repo (e.g. one of BlinkDL/rwkv7-g1's .pth files)")
    ap.add_argument("--revision", help="hub revision (commit hash) to pin")
    ap.add_argument("--cache-dir", help="Hugging Face cache folder")
    ap.add_argument("--local-files-only", action="store_true", help="never touch the network")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep)")
    args = ap.parse_args(argv)
    sd, source = load_rwkv_state_dict(args.src, filename=args.filename, revision=args.revision,
                                      cache_dir=args.cache_dir, local_files_only=args.local_files_only)  # fmt: skip
    cfg = RWKV7Config.from_state_dict(sd, source)
    with torch.device("meta"):
        sd = check_state_dict(RWKV7(cfg, init=False), sd, source)  # validate before writing anything
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.out.endswith(".pth"):
        save_pth({k: v.to(dtype) if dtype else v for k, v in sd.items()}, args.out)
    else:
        save_hf(sd, args.out, dtype)
    n_params = sum(v.numel() for v in sd.values())
    print(f"wrote {args.out} (L{cfg.n_layer} D{cfg.n_embd} V{cfg.vocab_size}, {n_params:,} params)")
    return 0
