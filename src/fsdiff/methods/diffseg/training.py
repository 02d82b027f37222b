"""DiffSeg training episodes and the trainable object for :func:`fsdiff.train.train` (DiffSeg, Shi et al., ACM MM
2024, §5.2 "Implementation details", Eq. (10)).

What is trained: the PAM and the SCM only (the Kandinsky UNet, MoVQ and CLIP image encoder stay frozen;
gradients reach the SCM *through* the frozen UNet). Loss: Eq. (10), ``α·MSE(M_a, Y_q) + β·MSE(L_pre,
MoVQ.enc(Y_q))`` with α = 2, β = 1 (:meth:`~fsdiff.methods.diffseg.model.DiffSegModel.loss`).

Recipe (paper [P], reconstruction [R]; :func:`train_diffseg`): SGD with momentum 0.9 [R], lr 0.01 [P], weight
decay 1e-4 [R] (on weights with >= 2 dims, the trainer's convention), StepLR x0.9 every 20 epochs [P], 200
epochs [P], batch 4 per GPU [R], no gradient clipping (none is described). An "epoch" is expressed in optimizer
steps as ``ceil(#(image, class) pairs of the trained classes / (batch_size x processes))`` (the pass over the
query list that PFENet / BAM / HSNet-style few-shot training calls an epoch), so with 4 GPUs x batch 4 on
COCO-20i fold 0 the StepLR step is ``20 x that`` optimizer steps.

Episodes (every draw from one ``numpy.random.Generator`` per row, a child of the rng the trainer derives from
``(seed, step, process)``): a class c ~ U(train-split classes with >= ``shots`` + 1 images), a query image
~ U(images of c) and ``shots`` other images of c as supports (without replacement). No augmentation (none is
described). :meth:`DiffSegTrainable.episode` returns the episode as an :class:`~fsdiff.episode.Episode`;
:meth:`DiffSegTrainable.make_batch` builds exactly what
:func:`~fsdiff.methods.diffseg.model.make_training_batch` makes of those episodes (the same resizing
functions), from a cache of the resized tensors, plus ``query_edges`` when the SCM is on.

Caching (bounded, least-recently-used, ``cache_mb``): per image the RGB resized to ``input_size`` (uint8) and
its HED edge map (float16, computed one image at a time so that a value never depends on which other images
were missing from the cache: a resumed run sees bit-identical batches); per (image, class) the foreground and
valid masks at ``input_size`` (bool). At 512 px that is 0.75 MB + 0.5 MB per image and 0.5 MB per pair.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsdiff.data.base import FewShotSource
from fsdiff.distributed import num_processes as world_processes
from fsdiff.distributed import process_device
from fsdiff.episode import Episode, MaskAnnotation, Query, Shot
from fsdiff.errors import FsdiffError
from fsdiff.io import IGNORE
from fsdiff.methods.diffseg.config import DiffSegConfig



class _LRU:
    """A byte-bounded least-recently-used cache of tensors (or tuples of tensors)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(value: Any) -> int:
        items = value if isinstance(value, tuple) else (value,)
        return sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))

    def get(self, key: Any) -> Any:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Any, value: Any) -> None:
        size = self._size(value)
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]
        if size > self.max_bytes:
            return
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes and self._items:
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old

    def __len__(self) -> int:
        return len(self._items)


