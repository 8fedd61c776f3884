"""The folder :meth:`DiffRwkv.save_pretrained <rwkv_diffusion_rnn.api.DiffRwkv.save_pretrained>` writes, and where a
model's data lives.

A saved folder is self-contained (format version 1)::

    diffrwkv.json        format, step, source checkpoint, whether the weights are the EMA's, the backbone reference,
                         the training data folder (for nearest neighbours), and {"bytes", "sha256"} of every file
    model.safetensors    the trained tensors (the EMA's where chosen); a frozen backbone is not among them
    config.json          {"config": the resolved training config, "denoiser": ..., "backbone_config": ...}
    normalizer.json      per-dimension latent mean and std (LatentNormalizer.state_dict)
    vocab.json           {"vocab_ids": [...]}: the compact vocabulary's World ids (model.vocab=data only)
    latent_encoder/      latent_encoder.json + latent_projection.npz: the data's own text -> latent encoder
    backbone/NAME        a frozen pretrained backbone, only when copied in (``copy_backbone=True``); otherwise
                         diffrwkv.json references it by absolute path + sha256, as a training checkpoint does

It is written into a staging folder and renamed into place, so a failed save leaves no half-written folder; every
file is sha256-checked against diffrwkv.json before it is read.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from rwkv_diffusion_rnn.backbone_ref import backbone_reference
from rwkv_diffusion_rnn.data_io import atomic_write_json, file_sha256, staged_output
from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.latent_encoder import ENCODER_META, PROJECTION_FILE

INDEX = "diffrwkv.json"
FORMAT = "diffrwkv-pretrained"
FORMAT_VERSION = 1
ENCODER_DIR = "latent_encoder"


@dataclass
class ModelRecord:
    """What rebuilds a model (:func:`pipeline.build_model`'s inputs) and where its data is."""

    config: dict[str, Any]  # the resolved training config
    extra: dict[str, Any]  # denoiser, backbone_config, normalizer, vocab_ids (as a checkpoint's meta.json has them)
    backbone: dict[str, Any] | None  # {"path", "sha256", ...} of a frozen backbone, or None (all tensors trained)
    tensor_names: list[str]  # the trained tensors' names
    step: int
    source: Path  # the checkpoint or saved folder it came from
    ema: bool  # whether the weights are the EMA's
    encoder_dir: Path | None  # folder holding latent_encoder.json, or None when not found
    data_dir: Path | None  # the training split's prepare-latents folder (train_data.json), or None


# ---------------------------------------------------------------------------------------------- data folders


def _existing(path_str: str | None, anchor: Path) -> Path | None:
    """A path from a stored config: as given (absolute, or relative to the working folder), else relative to each
    folder above ``anchor`` (a checkpoint written with relative data paths, read from elsewhere)."""
    if not path_str:
        return None
    p = Path(path_str)
    if p.exists():
        return p.resolve()
    if p.is_absolute():
        return None
    for base in anchor.resolve().parents:
        if (base / p).exists():
            return (base / p).resolve()
    return None


def find_data_dir(config: dict[str, Any], anchor: Path) -> Path | None:
    """The prepare-latents folder of the training split named in ``config`` (``data.json_path``'s folder, or the
    folder above ``data.latent_dir``'s ``latents/<split>``), or None when it is not on this machine."""
    data = config.get("data") or {}
    found = _existing(data.get("json_path"), anchor)
    if found is not None:
        return found.parent
    lat = _existing(data.get("latent_dir"), anchor)
    return lat.parent.parent if lat is not None else None


def encoder_dir_of(data_dir: Path | None) -> Path | None:
    return data_dir if data_dir is not None and (data_dir / ENCODER_META).is_file() else None


# ------------------------------------------------------------------------------------------------------ writing


def save_folder(
    out: str | Path,
    record: ModelRecord,
    tensors: dict[str, torch.Tensor],
    *,
    copy_backbone: bool = False,
) -> Path:
    """Write ``record`` and ``tensors`` as a saved folder at ``out`` (see the module docstring). An existing saved
    folder (or an empty folder) is replaced; any other existing folder is an error."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DiffRwkvError(f"{out}: exists and is not a folder; expected a folder to save the model into")
    replacing = out.is_dir() and any(out.iterdir())
    if replacing and not (out / INDEX).is_file():
        raise DiffRwkvError(f"{out}: folder holds other files; expected a new folder or one save_pretrained wrote")
    if copy_backbone and not record.backbone:
        raise DiffRwkvError("copy_backbone: this model has no separate backbone (its tensors are all in the model)")
    if record.backbone and not Path(record.backbone["path"]).exists():
        raise DiffRwkvError(f"{record.source}: its backbone {record.backbone['path']} is missing; cannot save it")
    with staged_output(out, overwrite=True) as stage:
        safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                    str(stage / "model.safetensors"))  # fmt: skip
        keep = {k: record.extra[k] for k in ("denoiser", "backbone_config") if k in record.extra}
        atomic_write_json(stage / "config.json", {"config": record.config, **keep})
        atomic_write_json(stage / "normalizer.json", record.extra["normalizer"])
        if "vocab_ids" in record.extra:
            atomic_write_json(stage / "vocab.json", {"vocab_ids": record.extra["vocab_ids"]}, indent=None)
        encoder = None
        if record.encoder_dir is not None:
            (stage / ENCODER_DIR).mkdir()
            for name in (ENCODER_META, PROJECTION_FILE):
                shutil.copyfile(record.encoder_dir / name, stage / ENCODER_DIR / name)
            encoder = ENCODER_DIR
        backbone = dict(record.backbone) if record.backbone else None
        if copy_backbone and backbone:
            src = Path(backbone["path"])
            (stage / "backbone").mkdir()
            dst = stage / "backbone" / src.name
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
            ref = backbone_reference(dst)
            if backbone.get("sha256") and ref["sha256"] != backbone["sha256"]:
                raise DiffRwkvError(f"{src}: backbone changed since training (sha256 differs); not copied")
            backbone = {"file": f"backbone/{src.name}", "sha256": ref["sha256"], "bytes": ref["bytes"]}
        files = {
            p.relative_to(stage).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(stage.rglob("*"))
            if p.is_file() and not p.relative_to(stage).as_posix().startswith("backbone/")
        }
        index = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": record.step,
            "source": str(record.source),
            "ema": record.ema,
            "backbone": backbone,
            "latent_encoder": encoder,
            "data_dir": str(record.data_dir) if record.data_dir is not None else None,
            "files": files,
        }
        atomic_write_json(stage / INDEX, index)
    return out


# ------------------------------------------------------------------------------------------------------ reading


def is_saved_folder(path: Path) -> bool:
    return (path / INDEX).is_file()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffRwkvError(f"{path}: unreadable ({exc}); expected the JSON save_pretrained wrote") from exc


def read_folder(folder: str | Path) -> tuple[ModelRecord, dict[str, torch.Tensor]]:
    """The record and tensors of a saved folder, every listed file checked against its sha256 first."""
    folder = Path(folder)
    index = _read_json(folder / INDEX)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DiffRwkvError(f"{folder / INDEX}: not a DiffRwkv saved model (format is not '{FORMAT}')")
    if index.get("format_version") != FORMAT_VERSION:
        raise DiffRwkvError(f"{folder / INDEX}: format_version {index.get('format_version')!r}; this code reads "
                            f"{FORMAT_VERSION}")  # fmt: skip
    files = index.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        raise DiffRwkvError(f"{folder / INDEX}: 'files' does not list model.safetensors")
    for name, info in files.items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise DiffRwkvError(f"{folder / INDEX}: file entry {name!r} leaves the folder (refused)")
        if not path.is_file():
            raise DiffRwkvError(f"{path}: missing (listed in {INDEX})")
        if path.stat().st_size != info.get("bytes") or file_sha256(path) != info.get("sha256"):
            raise DiffRwkvError(f"{path}: size or sha256 does not match {INDEX} (corrupted or modified)")
    try:
        tensors = safetensors.torch.load_file(str(folder / "model.safetensors"))
    except Exception as exc:  # SafetensorError, OSError
        raise DiffRwkvError(f"{folder / 'model.safetensors'}: unreadable safetensors ({exc})") from exc
    cfg = _read_json(folder / "config.json")
    extra = {k: cfg[k] for k in ("denoiser", "backbone_config") if k in cfg}
    extra["normalizer"] = _read_json(folder / "normalizer.json")
    if (folder / "vocab.json").is_file():
        extra["vocab_ids"] = _read_json(folder / "vocab.json")["vocab_ids"]
    backbone = index.get("backbone")
    if backbone and "file" in backbone:  # copied in: an absolute path for the loader, still hash-checked
        backbone = {**backbone, "path": str((folder / backbone["file"]).resolve())}
    data_dir = Path(index["data_dir"]) if index.get("data_dir") else None
    record = ModelRecord(
        config=cfg["config"],
        extra=extra,
        backbone=backbone,
        tensor_names=sorted(tensors),
        step=int(index.get("step", 0)),
        source=folder,
        ema=bool(index.get("ema")),
        encoder_dir=folder / ENCODER_DIR if index.get("latent_encoder") else None,
        data_dir=data_dir if data_dir is not None and data_dir.is_dir() else None,
    )
    return record, tensors
