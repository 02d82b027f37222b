"""Checkpoint folders of fsdiff's trainable methods: one layout for every method (DiffUp, DiffSeg).

    DIR/fsdiff_checkpoint.json                          method, module names, config, frozen encoder, provenance
    DIR/<module>/config.json                            each trained module as diffusers ``save_pretrained``
    DIR/<module>/diffusion_pytorch_model.safetensors    writes it (config + safetensors, never a pickle)

``fsdiff_checkpoint.json`` is written last, so its presence means the folder is complete. A training run
folder (``DIR/final/`` inside) is accepted wherever a checkpoint is. Folders written before this layout
(DiffUp's ``diffup.json``; DiffSeg's ``diffseg_config.json`` with ``diffseg_train.json``) are still read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsdiff.errors import FsdiffError
from fsdiff.io import write_text
from fsdiff.jsonutil import dumps

INFO_FILE = "fsdiff_checkpoint.json"
FORMAT = "fsdiff-checkpoint"
VERSION = 1
MODULE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
"""The files ``save_pretrained`` writes for one module."""
_LEGACY_DIFFUP = "diffup.json"
_LEGACY_DIFFSEG = ("diffseg_config.json", "diffseg_train.json")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint folder holds (the modules' weights stay on disk until loaded)."""

    directory: Path
    method: str
    modules: tuple[str, ...]
    config: dict[str, Any]
    encoder: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def module_dir(self, name: str) -> Path:
        """The folder of one trained module."""
        return self.directory / name


def expected_files(modules: tuple[str, ...]) -> tuple[str, ...]:
    """Every file a checkpoint of these modules holds, relative to its folder."""
    return (INFO_FILE,) + tuple(f"{m}/{f}" for m in modules for f in MODULE_FILES)


def write_checkpoint(
    directory: str | os.PathLike,
    method: str,
    modules: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    encoder: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``modules`` (diffusers models, by folder name) and the description file into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        module.save_pretrained(out / name, safe_serialization=True)
    doc = {"format": FORMAT, "version": VERSION, "method": method, "modules": list(modules),
           "encoder": encoder, "config": dict(config), "provenance": dict(provenance or {})}
    try:
        text = dumps(doc, indent=2)
    except (TypeError, ValueError) as exc:
        raise FsdiffError(f"cannot write the {method} checkpoint description: {exc}.") from None
    write_text(out / INFO_FILE, text + "\n")
    return out


def _resolve(directory: str | os.PathLike | None, method: str, hint: str) -> Path:
    """The checkpoint folder itself (a run folder's ``final/``), or an FsdiffError saying what to pass."""
    if directory is None:
        raise FsdiffError(f"{method} needs a trained checkpoint folder; {hint}.")
    d = Path(directory).expanduser()
    if not d.is_dir():
        what = "is a file, not a folder" if d.exists() else "does not exist"
        raise FsdiffError(f"{method} checkpoint {d} {what}; it must hold {INFO_FILE} and the module folders. {hint}.")
    markers = (INFO_FILE, _LEGACY_DIFFUP, _LEGACY_DIFFSEG[0])
    if not any((d / m).is_file() for m in markers) and any((d / "final" / m).is_file() for m in markers):
        d = d / "final"  # a training run folder: use its final weights
    return d


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise FsdiffError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged: re-save or re-train it.") from None
    except OSError as exc:
        raise FsdiffError(f"cannot read {path} ({exc}).") from None


def _legacy(d: Path) -> CheckpointInfo | None:
    """A checkpoint written before the common layout, or None."""
    if (d / _LEGACY_DIFFUP).is_file():
        doc = _load_json(d / _LEGACY_DIFFUP)
        if not isinstance(doc, dict) or doc.get("format") != "fsdiff-diffup" or not isinstance(doc.get("config"), dict):
            raise FsdiffError(f"{d / _LEGACY_DIFFUP} is not a DiffUp checkpoint description; re-save or re-train it.")
        return CheckpointInfo(d, "diffup", ("uapf", "uqdd"), doc["config"], str(doc.get("encoder") or "") or None,
                              dict(doc.get("provenance") or {}))
    if (d / _LEGACY_DIFFSEG[0]).is_file():
        config = _load_json(d / _LEGACY_DIFFSEG[0])
        if not isinstance(config, dict):
            raise FsdiffError(f"{d / _LEGACY_DIFFSEG[0]}: expected a JSON object; re-save or re-train the checkpoint.")
        prov = _load_json(d / _LEGACY_DIFFSEG[1]) if (d / _LEGACY_DIFFSEG[1]).is_file() else {}
        modules = ("pam", "scm") if (d / "scm").is_dir() else ("pam",)
        return CheckpointInfo(d, "diffseg", modules, config, None, prov if isinstance(prov, dict) else {})
    return None


def read_checkpoint(directory: str | os.PathLike | None, method: str, *, hint: str = "") -> CheckpointInfo:
    """Describe the ``method`` checkpoint in ``directory`` after checking every file is there."""
    d = _resolve(directory, method, hint)
    if (d / INFO_FILE).is_file():
        doc = _load_json(d / INFO_FILE)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("config"), dict) \
                or not isinstance(doc.get("modules"), list):
            raise FsdiffError(f"{d / INFO_FILE} is not an fsdiff checkpoint description; re-save or re-train it.")
        if int(doc.get("version", 0)) > VERSION:
            raise FsdiffError(f"{d} was written by a newer fsdiff (checkpoint version {doc['version']}); upgrade fsdiff.")
        info = CheckpointInfo(d, str(doc.get("method")), tuple(str(m) for m in doc["modules"]), doc["config"],
                              doc.get("encoder"), dict(doc.get("provenance") or {}))
    else:
        info = _legacy(d)
        if info is None:
            raise FsdiffError(f"{d} is not a {method} checkpoint: it holds no {INFO_FILE}. {hint}.")
    if info.method != method:
        raise FsdiffError(f"{d} is a {info.method} checkpoint, not a {method} one; pass a {method} checkpoint.")
    missing = [f for f in expected_files(info.modules) if f != INFO_FILE and not (d / f).is_file()]
    if missing:
        raise FsdiffError(f"{method} checkpoint {d} is incomplete: missing {', '.join(missing)}; {hint or 're-save it'}.")
    return info


def load_module(info: CheckpointInfo, name: str, cls: Any, device: Any = "cpu") -> Any:
    """Module ``name`` of the checkpoint as ``cls`` in float32 on ``device``, in eval mode."""
    import torch

    try:
        module = cls.from_pretrained(info.module_dir(name), torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FsdiffError(
            f"cannot load {name} of the {info.method} checkpoint {info.directory} ({first}); re-save or re-train it."
        ) from None
    if any(p.dtype != torch.float32 for p in module.parameters()):  # from_pretrained already gives float32
        module = torch.nn.Module.to(module, dtype=torch.float32)
    return module.to(device).eval()