class DiffSegTrainable:
    """DiffSeg (PAM + SCM on frozen Kandinsky 2.2) as a trainable for :func:`fsdiff.train.train`.

    ``source``: a FewShotSource of the *train* split (its classes are the base classes).
    ``config``: a :class:`DiffSegConfig` (default: the paper's). ``parts``: loaded Kandinsky parts
    (:class:`~fsdiff.diffusion.loading.KandinskyParts`); None loads ``config.prior_model`` /
    ``config.decoder_model`` on ``config.device`` (None = this process's accelerate device, so every process of
    ``accelerate launch`` uses its own GPU). ``shots``: supports per episode (k; averaged as in DiffSeg §4.1).
    ``seed``: PAM/SCM initialisation seed (None keeps ``config.seed``). ``classes``: train on this subset of the
    source's classes. ``edge_detector``: callable (B, 3, S, S) RGB on 0..255 -> (B, 1, S, S) edge probabilities
    (default: the HED of ``config.hed_weights``). ``cache_mb``: budget of the resized-image / mask / edge cache.
    """

    name = "diffseg"

    def __init__(
        self,
        source: FewShotSource,
        config: DiffSegConfig | None = None,
        *,
        parts: Any = None,
        shots: int = 1,
        seed: int | None = None,
        classes: Sequence[int] | None = None,
        edge_detector: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache_mb: float = 4096,
    ) -> None:
        from fsdiff.methods.diffseg.model import DiffSegModel, load_parts

        if not isinstance(source, FewShotSource):
            raise FsdiffError(f"DiffSegTrainable needs a FewShotSource, got {type(source).__name__}.")
        config = config if config is not None else DiffSegConfig()
        if not isinstance(config, DiffSegConfig):
            raise FsdiffError(f"config must be a DiffSegConfig, got {type(config).__name__}.")
        if seed is not None:
            config = config.updated(seed=int(seed))
        if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or int(shots) < 1:
            raise FsdiffError(f"DiffSeg training: shots must be an integer >= 1, got {shots!r}.")
        if not float(cache_mb) >= 0:
            raise FsdiffError(f"DiffSeg training: cache_mb must be >= 0, got {cache_mb!r}.")
        self.source = source
        self.shots = int(shots)
        if parts is None:
            if config.device is None:
                config = config.updated(device=str(process_device()))
            parts = load_parts(config)
        self.model = DiffSegModel(parts, config, edge_detector=edge_detector)
        self.config = self.model.config
        self.size = int(self.config.input_size)

        wanted = source.select_classes(classes)
        self.pools = {c: list(dict.fromkeys(source.images_of_class(c))) for c in wanted}
        self.classes = [c for c in wanted if len(self.pools[c]) >= self.shots + 1]
        if not self.classes:
            raise FsdiffError(
                f"the {source.name} source has no class with at least {self.shots + 1} images (a query and "
                f"{self.shots} support(s)); cannot train DiffSeg {self.shots}-shot on it."
            )
        self.cache = _LRU(int(float(cache_mb) * 2**20))

    # ------------------------------------------------------------------------------------------------
    # episodes
    # ------------------------------------------------------------------------------------------------
    def draw(self, rng: np.random.Generator) -> tuple[int, str, list[str]]:
        """(class, query image, support images) of one episode, every choice from ``rng``."""
        c = self.classes[int(rng.integers(len(self.classes)))]
        pool = self.pools[c]
        query = pool[int(rng.integers(len(pool)))]
        others = [k for k in pool if k != query]
        supports = [others[int(i)] for i in rng.choice(len(others), size=self.shots, replace=False)]
        return c, query, supports

    def episode(self, rng: np.random.Generator) -> Episode:
        """One training episode (original-resolution images) from ``rng`` (what :meth:`make_batch` encodes)."""
        c, query, supports = self.draw(rng)
        shots = []
        for s in supports:
            image, mask = self.source.load(s, c)
            shots.append(Shot(image, MaskAnnotation(mask), s))
        image, gt = self.source.load(query, c)
        return Episode(class_id=c, class_name=self.source.class_name(c), shots=tuple(shots),
                       queries=(Query(image, gt, query),), episode_id=f"{query}:{c}")

    def _pair(self, key: str, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(RGB (3, S, S) float in [0, 1], foreground (1, S, S), valid (1, S, S)) of an (image, class) pair."""
        from fsdiff.methods.diffseg.model import image_to_tensor, mask_to_tensor

        rgb = self.cache.get(("rgb", key))
        masks = self.cache.get(("mask", key, c))
        if rgb is None or masks is None:
            image, mask = self.source.load(key, c)
            if rgb is None:
                rgb = (image_to_tensor(image, self.size) * 255.0).round().to(torch.uint8)
                self.cache.put(("rgb", key), rgb)
            if masks is None:
                masks = (mask_to_tensor(mask == 1, self.size) > 0.5, mask_to_tensor(mask != IGNORE, self.size) > 0.5)
                self.cache.put(("mask", key, c), masks)
        return rgb.float() / 255.0, masks[0].float(), masks[1].float()

    def _edges(self, key: str, rgb: torch.Tensor) -> torch.Tensor:
        """HED edges (1, S, S) of the resized image ``rgb`` (3, S, S) in [0, 1], cached per image."""
        edges = self.cache.get(("edges", key))
        if edges is None:
            edges = self.model.detect_edges(rgb[None])[0].detach().to("cpu", torch.float16)
            self.cache.put(("edges", key), edges)
        return edges.float()

    def make_batch(self, step: int, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        """``batch_size`` episodes (one query each) as a DiffSeg training batch (see ``BATCH_KEYS``)."""
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("query_image", "support_images", "support_masks",
                                                               "query_mask", "query_valid", "query_edges")}
        for seed in rng.integers(0, 2**63 - 1, size=int(batch_size)):
            c, query, supports = self.draw(np.random.default_rng(int(seed)))
            s_img, s_mask = [], []
            for s in supports:
                img, fg, _ = self._pair(s, c)
                s_img.append(img)
                s_mask.append(fg)
            q_img, q_fg, q_valid = self._pair(query, c)
            rows["query_image"].append(q_img)
            rows["support_images"].append(torch.stack(s_img))
            rows["support_masks"].append(torch.stack(s_mask))
            rows["query_mask"].append(q_fg)
            rows["query_valid"].append(q_valid)
            if self.model.scm is not None:
                rows["query_edges"].append(self._edges(query, q_img))
        return {k: torch.stack(v) for k, v in rows.items() if v}

    # ------------------------------------------------------------------------------------------------
    # the trainable interface
    # ------------------------------------------------------------------------------------------------
    def modules(self) -> dict[str, Any]:
        """The trained models by name (``pam`` and, with ``use_scm``, ``scm``; saved to ``DIR/<name>/``)."""
        mods: dict[str, Any] = {"pam": self.model.pam}
        if self.model.scm is not None:
            mods["scm"] = self.model.scm
        return mods

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Eq. (10) (``loss``, ``loss_prior``, ``loss_latent``); DiffSeg draws nothing at random (fixed noise)."""
        return self.model.loss(batch)

    def checkpoint_config(self) -> dict[str, Any]:
        """The model configuration a resumed run must match (the trainer compares it)."""
        return self.model.config.checkpoint_dict()

    def provenance(self) -> dict[str, Any]:
        """What the checkpoint records about the training data and setup."""
        parts = self.model.parts
        return {
            "method": "diffseg",
            "source": self.source.describe(),
            "base_classes": list(self.classes),
            "shots": self.shots,
            "prior_source": str(getattr(parts, "prior_source", "")),
            "decoder_source": str(getattr(parts, "decoder_source", "")),
            "frozen_dtype": str(self.model.dtype).replace("torch.", ""),
        }

    def save(self, directory: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
        """Write the checkpoint (``pam/``, ``scm/``, config and provenance + ``meta``, fsdiff.checkpoint layout);
        load it with ``DiffSegSegmenter(checkpoint=directory)``."""
        return self.model.save_trainable(directory, {**self.provenance(), **dict(meta or {})})

    def memory_bytes(self) -> dict[str, int]:
        """Bytes and entries held by the resized-image / mask / edge cache."""
        return {"total": self.cache.bytes, "entries": len(self.cache), "hits": self.cache.hits,
                "misses": self.cache.misses}


def steps_per_epoch(source: FewShotSource, batch_size: int, num_processes: int | None = None,
                    classes: Sequence[int] | None = None) -> int:
    """Optimizer steps of one epoch: ceil(#(image, class) pairs of ``source`` / (batch_size x processes)).

    ``classes``: count only the pairs of these classes (the ones a class-subset run trains on).
    """
    items = source.query_items()
    if classes is not None:
        keep = {int(c) for c in classes}
        items = [item for item in items if int(item[1]) in keep]
    n = len(items)
    procs = world_processes() if num_processes is None else int(num_processes)
    return max(1, math.ceil(n / (int(batch_size) * max(1, procs))))


def train_diffseg(
    source: FewShotSource,
    out_dir: str | os.PathLike,
    *,
    config: DiffSegConfig | None = None,
    parts: Any = None,
    shots: int = 1,
    classes: Sequence[int] | None = None,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    optimizer: str = "sgd",
    momentum: float | None = None,
    weight_decay: float | None = None,
    schedule: str = "step",
    step_size: int | None = None,
    gamma: float | None = None,
    warmup: int = 0,
    max_grad_norm: float | None = None,
    save_every: int = 500,
    edge_detector: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cache_mb: float = 4096,
    progress: bool = True,
    **train_kwargs: Any,
):
    """Build a :class:`DiffSegTrainable` and run :func:`fsdiff.train.train` with DiffSeg's recipe.

    Every ``None`` takes the config's value (the module docstring's recipe): ``batch_size`` = ``config.batch_size``
    (4), ``lr`` = 0.01, ``momentum`` = 0.9, ``weight_decay`` = 1e-4, ``gamma`` = ``config.lr_gamma`` (0.9),
    ``step_size`` = ``config.lr_step_epochs`` (20) epochs and ``steps`` = ``config.epochs`` (200) epochs, an epoch
    being :func:`steps_per_epoch` optimizer steps. ``seed`` seeds both the PAM/SCM initialisation and the
    trainer (episodes). ``train_kwargs`` go to :func:`fsdiff.train.train` (``resume``, ``num_threads``,
    ``mixed_precision``, ``keep_last``, ``log_every``, ...). The weights end up in ``out_dir/final`` (load with
    ``DiffSegSegmenter(checkpoint=out_dir/'final')``); a re-run with the same arguments resumes from the last
    ``checkpoint-STEP``.
    """
    from fsdiff.train import train

    cfg = config if config is not None else DiffSegConfig()
    trainable = DiffSegTrainable(source, cfg, parts=parts, shots=shots, seed=seed, classes=classes,
                                 edge_detector=edge_detector, cache_mb=cache_mb)
    cfg = trainable.config
    batch_size = int(cfg.batch_size if batch_size is None else batch_size)
    epoch = steps_per_epoch(source, batch_size, classes=trainable.classes)
    if steps is None:
        steps = int(cfg.epochs) * epoch
    if step_size is None and schedule == "step":
        step_size = int(cfg.lr_step_epochs) * epoch
    return train(
        trainable, out_dir, steps=steps, batch_size=batch_size, lr=float(cfg.lr if lr is None else lr),
        weight_decay=float(cfg.weight_decay if weight_decay is None else weight_decay), schedule=schedule,
        warmup=warmup, seed=seed, save_every=save_every, progress=progress, max_grad_norm=max_grad_norm,
        optimizer=optimizer, momentum=float(cfg.momentum if momentum is None else momentum), step_size=step_size,
        gamma=float(cfg.lr_gamma if gamma is None else gamma), **train_kwargs,
    )


__all__ = ["DiffSegTrainable", "steps_per_epoch", "train_diffseg"]
