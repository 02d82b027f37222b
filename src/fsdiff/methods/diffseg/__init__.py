"""DiffSeg (Shi et al., "Few-shot Semantic Segmentation via Perceptual Attention and Spatial Control", ACM MM
2024): Kandinsky 2.2 attention priors (§4.2, Eq. 11), the Perceptual Attention Module (§4.3,
Eq. 12) and the Spatial Control Module (§4.4). Section and equation numbers are the paper's. Tags in this
package: [P] stated in the paper, [R] fsdiff's reconstruction where the paper is silent.

* :mod:`.config`: :class:`DiffSegConfig` (every choice the paper leaves open as a field with its default).
* :mod:`.pam`, :mod:`.scm`: the trainable modules (diffusers ``ModelMixin`` + ``ConfigMixin``).
* :mod:`.model`: :class:`DiffSegModel` (frozen parts + PAM + SCM; forward, loss, checkpoints).
* :mod:`.segmenter`: the ``diffseg-prior`` and ``diffseg`` segmenters (thresholds: :func:`fsdiff.evaluate.choose_threshold`).

Only :mod:`.config` is imported eagerly; the rest (which imports diffusers) loads on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

from fsdiff.methods.diffseg.config import DiffSegConfig

_LAZY = {
    "PerceptualAttentionModule": "pam",
    "init_pam": "pam",
    "SpatialControlModule": "scm",
    "init_scm": "scm",
    "levels_for_resolutions": "scm",
    "BATCH_KEYS": "model",
    "DiffSegModel": "model",
    "DiffSegOutput": "model",
    "load_diffseg_model": "model",
    "load_parts": "model",
    "make_training_batch": "model",
    "support_tensors": "model",
    "DiffSegPriorSegmenter": "segmenter",
    "DiffSegSegmenter": "segmenter",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"fsdiff.methods.diffseg.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'fsdiff.methods.diffseg' has no attribute {name!r}")


def build_diffseg_prior(**kwargs: Any) -> Any:
    """The training-free ``diffseg-prior`` segmenter (kwargs: DiffSegConfig fields, config, checkpoint, threshold,
    parts, model; ``prior``/``decoder`` are aliases of prior_model/decoder_model)."""
    from fsdiff.methods.diffseg.segmenter import DiffSegPriorSegmenter

    return DiffSegPriorSegmenter(**kwargs)


def build_diffseg(**kwargs: Any) -> Any:
    """The full ``diffseg`` segmenter; needs ``checkpoint=DIR`` (PAM/SCM from ``fsdiff train diffseg``)."""
    from fsdiff.methods.diffseg.segmenter import DiffSegSegmenter

    return DiffSegSegmenter(**kwargs)


__all__ = ["DiffSegConfig", "build_diffseg", "build_diffseg_prior", *sorted(_LAZY)]
