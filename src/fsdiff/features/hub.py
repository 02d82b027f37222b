"""Hub backbones through Hugging Face transformers: ``hf:<model id>`` or ``hf:<local directory>``
(DiffUp's backbone upgrade without re-training, arXiv 2407.16182 Fig. 2 (b): larger CNNs, ViTs, CLIP weights).

Features come at 3 fixed relative depths, so everything built on them is backbone-agnostic:

* ViT-like models (tokens): the hidden states after blocks round(L/3) and round(2L/3), and the final
  ``last_hidden_state`` (after the model's final norm where it has one), prefix tokens (CLS, registers)
  dropped and patch tokens reshaped to the (H/p, W/p) grid. The input side is rounded to a multiple of
  the patch size; position embeddings are interpolated (``interpolate_pos_encoding``) where the model
  supports it, otherwise the input is fixed to the model's ``image_size``.
* CNN-like models (4-D hidden states, e.g. ``microsoft/resnet-50``): the last three stage outputs
  (ResNet: stages 2, 3, 4 at strides 8, 16, 32).
* Dual-encoder checkpoints with a ``vision_config`` (CLIP, SigLIP): only the vision tower is loaded.

Input normalisation comes from the checkpoint's image processor (``AutoImageProcessor``); without one,
ImageNet mean/std are used. Nothing is fetched from the network unless allowed: a local directory is
always read with ``local_files_only``; a hub id is first looked up in the local Hugging Face cache, and
only downloaded when ``download`` allows it (default: unless ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``
is set). A miss raises an FsdiffError saying what to download and where.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from fsdiff.errors import FsdiffError
from fsdiff.features.base import IMAGENET_MEAN, IMAGENET_STD, Encoder

PREFIX = "hf:"
"""Encoder names starting with this prefix are loaded through transformers."""

_TRUE = {"1", "true", "yes", "on"}


def offline_mode() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set (read at call time)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _download_hint(model_id: str) -> str:
    local = Path(model_id).name or "model"
    return (
        f"download it on a machine with internet access with `hf download {model_id} --local-dir DIR` "
        f"(older huggingface_hub: `huggingface-cli download {model_id} --local-dir DIR`; e.g. DIR=models/{local}), "
        "copy DIR here and pass the encoder name 'hf:DIR'"
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars while loading."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise FsdiffError(
            "hub encoders ('hf:...') need the transformers package; install it with "
            "`pip install 'fsdiff[diffusion]'` or `pip install transformers`."
        ) from None
    return transformers


class HubEncoder(Encoder):
    """A frozen transformers vision model giving 3 levels at relative depths 1/3, 2/3, 1 (or 3 last stages)."""

    def __init__(self, model: torch.nn.Module, name: str, mean, std, kind: str, patch_size: int = 0,
                 image_size: int = 224, interpolate: bool = True):
        super().__init__()
        self.model = model
        self.name = name
        self.kind = kind
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.patch_size = int(patch_size)
        self.native_size = int(image_size)
        self.interpolate = interpolate
        self.default_size = int(image_size)
        self.size_multiple = self.patch_size if kind == "vit" else 1
        self.levels = 3
        self.channels = ()
        self.strides = ()

    def input_size(self, size=None) -> tuple[int, int]:
        """ViTs without position-embedding interpolation only accept their native ``image_size``."""
        if self.kind == "vit" and not self.interpolate:
            return self.native_size, self.native_size
        return super().input_size(size)

    def _hidden(self, x: torch.Tensor):
        kwargs = {"output_hidden_states": True, "return_dict": True}
        if self.kind == "vit" and self.interpolate:
            kwargs["interpolate_pos_encoding"] = True
        return self.model(pixel_values=x, **kwargs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> 3 maps (B, C, h, w), shallow to deep."""
        out = self._hidden(x)
        if self.kind == "cnn":
            hs = getattr(out, "reshaped_hidden_states", None) or out.hidden_states
            return [h.contiguous() for h in hs[-3:]]
        hs = out.hidden_states  # embeddings + one per block
        depth = len(hs) - 1
        picks = [hs[max(1, round(depth / 3))], hs[max(1, round(2 * depth / 3))], out.last_hidden_state]
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        maps = []
        for t in picks:
            n_prefix = t.shape[1] - gh * gw
            if n_prefix < 0:
                raise FsdiffError(f"encoder {self.name}: {t.shape[1]} tokens cannot form a {gh}x{gw} patch grid.")
            grid = t[:, n_prefix:, :].transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw)
            maps.append(grid.contiguous())
        return maps


