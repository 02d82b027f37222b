"""Loading the frozen pretrained diffusion models that DiffSeg and DifFSS build on.

* Kandinsky 2.2 for DiffSeg (DiffSeg §4.2 names Kandinsky without a version; 2.2 is fsdiff's choice): from
  ``kandinsky-community/kandinsky-2-2-prior`` only the ``image_encoder`` (CLIP ViT-bigG/14 vision tower with
  projection, ``CLIPVisionModelWithProjection``) and its ``image_processor`` (``CLIPImageProcessor``); from
  ``kandinsky-community/kandinsky-2-2-decoder`` the ``unet`` (``UNet2DConditionModel`` with
  ``encoder_hid_dim_type="image_proj"``, ``addition_embed_type="image"``), ``movq`` (``VQModel``) and
  ``scheduler`` (the class named by the repository's ``model_index.json``).
* Stable Diffusion 1.5 / 2.1 for DifFSS (its official code uses SD 1.5 + ControlNet 1.0, ``cldm_v15.yaml``):
  ``unet``, ``vae``, ``text_encoder`` (``CLIPTextModel``), ``tokenizer`` (``CLIPTokenizer``) and ``scheduler``;
  and a ``ControlNetModel``.

A model is named by a Hub id or by a local directory in the Hub layout (one subfolder per component). A Hub
id is looked up, in order, as ``$FSDIFF_MODEL_DIR/<org>/<name>``, ``$FSDIFF_MODEL_DIR/<name>``, the Hugging
Face cache, and the Hub. The Hub is only contacted when ``HF_HUB_OFFLINE`` is unset and a quick socket probe
of the endpoint succeeds (never a hang); otherwise ``local_files_only=True``. Anything missing becomes one
:class:`~fsdiff.errors.FsdiffError` that names the repositories and files to download, gives a ready-to-paste
download command, and says how to point fsdiff at the directory. A directory of the wrong kind (for example a
Stable Diffusion directory where the Kandinsky decoder is expected) is recognised from ``model_index.json``'s
``_class_name`` and the UNet config (``encoder_hid_dim_type``, ``addition_embed_type``) and refused with a
message saying what was found and what was expected.

Every returned module is frozen: eval mode, ``requires_grad=False`` on every parameter, on the requested
device in the requested dtype (default :func:`default_dtype`: bfloat16 on CPU, float16 on CUDA).
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fsdiff.errors import FsdiffError

KANDINSKY_PRIOR_ID = "kandinsky-community/kandinsky-2-2-prior"
"""Hub id of the Kandinsky 2.2 prior (only its image encoder and image processor are used)."""
KANDINSKY_DECODER_ID = "kandinsky-community/kandinsky-2-2-decoder"
"""Hub id of the Kandinsky 2.2 decoder (UNet, MoVQ, scheduler)."""
SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"""Hub id of Stable Diffusion 1.5 (formerly ``runwayml/stable-diffusion-v1-5``)."""
SD21_ID = "stabilityai/stable-diffusion-2-1"
"""Hub id of Stable Diffusion 2.1."""
STABLE_DIFFUSION_IDS = {"1.5": SD15_ID, "2.1": SD21_ID}
"""Short names accepted by :func:`load_stable_diffusion`."""
CONTROLNET_IDS = {
    "seg": "lllyasviel/sd-controlnet-seg",
    "hed": "lllyasviel/sd-controlnet-hed",
    "scribble": "lllyasviel/sd-controlnet-scribble",
}
"""Short names accepted by :func:`load_controlnet`: the ControlNet 1.0 diffusers ports used by DifFSS."""
MODEL_DIR_ENV = "FSDIFF_MODEL_DIR"
"""Environment variable naming a folder of downloaded models, laid out as ``<org>/<name>`` (or ``<name>``)."""
PROBE_TIMEOUT_S = 3.0
"""Seconds allowed to the socket probe of the Hub endpoint before going offline."""

# What each role needs from its repository: (subfolder or None for the root, files, what it is).
_WEIGHTS = "diffusion_pytorch_model.safetensors"
_NEEDS: dict[str, list[tuple[str | None, tuple[str, ...]]]] = {
    "kandinsky-prior": [
        (None, ("model_index.json",)),
        ("image_encoder", ("config.json", "model.safetensors")),
        ("image_processor", ("preprocessor_config.json",)),
    ],
    "kandinsky-decoder": [
        (None, ("model_index.json",)),
        ("unet", ("config.json", _WEIGHTS)),
        ("movq", ("config.json", _WEIGHTS)),
        ("scheduler", ("scheduler_config.json",)),
    ],
    "stable-diffusion": [
        (None, ("model_index.json",)),
        ("unet", ("config.json", _WEIGHTS)),
        ("vae", ("config.json", _WEIGHTS)),
        ("text_encoder", ("config.json", "model.safetensors")),
        ("tokenizer", ("vocab.json", "merges.txt", "tokenizer_config.json")),
        ("scheduler", ("scheduler_config.json",)),
    ],
    "controlnet": [(None, ("config.json", _WEIGHTS))],
}
_ROLE_TITLE = {
    "kandinsky-prior": "Kandinsky 2.2 prior (image encoder)",
    "kandinsky-decoder": "Kandinsky 2.2 decoder",
    "stable-diffusion": "Stable Diffusion",
    "controlnet": "ControlNet",
}
_ROLE_ARG = {
    "kandinsky-prior": "prior",
    "kandinsky-decoder": "decoder",
    "stable-diffusion": "model",
    "controlnet": "model",
}


# --------------------------------------------------------------------------------------------------------------
# Device and dtype
# --------------------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device to use: ``device`` if given, else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FsdiffError(f"device {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FsdiffError(f"device {device!r} was requested but CUDA is not available here; use device='cpu'.")
    return dev


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """Default weights dtype for a device: float16 on CUDA (and MPS), bfloat16 on CPU."""
    if device is None:
        dev = resolve_device(None)
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise FsdiffError(f"device {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'.") from exc
    return torch.float16 if dev.type in ("cuda", "mps") else torch.bfloat16


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, str):
        table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype.lower() not in table:
            raise FsdiffError(f"dtype {dtype!r} is not supported; use one of {sorted(table)}.")
        return table[dtype.lower()]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise FsdiffError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16.")
    return dtype


def freeze(module: nn.Module) -> nn.Module:
    """Put a module in eval mode with every parameter's ``requires_grad`` off; returns it."""
    module.requires_grad_(False)
    module.eval()
    return module


