"""Segmentation methods by name: every method implements the Segmenter protocol (methods/base.py)."""

from __future__ import annotations

from fsdiff.errors import FsdiffError
from fsdiff.methods.base import Segmenter
from fsdiff.registry import Registry

METHODS: Registry[Segmenter] = Registry("method")
"""Registered segmenters: ``prototype`` (training-free baseline), ``diffseg-prior`` (training-free
Kandinsky attention prior), ``diffseg`` (DiffSeg with a trained PAM/SCM checkpoint), ``diffup`` (DiffUp
mask diffusion on backbone-agnostic priors, with a trained checkpoint).

Every factory takes ``benchmark`` ({dataset, fold, convention} or None): a method with shipped weights picks
the checkpoint that never saw that benchmark's test classes, the others ignore it."""


@METHODS.register("prototype")
def _build_prototype(benchmark=None, **kwargs) -> Segmenter:
    del benchmark  # no shipped weights: every benchmark gets the same model
    from fsdiff.methods.prototype import PrototypeSegmenter

    return PrototypeSegmenter(**kwargs)


@METHODS.register("diffup")
def _build_diffup(**kwargs) -> Segmenter:
    from fsdiff.methods.diffup.segmenter import build_diffup

    return build_diffup(**kwargs)


@METHODS.register("diffseg-prior")
def _build_diffseg_prior(benchmark=None, **kwargs) -> Segmenter:
    del benchmark  # no shipped weights: every benchmark gets the same model
    from fsdiff.methods.diffseg import build_diffseg_prior

    return build_diffseg_prior(**kwargs)


@METHODS.register("diffseg")
def _build_diffseg(benchmark=None, **kwargs) -> Segmenter:
    del benchmark  # no shipped weights: every benchmark gets the same model
    from fsdiff.methods.diffseg import build_diffseg

    return build_diffseg(**kwargs)


def build_method(name: str, **kwargs) -> Segmenter:
    """Build the segmenter registered under ``name`` with its keyword arguments."""
    if not isinstance(name, str):
        raise FsdiffError(
            f"method name must be a string, got {type(name).__name__}; choose one of: {', '.join(METHODS.names())}."
        )
    factory = METHODS.get(name)
    try:
        return factory(**kwargs)
    except TypeError as exc:
        if "unexpected keyword" in str(exc) or "got an unexpected" in str(exc):
            raise FsdiffError(f"method {name!r}: {exc}; check the option names.") from None
        raise


__all__ = ["METHODS", "Segmenter", "build_method"]
