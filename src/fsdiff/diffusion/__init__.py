"""The diffusion-model layer shared by the diffusion-backed methods (Kandinsky 2.2 for DiffSeg, Stable Diffusion
+ ControlNet for DifFSS).

* :mod:`fsdiff.diffusion.loading`: frozen Kandinsky 2.2 / Stable Diffusion / ControlNet components from a Hub
  id or a local directory, with actionable errors when offline or given the wrong kind of model.
* :mod:`fsdiff.diffusion.attention`: attention capture through diffusers attention processors and DiffSeg's
  attention prior M_a = minmax(M_self · vec(M_cross)) (DiffSeg §4.2, Eq. (11)).
* :mod:`fsdiff.diffusion.tiny`: tiny random stand-ins of the public checkpoints, for tests.

diffusers / transformers are imported lazily (inside the functions that need them), so importing this package
is cheap.
"""

from fsdiff.diffusion.attention import (
    AddedKVCaptureProcessor,
    AttentionCapture,
    AttentionLayer,
    CaptureAttnProcessor,
    attention_layers,
    attention_prior,
    minmax,
    resize_cross_map,
    resize_matrix,
    resize_self_map,
)
from fsdiff.diffusion.loading import (
    CONTROLNET_IDS,
    KANDINSKY_DECODER_ID,
    KANDINSKY_PRIOR_ID,
    MODEL_DIR_ENV,
    SD15_ID,
    SD21_ID,
    KandinskyParts,
    MissingModelError,
    StableDiffusionParts,
    classify_model,
    default_dtype,
    download_command,
    freeze,
    hub_reachable,
    load_controlnet,
    load_kandinsky,
    load_stable_diffusion,
    resolve_device,
)

__all__ = [
    "CONTROLNET_IDS",
    "KANDINSKY_DECODER_ID",
    "KANDINSKY_PRIOR_ID",
    "MODEL_DIR_ENV",
    "SD15_ID",
    "SD21_ID",
    "AddedKVCaptureProcessor",
    "AttentionCapture",
    "AttentionLayer",
    "CaptureAttnProcessor",
    "KandinskyParts",
    "MissingModelError",
    "StableDiffusionParts",
    "attention_layers",
    "attention_prior",
    "classify_model",
    "default_dtype",
    "download_command",
    "freeze",
    "hub_reachable",
    "load_controlnet",
    "load_kandinsky",
    "load_stable_diffusion",
    "minmax",
    "resize_cross_map",
    "resize_matrix",
    "resize_self_map",
    "resolve_device",
]