# --------------------------------------------------------------------------------------------------------------
# Where a model comes from
# --------------------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_probe_cache: dict[str, bool] = {}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub can be contacted: False under HF_HUB_OFFLINE or when a quick probe fails."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return False
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover - huggingface_hub always present with diffusers
        endpoint = "https://huggingface.co"
    if endpoint not in _probe_cache:
        url = urllib.parse.urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            with socket.create_connection((url.hostname or "huggingface.co", port), timeout=PROBE_TIMEOUT_S):
                _probe_cache[endpoint] = True
        except OSError:
            _probe_cache[endpoint] = False
    return _probe_cache[endpoint]


@dataclass(frozen=True)
class ModelSource:
    """Where one model is read from: a local directory (``path``) or a Hub repository (``repo_id``)."""

    spec: str
    role: str
    repo_id: str | None = None
    path: Path | None = None
    local_files_only: bool = True

    @property
    def location(self) -> str:
        """What ``from_pretrained`` receives: the directory or the Hub id."""
        return str(self.path) if self.path is not None else str(self.repo_id)

    def describe(self) -> str:
        """Human-readable origin, for messages."""
        return f"directory {self.path}" if self.path is not None else f"Hub repository {self.repo_id}"


def resolve_source(spec: str | os.PathLike[str], role: str) -> ModelSource:
    """Resolve a Hub id or directory to a :class:`ModelSource` (see the module docstring for the search order)."""
    text = os.fspath(spec)
    if not text.strip():
        raise FsdiffError(f"{_ROLE_ARG[role]}: empty model name; pass a Hub id or a local directory.")
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelSource(spec=text, role=role, path=path.resolve())
    if path.exists():
        raise FsdiffError(
            f"{_ROLE_ARG[role]}={text!r} is a file; expected a directory in the Hugging Face layout "
            f"(one subfolder per component) or a Hub id such as {_default_id(role)!r}."
        )
    if not _HUB_ID.match(text) or Path(text.split("/")[0]).expanduser().is_dir():
        raise FsdiffError(
            f"{_ROLE_ARG[role]}={text!r}: directory not found (nor is it a Hub id). "
            + _how_to_get(role, _default_id(role))
        )
    root = os.environ.get(MODEL_DIR_ENV)
    if root:
        for cand in (Path(root).expanduser() / text, Path(root).expanduser() / text.split("/")[1]):
            if cand.is_dir():
                return ModelSource(spec=text, role=role, path=cand.resolve())
    return ModelSource(spec=text, role=role, repo_id=text, local_files_only=not hub_reachable())


