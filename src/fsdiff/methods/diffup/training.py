"""DiffUp training episodes and the trainable object for :func:`fsdiff.train.train` (DiffUp, arXiv
2407.16182, Fig. 2 (a) "training on base classes with all annotation types"; the recipe is the
fsdiff's reconstruction [R]).

Per episode (all draws from one ``numpy.random.Generator`` per episode, derived from the batch rng the
trainer seeds with (seed, step, process)):

* the layout first (:func:`~fsdiff.synth.sample_episode_layout`): K ~ U{0..max_shots}
  and the shot types; then a base class c ~ U(classes of the source's train split; those with >= 2
  images when K >= 1), a query image ~ U(images of c) and K other images of c as supports (K is
  capped by the images available);
* per-shot types ~ U{mask, box, scribble}; the annotations are synthesised from the GT mask with
  :func:`~fsdiff.synth.synthesize_annotation` (boxes, PASCAL-Scribble-style strokes);
* a text prior with probability ``text_prob`` (always when K = 0) when a CLIP text model is given.
  Without one, K = 0 is redrawn as K ~ U{1..max_shots}: an episode without any evidence would only
  teach the decoder to guess (the segmenter answers such episodes with UAPF's honest p = 0.5 output);
* with probability ``config.train_crop_prob`` (default 0) a zoom-in crop of the query, a side of
  ~U[``train_crop_min``, 1] on whole cells of the coarsest level, every cached map (levels, GT, RGB,
  CLIP) cropped and resized back (bilinear; nearest for the GT) — scale augmentation on cached features;
* a horizontal flip of the query with probability ``flip_prob`` (the query's cached feature maps,
  RGB and GT are flipped together; flipping the *feature maps* instead of re-encoding the flipped image
  is an approximation — a CNN is only approximately flip-equivariant — that saves half the encoding and
  memory; it never mixes channels, so BAFT's cosines stay exact for the flipped maps).

Caching: every training image is encoded **once, up front** (:meth:`DiffUpTrainable.precompute`) at
``input_size`` and its level maps kept in float16 (bfloat16 where a map would overflow float16), with
its RGB at the mask resolution, and for every (image, class) the label at the mask resolution (GT,
{0,1,255} by area vote) and at twice that (the mask annotations are synthesised from; the scribble width
``scribble_width`` is in original-image pixels and scaled accordingly). :meth:`memory_bytes` reports the
footprint (EfficientNet-Lite0 at 384 px: ~0.41 MB of features per image, ~0.05 MB of labels per pair;
measured on coco-mini fold 0 train, 342 images / 807 pairs at 320 px: 96 MB of features, 117 MB in all,
encoded in ~21 s on one CPU thread; at the CPU recipe's 448 px about twice that).

CPU recipe (:func:`cpu_config`, measured on a shared 2-core CPU with one torch thread): input 448, mask
64 (stride 7), priors 56x56 with the pixel-max matmul in bfloat16, UNet base 32 with one ResBlock per
block and **no RGB query input** (``query_channels=0``: the condition is the priors alone, which
generalised better to novel classes than with the RGB encoding, docs/BENCHMARKS.md), batch 8:
~1.4 s/step alone (~0.5 s of it building the batch), so the recipe's 300 steps take ~8 min.

The batch handed to :func:`~fsdiff.methods.diffup.uqdd.training_losses`: ``priors`` (B, K, C, h, w),
``type_ids`` (B, K) long, ``present`` (B, K) bool (padding shots False; K >= 1), ``gt`` (B, 1, H, W)
float {0, 1, 255} at mask size, ``query_rgb`` (B, 3, H, W) in [0, 1] at mask size, ``query_extra``
(B, 1, h, w).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from diffusers import ModelMixin
from tqdm import tqdm

from fsdiff.data.base import FewShotSource
from fsdiff.errors import FsdiffError
from fsdiff.features import Encoder, build_encoder
from fsdiff.methods.diffup.baft import (
    TextPrior,
    load_text_prior,
    query_extra,
    replicate_text,
    config_prior_kwargs,
    pooled_prior,
    shot_prior,
    support_regions,
)
from fsdiff.methods.diffup.config import DiffUpConfig
from fsdiff.methods.diffup.checkpoint import save_diffup
from fsdiff.methods.diffup.segmenter import rgb_at, rgb_tensor
from fsdiff.synth import sample_episode_layout, synthesize_annotation
from fsdiff.methods.diffup.uqdd import build_models, training_losses

_FP16_MAX = 65000.0


def downsample_label(mask: np.ndarray, size: int, keep_class: bool = False) -> np.ndarray:
    """A {0,1,255} label resized to (size, size) by area vote (ignore wins above 1/2, class at >= 1/2).

    ``keep_class``: if the class vanished (an object smaller than half a cell), keep its best cell.
    """
    fg = cv2.resize((mask == 1).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    ig = cv2.resize((mask == 255).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    out = np.zeros((size, size), np.uint8)
    out[fg >= 0.5] = 1
    out[(ig > 0.5) & (fg < 0.5)] = 255
    if keep_class and not (out == 1).any() and fg.max() > 0:
        y, x = np.unravel_index(int(np.argmax(fg)), fg.shape)
        out[y, x] = 1
    return out


def crop_window(levels: Sequence[torch.Tensor], rng: np.random.Generator, min_side: float) -> tuple[float, float, float, float]:
    """A random square-ish zoom-in window (y0, y1, x0, x1) in [0, 1], on whole cells of the coarsest level.

    The side is ~U[min_side, 1] of the query's side, so every level (an integer multiple of the coarsest
    grid) crops whole cells and stays aligned with the others.
    """
    hc = min(int(f.shape[-2]) for f in levels)
    wc = min(int(f.shape[-1]) for f in levels)
    side = float(rng.uniform(min_side, 1.0))
    ch, cw = max(1, int(round(side * hc))), max(1, int(round(side * wc)))
    y0, x0 = int(rng.integers(0, hc - ch + 1)), int(rng.integers(0, wc - cw + 1))
    return y0 / hc, (y0 + ch) / hc, x0 / wc, (x0 + cw) / wc


def _span(lo: float, hi: float, n: int) -> slice:
    a = min(n - 1, int(round(lo * n)))
    return slice(a, max(a + 1, int(round(hi * n))))


def crop_map(x: torch.Tensor, window: tuple[float, float, float, float]) -> torch.Tensor:
    """A (C, H, W) map cropped to ``window`` and resized back to (H, W) bilinearly."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    part = x[:, _span(window[0], window[1], h), _span(window[2], window[3], w)]
    return torch.nn.functional.interpolate(part[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]


def crop_array(a: np.ndarray, window: tuple[float, float, float, float], *, nearest: bool = False) -> np.ndarray:
    """An (H, W) or (C, H, W) array cropped to ``window`` on its last two axes and resized back (linear or nearest)."""
    h, w = a.shape[-2:]
    part = a[..., _span(window[0], window[1], h), _span(window[2], window[3], w)]
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    if a.ndim == 2:
        return cv2.resize(np.ascontiguousarray(part), (w, h), interpolation=interp)
    return np.stack([cv2.resize(np.ascontiguousarray(p), (w, h), interpolation=interp) for p in part])


def _store(t: torch.Tensor) -> torch.Tensor:
    """A CPU float16 copy (bfloat16 if a value would overflow float16)."""
    dt = torch.bfloat16 if t.numel() and float(t.abs().max()) > _FP16_MAX else torch.float16
    return t.detach().to(device="cpu", dtype=dt).contiguous()


class DiffUpTrainable:
    """DiffUp (UAPF + UQDD) as a trainable for :func:`fsdiff.train.train` (see the module docstring)."""

    name = "diffup"

    def __init__(
        self,
        source: FewShotSource,
        config: DiffUpConfig | None = None,
        *,
        encoder: str | Encoder = "efficientnet-lite0",
        text_model: str | TextPrior | None = None,
        seed: int = 0,
        flip_prob: float = 0.5,
        device: str | torch.device = "cpu",
        classes: Sequence[int] | None = None,
        precompute: bool = True,
        progress: bool = True,
        encode_batch: int = 8,
    ) -> None:
        """Build fresh UAPF/UQDD (seeded with ``seed``) and, unless ``precompute=False``, encode every image.

        ``source``: a FewShotSource of the *train* split (its classes are the base classes).
        ``text_model``: None (no text prior), a TextPrior, or a CLIP hub id / directory.
        ``classes``: train on this subset of the source's classes (default: all of them).
        """
        if not isinstance(source, FewShotSource):
            raise FsdiffError(f"DiffUpTrainable needs a FewShotSource, got {type(source).__name__}.")
        self.source = source
        self.config = config if config is not None else DiffUpConfig()
        if not isinstance(self.config, DiffUpConfig):
            raise FsdiffError(f"config must be a DiffUpConfig, got {type(self.config).__name__}.")
        if self.config.query_extra_channels not in (0, 1):
            raise FsdiffError("DiffUpConfig.query_extra_channels must be 0 or 1 (BAFT provides one query-info map).")
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise FsdiffError(f"flip_prob must lie in [0, 1], got {flip_prob!r}.")
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.encoder = build_encoder(encoder, device=self.device) if isinstance(encoder, str) else encoder
        if not isinstance(self.encoder, Encoder):
            raise FsdiffError(f"encoder must be an encoder name or an fsdiff Encoder, got {type(encoder).__name__}.")
        if int(self.encoder.levels) != self.config.prior_levels:
            raise FsdiffError(
                f"encoder {self.encoder.name} gives {self.encoder.levels} levels; DiffUpConfig.prior_levels is "
                f"{self.config.prior_levels}."
            )
        if isinstance(text_model, str):
            text_model = load_text_prior(text_model, device=self.device, required=True)
        self.text = text_model
        self.encode_batch = int(encode_batch)
        self.prior_kwargs = config_prior_kwargs(self.config)
        self.progress = bool(progress)

        with torch.random.fork_rng(devices=[]):  # fresh weights depend on the seed only; global RNG untouched
            torch.manual_seed(self.seed)
            self.uapf, self.uqdd = build_models(self.config)
        self.uapf.to(self.device)
        self.uqdd.to(self.device)

        wanted = source.select_classes(classes)
        self.classes = [cid for cid in wanted if source.images_of_class(cid)]
        if not self.classes:
            raise FsdiffError(f"the {source.name} source has no class with an image; cannot train DiffUp on it.")
        self.pools = {c: list(source.images_of_class(c)) for c in self.classes}
        self.multi_image_classes = [c for c in self.classes if len(set(self.pools[c])) >= 2]
        self.class_names = {cid: name for cid, name in source.classes}
        self.feats: dict[str, list[torch.Tensor]] = {}
        self.rgb: dict[str, np.ndarray] = {}
        self.clip: dict[str, torch.Tensor] = {}
        self.orig_side: dict[str, int] = {}
        self.gt: dict[tuple[str, int], np.ndarray] = {}
        self.ann: dict[tuple[str, int], np.ndarray] = {}
        self.precompute_seconds = 0.0
        if precompute:
            self.precompute()

    # ------------------------------------------------------------------------------------------------
    # caching
    # ------------------------------------------------------------------------------------------------
    @property
    def ann_size(self) -> int:
        """Side of the stored label that annotations are synthesised from (2 x the mask side)."""
        return 2 * self.config.mask_size

    def precompute(self) -> None:
        """Encode every image of every base class once (features fp16, RGB and labels; see the module doc)."""
        start = time.perf_counter()
        keys: dict[str, list[int]] = {}
        for c in self.classes:
            for k in self.pools[c]:
                keys.setdefault(k, []).append(c)
        todo = [k for k in keys if k not in self.feats]
        cfg = self.config
        bar = tqdm(total=len(todo), desc="diffup: encoding train images", unit="img", disable=not self.progress)
        for a in range(0, len(todo), max(1, self.encode_batch)):
            chunk = todo[a:a + self.encode_batch]
            images = []
            for k in chunk:
                image = None
                for c in keys[k]:
                    img_c, mask = self.source.load(k, c)
                    image = img_c if image is None else image
                    self.gt[(k, c)] = downsample_label(mask, cfg.mask_size)
                    self.ann[(k, c)] = downsample_label(mask, self.ann_size, keep_class=True)
                assert image is not None
                images.append(image)
                self.rgb[k] = rgb_at(image, cfg.mask_size)
                self.orig_side[k] = int(max(image.shape[:2]))
                if self.text is not None:
                    self.clip[k] = _store(self.text.dense_features(image))
            x = torch.cat([self.encoder.preprocess(im, cfg.input_size) for im in images])
            levels = self.encoder.extract(x)
            for j, k in enumerate(chunk):
                self.feats[k] = [_store(lv[j]) for lv in levels]
            bar.update(len(chunk))
        bar.close()
        self.precompute_seconds += time.perf_counter() - start

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by the caches: features, clip, rgb, labels and the total."""
        feats = sum(t.numel() * t.element_size() for f in self.feats.values() for t in f)
        clip = sum(t.numel() * t.element_size() for t in self.clip.values())
        rgb = sum(a.nbytes for a in self.rgb.values())
        labels = sum(a.nbytes for a in self.gt.values()) + sum(a.nbytes for a in self.ann.values())
        return {"features": feats, "clip": clip, "rgb": rgb, "labels": labels, "total": feats + clip + rgb + labels,
                "images": len(self.feats), "pairs": len(self.gt)}

    def _ensure(self, keys: Sequence[str]) -> None:
        if any(k not in self.feats for k in keys):
            self.precompute()

    # ------------------------------------------------------------------------------------------------
    # the trainable interface
    # ------------------------------------------------------------------------------------------------
    def modules(self) -> dict[str, ModelMixin]:
        """The trained models by name (each saved to ``DIR/<name>/`` by :meth:`save`)."""
        return {"uapf": self.uapf, "uqdd": self.uqdd}

    def episode(self, rng: np.random.Generator) -> dict[str, Any]:
        """One training episode's tensors (priors (K, C, h, w), type ids, gt, query rgb/extra) from ``rng``."""
        cfg = self.config
        has_text = self.text is not None
        layout = sample_episode_layout(rng, max_shots=cfg.max_shots, shot_types=cfg.train_shot_types,
                                       text_prob=cfg.text_prob if has_text else 0.0)
        k, types, use_text = layout.k, list(layout.shot_types), layout.use_text and has_text
        if k == 0 and not has_text and cfg.max_shots >= 1:
            k = int(rng.integers(1, cfg.max_shots + 1))
            types = [cfg.train_shot_types[int(i)] for i in rng.integers(0, len(cfg.train_shot_types), size=k)]
        eligible = self.multi_image_classes if k > 0 and self.multi_image_classes else self.classes
        c = eligible[int(rng.integers(len(eligible)))]
        pool = self.pools[c]
        query = pool[int(rng.integers(len(pool)))]
        others = [x for x in pool if x != query]
        k = min(k, len(others))
        types = types[:k]
        supports = [others[int(i)] for i in rng.choice(len(others), size=k, replace=False)] if k else []
        flip = bool(rng.random() < self.flip_prob)
        self._ensure([query, *supports])

        dev = self.device
        size = cfg.prior_size
        qf = [f.to(dev, torch.float32) for f in self.feats[query]]
        gt = self.gt[(query, c)]
        rgb = self.rgb[query]
        if flip:
            qf = [f.flip(-1) for f in qf]
            gt, rgb = gt[:, ::-1], rgb[:, :, ::-1]
        window = None
        if cfg.train_crop_prob > 0 and rng.random() < cfg.train_crop_prob:  # no draw at all when off (same episodes)
            window = crop_window(qf, rng, cfg.train_crop_min)
            qf = [crop_map(f, window) for f in qf]
            gt = crop_array(gt, window, nearest=True)
            rgb = crop_array(rgb, window)
        shots, annotations = [], []  # (support features, fg region, bg region); the synthesised annotations
        for s, t in zip(supports, types):
            label = self.ann[(s, c)]
            width = max(1, int(round(cfg.scribble_width * self.ann_size / max(1, self.orig_side[s]))))
            annotation = synthesize_annotation(label, t, rng, scribble_width=width)
            annotations.append(annotation)
            fg, bg = support_regions(annotation, label.shape)
            shots.append(([f.to(dev, torch.float32) for f in self.feats[s]], fg, bg))
        pooled = len(shots) > 1 and cfg.train_pooled_prob > 0 and bool(rng.random() < cfg.train_pooled_prob)
        if pooled:  # one prior over all shots, typed by the finest annotation (as the segmenter's kshot='pooled')
            priors = [pooled_prior(qf, shots, size, **self.prior_kwargs)]
            type_names = [cfg.finest_type(types)]
        else:
            priors = [shot_prior(qf, sf, fg, size, background=bg, **self.prior_kwargs) for sf, fg, bg in shots]
            type_names = list(types)
        if use_text:
            dense = self.clip[query].to(torch.float32)
            if flip:
                dense = dense.flip(-1)
            if window is not None:
                dense = crop_map(dense, window)
            tp = self.text.prior_from_features(dense, self.class_names[c], size).to(dev)  # type: ignore[union-attr]
            priors.append(replicate_text(tp, cfg.prior_channels))
            type_names.append("text")
        return dict(
            priors=priors, types=type_names, gt=torch.from_numpy(np.ascontiguousarray(gt)).float()[None],
            query_rgb=rgb_tensor(rgb), query_extra=query_extra(qf, size), class_id=c, query=query,
            supports=supports, flip=flip, crop=window, pooled=pooled, shot_types=list(types), annotations=annotations,
        )

    def make_batch(self, step: int, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        """A collated batch of ``batch_size`` episodes; every draw comes from ``rng`` (one child per episode)."""
        cfg = self.config
        eps = [self.episode(np.random.default_rng(int(s))) for s in rng.integers(0, 2**63 - 1, size=int(batch_size))]
        b = len(eps)
        kmax = max(1, max(len(e["priors"]) for e in eps))
        c, p = cfg.prior_channels, cfg.prior_size
        priors = torch.zeros(b, kmax, c, p, p)
        type_ids = torch.zeros(b, kmax, dtype=torch.long)
        present = torch.zeros(b, kmax, dtype=torch.bool)
        for i, e in enumerate(eps):
            for j, (pr, t) in enumerate(zip(e["priors"], e["types"])):
                priors[i, j] = pr.cpu()
                type_ids[i, j] = cfg.type_id(t)
                present[i, j] = True
        batch = dict(
            priors=priors, type_ids=type_ids, present=present,
            gt=torch.stack([e["gt"] for e in eps]),
            query_rgb=torch.stack([e["query_rgb"] for e in eps]),
        )
        if cfg.query_extra_channels:
            batch["query_extra"] = torch.stack([e["query_extra"].cpu() for e in eps])
        return batch

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """DiffUp's training loss (``loss`` plus its parts) on a batch from :meth:`make_batch`."""
        out = training_losses(self.uqdd, batch, generator, uapf=self.uapf, config=self.config)
        out.pop("t", None)
        return out

    def checkpoint_config(self) -> dict[str, Any]:
        """The model configuration a resumed run must match (the trainer compares it)."""
        return {**self.config.to_dict(), "encoder": self.encoder.name}

    def provenance(self) -> dict[str, Any]:
        """What the checkpoint records about the training data and setup."""
        return {
            "method": "diffup",
            "source": self.source.describe(),
            "base_classes": list(self.classes),
            "train_images": len(self.feats),
            "text_model": getattr(self.text, "name", None),
            "trainable_seed": self.seed,
            "flip_prob": self.flip_prob,
        }

    def save(self, directory: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
        """Write the DiffUp checkpoint (``fsdiff_checkpoint.json``, ``uapf/``, ``uqdd/``) with provenance + ``meta``."""
        info = {**self.provenance(), **dict(meta or {}), "encoder": self.encoder.name}
        return save_diffup(directory, self.config, self.uapf, self.uqdd, info)


CPU_CONFIG: dict[str, Any] = dict(input_size=448, mask_stride=7, base_channels=32, layers_per_block=1,
                                  query_channels=0, prior_matmul_dtype="bfloat16", uapf_anchor_levels=(1, 2),
                                  inference_input_size=473, prior_gate=0.45, prior_gate_kshot=0.0,
                                  prior_only=("scribble",), ddim_steps=1)
"""DiffUpConfig overrides of the CPU recipe (see the module docstring); everything else keeps its default.

The last five are inference defaults, chosen on validation episodes only (the first 128 Weizmann horses and
coco-mini's base classes of folds 0-1, docs/bench/diffup_vs_prototype.md): encode at the prototype method's
473 px (the priors and the mask follow the input; on the horses the 448 px priors alone cost 1.6 mIoU), the
prior check at 0.45 for mask supports (the largest threshold that lost nothing on any validation set; the
decoder then runs on about 70 % of coco-mini queries and on none of the horses, where every decoder variant
lost 2-8 mIoU to the prior), the prior alone for scribble (and points) supports (the decoder: +1.4 mIoU on
coco-mini base classes, -2.5 on the horses), and 1 DDIM step (3 and 10 steps gained 0.6-0.7 mIoU more on
coco-mini base classes, at 1.6x / 3.6x the sampling time). Box supports always decode (+8.3 on the horses).
Mask episodes with K > 1 shots get the prior (``prior_gate_kshot=0``): on validation the decoder lost 5.4 on
the horses and tied on coco-mini base classes (-0.08 without the check, +0.10 with it, at 3x the time); this
choice was made after the held-out coco-mini 5-shot runs had shown the check's loss there (docs/bench).

Tried and not adopted (docs/BENCHMARKS.md, "DiffUp with self-support priors"): adding the self-support map
as the anchor with pooled K-shot training episodes (``prior_maps=(..., "self")``, ``self_levels=(1, 2)``,
``uapf_anchor_map="self"``, ``train_pooled_prob=0.5``) scored the same at 1-shot and ~2 mIoU lower at 5-shot
on folds 0-1; pooled episodes alone (``train_pooled_prob=0.5``) and zoom-in crops (``train_crop_prob=0.5``)
each moved the paired per-class mIoU by at most 0.1. Pass them with ``--config-arg`` to reproduce."""


def cpu_config(**overrides: Any) -> DiffUpConfig:
    """The CPU-trainable DiffUpConfig (:data:`CPU_CONFIG`), with ``overrides`` applied.

    An ``input_size`` override without an ``inference_input_size`` one also sets the inference size (to the
    training size): 473 px is the recipe's choice for its 448 px training, not a size for every model.
    """
    merged = {**CPU_CONFIG, **overrides}
    if "input_size" in overrides and "inference_input_size" not in overrides:
        merged["inference_input_size"] = None
    return DiffUpConfig(**merged)


def train_diffup(
    source: FewShotSource,
    out_dir: str | os.PathLike,
    *,
    config: DiffUpConfig | None = None,
    encoder: str | Encoder = "efficientnet-lite0",
    text_model: str | TextPrior | None = None,
    classes: Sequence[int] | None = None,
    seed: int = 0,
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 3e-4,
    warmup: int = 30,
    save_every: int = 250,
    progress: bool = True,
    **train_kwargs: Any,
):
    """Build a :class:`DiffUpTrainable` (default: :func:`cpu_config`) and run :func:`fsdiff.train.train`.

    Defaults are the CPU recipe (300 steps, batch 8, AdamW lr 3e-4 with 30 warm-up steps and cosine
    decay, weight decay 1e-2; longer training over-fits coco-mini's base classes, docs/BENCHMARKS.md); the weights end up in ``out_dir/final`` (load with ``DiffUpSegmenter``).
    """
    from fsdiff.train import train

    trainable = DiffUpTrainable(source, config if config is not None else cpu_config(), encoder=encoder,
                                text_model=text_model, classes=classes, seed=seed, progress=progress)
    return train(trainable, out_dir, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed,
                 save_every=save_every, progress=progress, **train_kwargs)
