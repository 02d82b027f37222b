"""The frozen image encoder interface: multi-level features at fixed relative depths (what DiffUp's backbone
swap without re-training needs, arXiv 2407.16182 Fig. 2 (b); the depths are fsdiff's choice).

Every encoder returns ``levels`` feature maps, shallow to deep, at fixed *relative* depths of the network
(for CNNs the ends of the stride-8/16/32 stage groups; for ViTs the blocks at 1/3, 2/3 and the final
depth), so the number of priors built on them never depends on the backbone. Encoders are frozen: no
parameter requires a gradient, the module is always in eval mode, and ``train(True)`` is ignored.
"""

from __future__ import annotations

import abc

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch import nn

from fsdiff.episode import check_image
from fsdiff.errors import FsdiffError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""ImageNet RGB mean on the 0..1 scale (torchvision convention)."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet RGB standard deviation on the 0..1 scale."""


def as_size(size: int | Sequence[int], what: str = "size") -> tuple[int, int]:
    """Normalise an input size to (H, W): an int is a square side, a pair is (H, W)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        h = w = int(size)
    elif isinstance(size, Sequence) and len(size) == 2 and all(isinstance(v, (int, np.integer)) for v in size):
        h, w = int(size[0]), int(size[1])
    else:
        raise FsdiffError(f"{what} must be an int (square side) or a pair (H, W) of ints, got {size!r}.")
    if h < 16 or w < 16 or h > 4096 or w > 4096:
        raise FsdiffError(f"{what} {h}x{w} (HxW) is out of range; use sides between 16 and 4096 pixels.")
    return h, w


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an image or a float map to (H, W): area filter when shrinking, bilinear when enlarging."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    shrink = h * w < image.shape[0] * image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


class Encoder(nn.Module, abc.ABC):
    """A frozen multi-level image encoder.

    Subclasses set ``name``, ``levels``, ``strides`` (one per level), ``channels`` (one per level),
    ``mean``/``std`` (RGB, on the 0..1 scale) and ``default_size``, and implement :meth:`forward`.
    """

    name: str = ""
    levels: int = 3
    strides: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    default_size: int = 224
    size_multiple: int = 1
    autocast_dtype: torch.dtype | None = None
    """Compute precision of :meth:`extract` (e.g. ``torch.bfloat16``); None = the weights' dtype."""

    def freeze(self) -> "Encoder":
        """Disable gradients and switch to eval mode; returns self."""
        for p in self.parameters():
            p.requires_grad_(False)
        nn.Module.train(self, False)
        return self

    def train(self, mode: bool = True) -> "Encoder":
        """Ignored: a frozen encoder stays in eval mode (BatchNorm statistics never move)."""
        return nn.Module.train(self, False)

    @property
    def device(self) -> torch.device:
        """Device of the encoder's parameters."""
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the encoder's parameters."""
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def input_size(self, size: int | Sequence[int] | None) -> tuple[int, int]:
        """The (H, W) actually fed to the network for a requested ``size`` (rounded to ``size_multiple``)."""
        h, w = as_size(self.default_size if size is None else size)
        m = self.size_multiple
        if m > 1:
            h, w = max(m, int(round(h / m)) * m), max(m, int(round(w / m)) * m)
        return h, w

    def preprocess(self, image: np.ndarray, size: int | Sequence[int] | None = None) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> normalised (1, 3, h, w) tensor on the encoder's device and dtype."""
        check_image(image, "encoder input")
        h, w = self.input_size(size)
        arr = resize_image(np.ascontiguousarray(image), (h, w))
        x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        x = (x - mean) / std
        return x.to(device=self.device, dtype=self.dtype)

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, h, w) normalised images -> ``levels`` maps (B, C_l, h/s_l, w/s_l), shallow to deep."""

    def extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run :meth:`forward` without autograd (under ``autocast_dtype`` if set); float32 contiguous maps."""
        with torch.inference_mode():
            if self.autocast_dtype is not None:
                with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
                    feats = self(x)
            else:
                feats = self(x)
            return [f.float().contiguous() for f in feats]

    def encode(self, image: np.ndarray, size: int | Sequence[int] | None = None) -> list[torch.Tensor]:
        """Convenience: preprocess one image and return its ``levels`` maps, each (C_l, h_l, w_l)."""
        return [f[0] for f in self.extract(self.preprocess(image, size))]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, levels={self.levels}, strides={self.strides}, channels={self.channels}"