def _default_id(role: str) -> str:
    return {
        "kandinsky-prior": KANDINSKY_PRIOR_ID,
        "kandinsky-decoder": KANDINSKY_DECODER_ID,
        "stable-diffusion": SD15_ID,
        "controlnet": CONTROLNET_IDS["hed"],
    }[role]


# --------------------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------------------


def _needed_files(role: str) -> str:
    parts = []
    for sub, files in _NEEDS[role]:
        parts.append(", ".join(files) if sub is None else f"{sub}/ ({', '.join(files)})")
    return "; ".join(parts)


def download_command(repo_id: str, role: str, local_dir: str | None = None, legacy: bool = False) -> str:
    """A ready-to-paste command downloading what fsdiff needs from ``repo_id`` into ``local_dir``."""
    local_dir = local_dir or f"models/{repo_id}"
    if role == "controlnet":
        patterns = ["config.json", _WEIGHTS]
    else:
        patterns = ["model_index.json"] + [f"{sub}/*" for sub, _files in _NEEDS[role] if sub is not None]
    excludes = ["*.bin", "*.ckpt", "*fp16*", "*non_ema*", "*.onnx", "*.msgpack", "*.h5"]
    if legacy:
        inc = " ".join(f'"{p}"' for p in patterns)
        exc = " ".join(f'"{p}"' for p in excludes)
        return f"huggingface-cli download {repo_id} --include {inc} --exclude {exc} --local-dir {local_dir}"
    inc = " ".join(f'--include "{p}"' for p in patterns)
    exc = " ".join(f'--exclude "{p}"' for p in excludes)
    return f"hf download {repo_id} {inc} {exc} --local-dir {local_dir}"


def _how_to_get(role: str, repo_id: str) -> str:
    arg = _ROLE_ARG[role]
    local_dir = f"models/{repo_id}"
    return (
        f"Needed from {repo_id}: {_needed_files(role)}. Download them on a machine with internet access:\n"
        f"  {download_command(repo_id, role, local_dir)}\n"
        f"  (huggingface_hub < 1.0: {download_command(repo_id, role, local_dir, legacy=True)})\n"
        f"then point fsdiff at the copy: pass the directory itself ({arg}={local_dir!r}), or set "
        f"{MODEL_DIR_ENV}=models so that {MODEL_DIR_ENV}/{repo_id} is found, or download without --local-dir "
        f"into the Hugging Face cache."
    )


def local_status(spec: str | os.PathLike[str], role: str) -> tuple[bool, str]:
    """Whether every file ``role`` needs from ``spec`` is on this machine (no network), and a hint if not.

    Looks where loading looks (a directory, ``$FSDIFF_MODEL_DIR``, the Hugging Face cache) and returns
    ``(True, where)`` or ``(False, how to download it)``.
    """
    text = os.fspath(spec)
    wanted = [f if sub is None else f"{sub}/{f}" for sub, files in _NEEDS[role] for f in files]
    dirs = [Path(text).expanduser()]
    root = os.environ.get(MODEL_DIR_ENV)
    if root and _HUB_ID.match(text):
        dirs += [Path(root).expanduser() / text, Path(root).expanduser() / text.split("/")[1]]
    for d in dirs:
        if d.is_dir() and all((d / f).is_file() for f in wanted):
            return True, f"directory {d}"
    if _HUB_ID.match(text):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = [try_to_load_from_cache(text, f) for f in wanted]
        except Exception:  # an unusable cache counts as absent
            found = [None]
        if all(isinstance(f, str) for f in found):
            return True, f"Hugging Face cache ({text})"
    return False, _how_to_get(role, text if _HUB_ID.match(text) else _default_id(role))


class MissingModelError(FsdiffError):
    """A model's files are not available (subclass of FsdiffError, so callers can tell it from bad input)."""


