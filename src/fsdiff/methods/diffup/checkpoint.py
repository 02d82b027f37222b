"""DiffUp checkpoints (arXiv 2407.16182, Fig. 2: the trained UAPF and UQDD) in fsdiff's common layout
(:mod:`fsdiff.checkpoint`)::

    DIR/fsdiff_checkpoint.json      method "diffup", DiffUpConfig, the encoder the priors were computed with, provenance
    DIR/uapf/config.json, DIR/uapf/diffusion_pytorch_model.safetensors
    DIR/uqdd/config.json, DIR/uqdd/diffusion_pytorch_model.safetensors
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fsdiff.checkpoint import expected_files, read_checkpoint, load_module, write_checkpoint
from fsdiff.errors import FsdiffError
from fsdiff.methods.diffup.config import DiffUpConfig
from fsdiff.methods.diffup.uapf import UAPF
from fsdiff.methods.diffup.uqdd import UQDD

METHOD = "diffup"
MODULES = ("uapf", "uqdd")
EXPECTED_FILES = expected_files(MODULES)
"""Every file a DiffUp checkpoint directory holds."""
TRAIN_HINT = (
    "train one with `fsdiff train diffup --out DIR ...` or in Python with "
    "fsdiff.api.train('diffup', source, DIR) and pass DIR/final"
)


def save_diffup(
    directory: str | os.PathLike, config: DiffUpConfig, uapf: UAPF, uqdd: UQDD, meta: Mapping[str, Any]
) -> Path:
    """Write a DiffUp checkpoint (see the module docstring); ``meta`` must name the ``encoder``."""
    if not isinstance(config, DiffUpConfig):
        raise FsdiffError(f"save_diffup: config must be a DiffUpConfig, got {type(config).__name__}.")
    meta = dict(meta or {})
    encoder = meta.pop("encoder", None)
    if not isinstance(encoder, str) or not encoder:
        raise FsdiffError(
            "save_diffup: meta must name the 'encoder' the priors were computed with (e.g. 'efficientnet-lite0')."
        )
    return write_checkpoint(directory, METHOD, {"uapf": uapf, "uqdd": uqdd}, config.to_dict(), encoder=encoder,
                            provenance=meta)


def check_checkpoint(directory: str | os.PathLike | None) -> Path:
    """Raise an FsdiffError unless ``directory`` holds a complete DiffUp checkpoint; return its folder."""
    return read_checkpoint(directory, METHOD, hint=TRAIN_HINT).directory


def load_diffup(
    directory: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[DiffUpConfig, UAPF, UQDD, dict]:
    """Read a DiffUp checkpoint: (config, UAPF, UQDD, meta) with ``meta['encoder']`` and the provenance."""
    info = read_checkpoint(directory, METHOD, hint=TRAIN_HINT)
    unknown = sorted(set(info.config) - set(DiffUpConfig.__dataclass_fields__))
    if unknown:
        raise FsdiffError(
            f"{info.directory} has config fields this fsdiff does not know ({', '.join(unknown)}); it was written by "
            "a newer fsdiff: upgrade fsdiff."
        )
    config = DiffUpConfig(**info.config)
    # shipped checkpoints store float16 weights (half the size); compute runs in float32
    uapf = load_module(info, "uapf", UAPF, device)
    uqdd = load_module(info, "uqdd", UQDD, device)
    if int(uapf.config.prior_channels) != config.prior_channels:
        raise FsdiffError(
            f"{info.directory}: UAPF expects {uapf.config.prior_channels} prior channels but the config gives "
            f"{config.prior_channels}; the checkpoint is inconsistent, re-save it."
        )
    return config, uapf, uqdd, {"encoder": info.encoder or "", **info.provenance}