def _resolve(spec: str) -> tuple[str, bool]:
    """(source, is_local_dir) for the part after ``hf:``."""
    src = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    src = src.strip()
    if not src:
        raise FsdiffError("encoder name 'hf:' needs a model id or directory, e.g. 'hf:facebook/dinov2-small'.")
    p = Path(src).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FsdiffError(
                f"encoder directory {p} has no config.json; point 'hf:DIR' at a folder written by "
                "`save_pretrained` or `hf download MODEL --local-dir DIR`."
            )
        return str(p), True
    if src.startswith((".", "/", "~")) or src.count("/") > 1 or "\\" in src:
        raise FsdiffError(
            f"encoder directory {src!r} does not exist; pass 'hf:<existing directory>' or a hub id like "
            "'hf:facebook/dinov2-small'."
        )
    return src, False


def _load_config(transformers, src: str, local_only: bool):
    return transformers.AutoConfig.from_pretrained(src, local_files_only=local_only)


def build_hub_encoder(
    spec: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    download: bool | None = None,
) -> HubEncoder:
    """Load ``hf:<model id or directory>`` as a frozen 3-level :class:`HubEncoder`.

    ``download``: None = allowed unless the HF offline environment variables are set; False = only the
    local directory / local HF cache; True = may download.
    """
    transformers = _import_transformers()
    src, is_dir = _resolve(spec)
    allow_download = (not offline_mode()) if download is None else bool(download)
    name = spec if spec.startswith(PREFIX) else PREFIX + spec

    local_only = True
    try:
        config = _load_config(transformers, src, True)
    except (OSError, ValueError) as exc:
        if is_dir:
            raise FsdiffError(f"encoder {name}: cannot read the model config in {src} ({exc}).") from None
        if not allow_download:
            raise FsdiffError(
                f"encoder {name}: model {src!r} is not in the local Hugging Face cache and downloading is "
                f"off (offline); {_download_hint(src)}."
            ) from None
        local_only = False
        try:
            config = _load_config(transformers, src, False)
        except (OSError, ValueError) as exc2:
            raise FsdiffError(
                f"encoder {name}: cannot fetch model {src!r} from the Hugging Face Hub ({str(exc2).splitlines()[0]}); "
                f"{_download_hint(src)}."
            ) from None

    vision_cfg = getattr(config, "vision_config", None)
    with _quiet_transformers():
        try:
            if vision_cfg is not None:
                cls_name = type(config).__name__.replace("Config", "VisionModel")
                cls = getattr(transformers, cls_name, None)
                if cls is None:
                    raise FsdiffError(
                        f"encoder {name}: {type(config).__name__} has a vision tower but transformers has no "
                        f"{cls_name}; use a vision-only checkpoint."
                    )
                model, info = cls.from_pretrained(src, local_files_only=local_only, output_loading_info=True)
                cfg = vision_cfg
            else:
                model, info = transformers.AutoModel.from_pretrained(
                    src, local_files_only=local_only, output_loading_info=True
                )
                cfg = config
        except FsdiffError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise FsdiffError(
                f"encoder {name}: cannot load the model weights from {src!r} ({str(exc).splitlines()[0]}); "
                f"{_download_hint(src) if not is_dir else 'check that the directory holds the model weights'}."
            ) from None
    missing = list(info.get("missing_keys", [])) if isinstance(info, dict) else []
    if missing:
        raise FsdiffError(
            f"encoder {name}: the checkpoint lacks {len(missing)} weights (e.g. {missing[0]}), so the model "
            "would be partly random; use a complete checkpoint."
        )

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        with _quiet_transformers():
            proc = transformers.AutoImageProcessor.from_pretrained(src, local_files_only=local_only)
        if getattr(proc, "image_mean", None) is not None and getattr(proc, "image_std", None) is not None:
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, KeyError, ImportError):
        pass  # no image processor saved: ImageNet statistics (documented)

    patch = getattr(cfg, "patch_size", 0)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    image_size = getattr(cfg, "image_size", 224)
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    kind = "vit" if patch and not getattr(cfg, "hidden_sizes", None) and not getattr(cfg, "depths", None) else "cnn"
    enc = HubEncoder(model, name, mean, std, kind, patch_size=patch or 0, image_size=image_size or 224)
    enc.to(device=device, dtype=dtype).freeze()
    _probe(enc)
    return enc


@torch.inference_mode()
def _probe(enc: HubEncoder) -> None:
    """Run one small forward to learn channels/strides and whether position embeddings interpolate."""
    if enc.kind == "vit":
        side = enc.patch_size * 4
        if side == enc.native_size:
            side += enc.patch_size
        x = torch.zeros(1, 3, side, side + enc.patch_size, device=enc.device, dtype=enc.dtype)
        try:
            feats = enc(x)
        except (TypeError, ValueError, RuntimeError):
            enc.interpolate = False
            x = torch.zeros(1, 3, enc.native_size, enc.native_size, device=enc.device, dtype=enc.dtype)
            feats = enc(x)
    else:
        x = torch.zeros(1, 3, 64, 64, device=enc.device, dtype=enc.dtype)
        feats = enc(x)
    enc.channels = tuple(int(f.shape[1]) for f in feats)
    enc.strides = tuple(max(1, round(x.shape[-1] / f.shape[-1])) for f in feats)