def _missing(src: ModelSource, detail: str, cause: BaseException | None = None) -> MissingModelError:
    title = _ROLE_TITLE[src.role]
    if src.path is not None:
        where = f"{title} {src.describe()}: {detail}."
        repo = _default_id(src.role)
    else:
        why = (
            "the Hub cannot be reached (HF_HUB_OFFLINE is set or the endpoint did not answer), so only the local "
            "Hugging Face cache was searched"
            if src.local_files_only
            else "the download failed"
        )
        where = f"{title} {src.repo_id} is not available: {detail}; {why}."
        repo = src.repo_id or _default_id(src.role)
    msg = f"{where}\n{_how_to_get(src.role, repo)}"
    if cause is not None:
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        msg += f"\n(underlying error: {type(cause).__name__}: {first[:300]})"
    return MissingModelError(msg)


# --------------------------------------------------------------------------------------------------------------
# Reading configs and components
# --------------------------------------------------------------------------------------------------------------


def _read_json(src: ModelSource, filename: str, required: bool = True) -> dict[str, Any] | None:
    """Read one JSON file of a model (local directory or Hub/cache); None when optional and absent."""
    if src.path is not None:
        file = src.path / filename
        if not file.is_file():
            if required:
                raise _missing(src, f"{filename} is missing")
            return None
    else:
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(src.repo_id, filename, local_files_only=src.local_files_only))
        except Exception as exc:  # LocalEntryNotFoundError, RepositoryNotFoundError, network errors
            if not required and type(exc).__name__ in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
                return None
            if not required and src.local_files_only:
                return None
            raise _missing(src, f"{filename} could not be found", exc) from exc
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FsdiffError(f"{file}: not a readable JSON file ({exc}); download it again.") from exc
    if not isinstance(data, dict):
        raise FsdiffError(f"{file}: expected a JSON object; download it again.")
    return data


def _check_subfolder(src: ModelSource, sub: str) -> None:
    if src.path is None:
        return
    folder = src.path / sub
    if not folder.is_dir():
        raise _missing(src, f"subfolder {sub}/ is missing")
    files = [f.name for f in folder.iterdir()]
    if not any(n.endswith((".json", ".txt")) for n in files):
        raise _missing(src, f"subfolder {sub}/ holds no config file")


def _load_component(src: ModelSource, cls: Any, sub: str | None, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` on one component, turning any failure into an actionable FsdiffError."""
    if sub is not None:
        _check_subfolder(src, sub)
        kwargs["subfolder"] = sub
    try:
        return cls.from_pretrained(src.location, local_files_only=src.local_files_only, **kwargs)
    except FsdiffError:
        raise
    except Exception as exc:
        raise _missing(src, f"{what} could not be loaded", exc) from exc


def _pipeline_class(index: dict[str, Any] | None) -> str:
    return str(index.get("_class_name", "")) if index else ""


def _describe_found(index: dict[str, Any] | None, unet_cfg: dict[str, Any] | None) -> str:
    bits = []
    if index is not None:
        bits.append(f"model_index.json _class_name {_pipeline_class(index)!r}")
    if unet_cfg is not None:
        bits.append(
            "unet config encoder_hid_dim_type={!r}, addition_embed_type={!r}, in_channels={!r}, "
            "cross_attention_dim={!r}".format(
                unet_cfg.get("encoder_hid_dim_type"), unet_cfg.get("addition_embed_type"),
                unet_cfg.get("in_channels"), unet_cfg.get("cross_attention_dim"),
            )
        )
    return "; ".join(bits) if bits else "no model_index.json and no unet config"


def classify_model(index: dict[str, Any] | None, unet_cfg: dict[str, Any] | None) -> str:
    """Name the kind of a diffusers model directory from its model_index.json and UNet config.

    Returns one of ``kandinsky-2.2-decoder``, ``kandinsky-2.2-variant`` (inpainting / ControlNet decoders),
    ``kandinsky-2.2-prior``, ``kandinsky-2.1``, ``stable-diffusion``, ``stable-diffusion-variant`` (e.g.
    inpainting), ``sdxl``, ``other``.
    """
    name = _pipeline_class(index)
    if name.startswith("KandinskyV22Prior"):
        return "kandinsky-2.2-prior"
    if name.startswith("Kandinsky") and not name.startswith("KandinskyV22"):
        return "kandinsky-2.1" if "Kandinsky3" not in name else "other"
    if name.startswith("StableDiffusionXL"):
        return "sdxl"
    if unet_cfg is not None:
        hid = unet_cfg.get("encoder_hid_dim_type")
        add = unet_cfg.get("addition_embed_type")
        if hid == "image_proj":
            if add == "image" and unet_cfg.get("in_channels", 4) == 4:
                return "kandinsky-2.2-decoder"
            return "kandinsky-2.2-variant"
        if hid == "text_image_proj":
            return "kandinsky-2.1"
        if add == "text_time":
            return "sdxl"
        if hid is None and add is None and unet_cfg.get("cross_attention_dim") is not None:
            if name and not name.startswith("StableDiffusion"):
                return "other"
            return "stable-diffusion" if unet_cfg.get("in_channels", 4) == 4 else "stable-diffusion-variant"
        return "other"
    if name.startswith("KandinskyV22"):
        return "kandinsky-2.2-decoder"
    if name.startswith("StableDiffusion"):
        return "stable-diffusion"
    return "other"


def _wrong_kind(src: ModelSource, found_kind: str, found: str, expected: str, arg_hint: str) -> FsdiffError:
    return FsdiffError(
        f"{_ROLE_ARG[src.role]}: {src.describe()} holds a {found_kind.replace('-', ' ')} model ({found}), but "
        f"{expected} is expected here. {arg_hint}"
    )


# --------------------------------------------------------------------------------------------------------------
# Kandinsky 2.2
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KandinskyParts:
    """The frozen Kandinsky 2.2 components DiffSeg uses (DiffSeg §4.1, Eq. (3)-(6))."""

    unet: Any
    movq: Any
    scheduler: Any
    image_encoder: Any
    image_processor: Any
    device: torch.device
    dtype: torch.dtype
    prior_source: str
    decoder_source: str

    @property
    def movq_scale_factor(self) -> int:
        """Pixels per latent cell of the MoVQ (8 for the public checkpoint: 512 px -> 64 latent)."""
        return 2 ** (len(self.movq.config.block_out_channels) - 1)

    @property
    def embed_dim(self) -> int:
        """Width of the CLIP image embedding (1280 for ViT-bigG/14)."""
        return int(self.image_encoder.config.projection_dim)

    @property
    def num_image_tokens(self) -> int:
        """Number of image-embedding tokens the UNet's ``encoder_hid_proj`` makes (N_tok in diffusion.attention)."""
        return int(self.unet.encoder_hid_proj.num_image_text_embeds)


def load_kandinsky(
    prior: str | os.PathLike[str] = KANDINSKY_PRIOR_ID,
    decoder: str | os.PathLike[str] = KANDINSKY_DECODER_ID,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> KandinskyParts:
    """Load the Kandinsky 2.2 image encoder + processor (prior repo) and UNet + MoVQ + scheduler (decoder repo)."""
    from diffusers import UNet2DConditionModel, VQModel
    from transformers import CLIPVisionModelWithProjection

    dev = resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    psrc = resolve_source(prior, "kandinsky-prior")
    dsrc = resolve_source(decoder, "kandinsky-decoder")

    # Read the small config files of both repositories first, so that one message lists everything missing.
    missing: list[MissingModelError] = []
    dindex = ucfg = pindex = ecfg = None
    try:
        dindex = _read_json(dsrc, "model_index.json", required=False)
        if dindex is not None and classify_model(dindex, None) == "kandinsky-2.2-prior":
            raise _wrong_kind(dsrc, "kandinsky-2.2-prior", _describe_found(dindex, None),
                              f"the Kandinsky 2.2 decoder ({KANDINSKY_DECODER_ID})",
                              "Pass it as prior= and the decoder repository as decoder=.")
        ucfg = _read_json(dsrc, "unet/config.json")
    except MissingModelError as exc:
        missing.append(exc)
    try:
        pindex = _read_json(psrc, "model_index.json", required=False)
        if pindex is None or classify_model(pindex, None) == "kandinsky-2.2-prior":
            ecfg = _read_json(psrc, "image_encoder/config.json")
    except MissingModelError as exc:
        missing.append(exc)
    if len(missing) == 1:
        raise missing[0]
    if missing:
        raise MissingModelError("\n\n".join(str(e) for e in missing))
    assert ucfg is not None

    # Decoder: check the kind before reading any weights.
    kind = classify_model(dindex, ucfg)
    if kind != "kandinsky-2.2-decoder":
        hint = {
            "kandinsky-2.2-prior": "Pass it as prior= and the decoder repository as decoder=.",
            "kandinsky-2.2-variant": "Use the text-to-image decoder (in_channels 4, addition_embed_type 'image').",
        }.get(kind, f"Use {KANDINSKY_DECODER_ID} or a local copy of it.")
        raise _wrong_kind(dsrc, kind, _describe_found(dindex, ucfg),
                          f"the Kandinsky 2.2 decoder ({KANDINSKY_DECODER_ID}: KandinskyV22Pipeline, unet "
                          "encoder_hid_dim_type='image_proj', addition_embed_type='image')", hint)

    # Prior: only the image encoder and processor.
    pkind = classify_model(pindex, None)
    if pindex is not None and pkind != "kandinsky-2.2-prior":
        if psrc.path is not None and (psrc.path / "unet").is_dir():
            pkind = classify_model(pindex, _read_json(psrc, "unet/config.json", required=False))
        raise _wrong_kind(psrc, pkind, _describe_found(pindex, None),
                          f"the Kandinsky 2.2 prior ({KANDINSKY_PRIOR_ID}: KandinskyV22PriorPipeline with "
                          "image_encoder/ and image_processor/)",
                          "Pass the prior repository as prior= (the decoder goes to decoder=).")
    assert ecfg is not None
    proj = ecfg.get("projection_dim")
    if ucfg.get("encoder_hid_dim") is not None and proj is not None and proj != ucfg.get("encoder_hid_dim"):
        raise FsdiffError(
            f"prior: the image encoder in {psrc.describe()} projects to {proj} dimensions but the decoder UNet in "
            f"{dsrc.describe()} expects encoder_hid_dim={ucfg.get('encoder_hid_dim')}; the two repositories do "
            f"not belong together. Use {KANDINSKY_PRIOR_ID} with {KANDINSKY_DECODER_ID}."
        )

    sched_name = _scheduler_class_name(dsrc, dindex)
    sched_cls = _scheduler_class(dsrc, sched_name)
    unet = _load_component(dsrc, UNet2DConditionModel, "unet", "unet (UNet2DConditionModel)", torch_dtype=dt)
    movq = _load_component(dsrc, VQModel, "movq", "movq (VQModel)", torch_dtype=dt)
    scheduler = _load_component(dsrc, sched_cls, "scheduler", f"scheduler ({sched_name})")
    encoder = _load_component(psrc, CLIPVisionModelWithProjection, "image_encoder",
                              "image_encoder (CLIPVisionModelWithProjection)", dtype=dt)
    processor = _load_component(psrc, _clip_image_processor_class(), "image_processor",
                                "image_processor (CLIPImageProcessor)")
    return KandinskyParts(
        unet=freeze(unet.to(dev)), movq=freeze(movq.to(dev)), scheduler=scheduler,
        image_encoder=freeze(encoder.to(dev)), image_processor=processor, device=dev, dtype=dt,
        prior_source=psrc.location, decoder_source=dsrc.location,
    )


def _clip_image_processor_class() -> Any:
    """The torchvision-free CLIP image processor class (``CLIPImageProcessorPil`` where transformers has it)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def _scheduler_class_name(src: ModelSource, index: dict[str, Any] | None) -> str:
    entry = (index or {}).get("scheduler")
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        return str(entry[1])
    cfg = _read_json(src, "scheduler/scheduler_config.json")
    name = cfg.get("_class_name") if cfg else None
    if not name:
        raise FsdiffError(f"{src.describe()}: scheduler/scheduler_config.json names no _class_name; download it again.")
    return str(name)


def _scheduler_class(src: ModelSource, name: str) -> Any:
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise FsdiffError(
            f"{src.describe()}: the scheduler class {name!r} named in model_index.json is not a diffusers "
            f"scheduler of diffusers {diffusers.__version__}; upgrade diffusers or fix the file."
        )
    return cls


# --------------------------------------------------------------------------------------------------------------
# Stable Diffusion and ControlNet
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StableDiffusionParts:
    """The frozen Stable Diffusion components DifFSS uses (its ``FSSpregenerate.py``)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    device: torch.device
    dtype: torch.dtype
    source: str
    pipeline_class: str

    @property
    def family(self) -> str:
        """'1.x' (cross_attention_dim 768), '2.x' (1024) or 'custom' (e.g. the tiny test models)."""
        dim = self.unet.config.cross_attention_dim
        return {768: "1.x", 1024: "2.x"}.get(dim, "custom")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell of the VAE (8 for SD 1.5 / 2.1)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_stable_diffusion(
    model: str | os.PathLike[str] = SD15_ID,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> StableDiffusionParts:
    """Load SD 1.5 / 2.1 (``'1.5'``, ``'2.1'``, a Hub id or a directory): unet, vae, text encoder, tokenizer..."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    spec = STABLE_DIFFUSION_IDS.get(os.fspath(model), model) if not Path(os.fspath(model)).exists() else model
    dev = resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    src = resolve_source(spec, "stable-diffusion")
    index = _read_json(src, "model_index.json", required=False)
    ucfg = None
    if classify_model(index, None) not in ("kandinsky-2.2-prior", "kandinsky-2.1", "sdxl"):
        ucfg = _read_json(src, "unet/config.json")
    kind = classify_model(index, ucfg)
    if kind != "stable-diffusion":
        hint = {
            "kandinsky-2.2-decoder": "Pass it to the Kandinsky loader (decoder=) instead.",
            "kandinsky-2.2-prior": "Pass it to the Kandinsky loader (prior=) instead.",
            "stable-diffusion-variant": "Use the text-to-image checkpoint (unet in_channels 4), not inpainting.",
        }.get(kind, f"Use {SD15_ID} or {SD21_ID}.")
        raise _wrong_kind(src, kind, _describe_found(index, ucfg),
                          "Stable Diffusion 1.5 or 2.1 (StableDiffusionPipeline; unet without encoder_hid_dim_type "
                          "or addition_embed_type)", hint)
    sched_name = _scheduler_class_name(src, index)
    sched_cls = _scheduler_class(src, sched_name)
    unet = _load_component(src, UNet2DConditionModel, "unet", "unet (UNet2DConditionModel)", torch_dtype=dt)
    vae = _load_component(src, AutoencoderKL, "vae", "vae (AutoencoderKL)", torch_dtype=dt)
    text_encoder = _load_component(src, CLIPTextModel, "text_encoder", "text_encoder (CLIPTextModel)", dtype=dt)
    tokenizer = _load_component(src, CLIPTokenizer, "tokenizer", "tokenizer (CLIPTokenizer)")
    scheduler = _load_component(src, sched_cls, "scheduler", f"scheduler ({sched_name})")
    return StableDiffusionParts(
        unet=freeze(unet.to(dev)), vae=freeze(vae.to(dev)), text_encoder=freeze(text_encoder.to(dev)),
        tokenizer=tokenizer, scheduler=scheduler, device=dev, dtype=dt, source=src.location,
        pipeline_class=_pipeline_class(index) or "StableDiffusionPipeline",
    )


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_controlnet(
    model: str | os.PathLike[str] = CONTROLNET_IDS["hed"],
    *,
    unet: Any | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> Any:
    """Load a frozen ``ControlNetModel`` (``'seg'``, ``'hed'``, ``'scribble'``, a Hub id or a directory).

    With ``unet`` given, check that the ControlNet matches it (cross-attention width and block widths).
    """
    from diffusers import ControlNetModel

    text = os.fspath(model)
    spec = CONTROLNET_IDS.get(text, text) if not Path(text).exists() else text
    dev = resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    src = resolve_source(spec, "controlnet")
    cfg = _read_json(src, "config.json")
    if cfg.get("_class_name") != "ControlNetModel":
        found = cfg.get("_class_name")
        raise FsdiffError(
            f"model: {src.describe()} holds a {found!r} (config.json _class_name), but a ControlNetModel is expected "
            f"here (e.g. {CONTROLNET_IDS['hed']}). For a pipeline directory pass its controlnet/ subfolder."
        )
    if unet is not None:
        for key in ("cross_attention_dim", "block_out_channels"):
            a, b = cfg.get(key), getattr(unet.config, key, None)
            if a is not None and b is not None and _as_list(a) != _as_list(b):
                raise FsdiffError(
                    f"model: the ControlNet in {src.describe()} has {key}={a} but the UNet has {key}={b}; use a "
                    "ControlNet trained for this Stable Diffusion version (SD 1.5 ControlNets need SD 1.5)."
                )
    net = _load_component(src, ControlNetModel, None, "ControlNetModel", torch_dtype=dt)
    return freeze(net.to(dev))
