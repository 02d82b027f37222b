"""DifFSS support-set augmentation of an episode, and a wrapper that adds it to any segmenter
(DifFSS, arXiv 2307.00773: N generated images per support turn a 1-shot task into an (N+1)-shot one;
the loading rules below are [C], from DifFSS-BAM's ``util/dataset.py``).

:class:`Augmenter` turns an episode into one whose support set holds, besides the real shots, N generated
auxiliary images per augmented real shot. Each auxiliary image is the generator's output resized back to the
real support's (W, H) and carries the real support's annotation unchanged (the mask, binarised for the class
with 255 kept, as DifFSS-BAM does; a box or scribble support reuses its box or strokes).

* ``per_shot='first'`` (default) follows the official loader: only the first real support is augmented,
  whatever K is (the paper does not say what to do for K > 1); ``'all'`` gives every real shot its own N
  auxiliaries.
* Shot order: the real shots first, in their order, then the auxiliaries grouped by real shot and index
  (DifFSS-BAM stacks ``true_data_shot`` real supports, then the ``aux_shot`` generated ones).
* An optional :class:`~fsdiff.augment.drift.DriftFilter` ([R], beyond the paper) scores each auxiliary image,
  regenerates the poor ones with new seeds and drops those still under its threshold. With
  ``fill_dropped='real'`` a dropped image is replaced by a copy of its real support, as DifFSS-BAM does for a
  missing auxiliary file, so the shot count stays 1 + N per augmented shot.
* Text-only supports cannot be augmented (no spatial control): an episode whose augmented shots include one
  raises an FsdiffError; an episode with no shots is returned unchanged.

:class:`AugmentedSegmenter` wraps any :class:`~fsdiff.protocol.Segmenter`; its name is
``'<method>+<condition>:<n>'`` (e.g. ``prototype+hed:4``) and its threshold is the wrapped one's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fsdiff.augment.generate import GeneratedImage, Generator, resolve_spec
from fsdiff.episode import Episode, Shot
from fsdiff.errors import FsdiffError

if TYPE_CHECKING:  # pragma: no cover
    from fsdiff.augment.drift import DriftFilter, DriftReport
    from fsdiff.protocol import Segmenter

PER_SHOT = ("first", "all")
FILL = ("none", "real")


def generated_image_id(real_id: str, k: int, condition: str, item: GeneratedImage) -> str:
    """Image id of an auxiliary shot: ``<real id>#<condition>:<index>`` plus the retry attempt if any."""
    base = real_id or f"support{k}"
    suffix = f"#{condition}:{item.index}"
    return base + (suffix if item.attempt == 0 else f"{suffix}.r{item.attempt}")


class Augmenter:
    """Adds N generated auxiliary supports per (first or every) real support of an episode."""

    def __init__(
        self,
        generator: Generator,
        condition: str | None = None,
        n: int | None = None,
        per_shot: str = "first",
        drift_filter: DriftFilter | None = None,
        fill_dropped: str = "none",
    ) -> None:
        """``condition`` may be a spec such as ``'hed:4'`` (then ``n`` defaults to its count); it must match
        the generator's condition, since a ControlNet is trained for one kind of control map."""
        gen_cond = getattr(generator, "condition", None)
        if not callable(getattr(generator, "generate", None)) or gen_cond is None:
            raise FsdiffError(
                f"generator must have a .condition and a .generate(image, annotation, class_name, n) method "
                f"(e.g. fsdiff.augment.generate.ControlNetGenerator), got {type(generator).__name__}."
            )
        kind, n = resolve_spec(gen_cond, condition, n, minimum=0)
        if per_shot not in PER_SHOT:
            raise FsdiffError(
                f"per_shot must be 'first' (DifFSS: only the first real support is augmented) or 'all', "
                f"got {per_shot!r}."
            )
        if fill_dropped not in FILL:
            raise FsdiffError(f"fill_dropped must be 'none' or 'real', got {fill_dropped!r}.")
        self.generator = generator
        self.condition = kind
        self.n = n
        self.per_shot = per_shot
        self.drift_filter = drift_filter
        self.fill_dropped = fill_dropped
        self.last_report: DriftReport | None = None
        """The drift report of the last :meth:`augment` call (None without a drift filter)."""

    @property
    def spec(self) -> str:
        """The condition spec, e.g. ``'hed:4'``."""
        return f"{self.condition}:{self.n}"

    def __repr__(self) -> str:
        return f"Augmenter({self.spec!r}, per_shot={self.per_shot!r}, drift_filter={self.drift_filter!r})"

    def _targets(self, episode: Episode) -> list[int]:
        if not episode.shots or self.n == 0:
            return []
        return [0] if self.per_shot == "first" else list(range(episode.k))

    def auxiliaries(self, shot: Shot, class_name: str) -> tuple[list[GeneratedImage], DriftReport | None]:
        """The generated images kept for one real shot, and the drift filter's report for them."""
        items = self.generator.generate(shot.image, shot.annotation, class_name, self.n)
        if self.drift_filter is None:
            return list(items), None
        return self.drift_filter.filter(self.generator, shot.image, shot.annotation, class_name, items,
                                        support_id=shot.image_id)

    def augment(self, episode: Episode) -> Episode:
        """A new episode: the real shots, then the auxiliaries of the augmented shots (queries unchanged)."""
        if not isinstance(episode, Episode):
            raise FsdiffError(f"augment expects an fsdiff Episode, got {type(episode).__name__}.")
        targets = self._targets(episode)
        for k in targets:
            kind = episode.shots[k].annotation.kind
            if kind == "text":
                raise FsdiffError(
                    f"episode {episode.episode_id or '(unnamed)'}: support {k} has only a text annotation; DifFSS "
                    "augmentation needs a mask, box, scribble or points support to build its control map."
                )
        aux: list[Shot] = []
        generated: list[dict[str, Any]] = []
        report: DriftReport | None = None
        for k in targets:
            real = episode.shots[k]
            items, rep = self.auxiliaries(real, episode.class_name)
            if rep is not None:
                report = rep if report is None else report.merged(rep)
            for item in items:
                sid = generated_image_id(real.image_id, k, self.condition, item)
                aux.append(Shot(item.image, real.annotation, image_id=sid))
                generated.append({"shot": k, "image_id": sid, "index": item.index, "attempt": item.attempt,
                                  "seed": item.seed, "key": item.key, "cached": item.cached})
            if self.fill_dropped == "real":
                for j in range(len(items), self.n):
                    sid = f"{real.image_id or f'support{k}'}#real-copy:{j}"
                    aux.append(Shot(real.image, real.annotation, image_id=sid))
                    generated.append({"shot": k, "image_id": sid, "index": None, "attempt": None, "seed": None,
                                      "key": None, "cached": None})
        self.last_report = report
        meta = dict(episode.meta)
        meta["augment"] = {
            "condition": self.condition, "n": self.n, "per_shot": self.per_shot, "real_shots": episode.k,
            "augmented_shots": targets, "generated": generated, "fill_dropped": self.fill_dropped,
            "drift": report.as_dict() if report is not None else None,
        }
        return Episode(
            class_id=episode.class_id, class_name=episode.class_name, shots=tuple(episode.shots) + tuple(aux),
            queries=episode.queries, episode_id=episode.episode_id, meta=meta,
        )

    __call__ = augment


class AugmentedSegmenter:
    """Any Segmenter, fed DifFSS-augmented support sets (same protocol: ``predict(episode)``)."""

    def __init__(self, segmenter: Segmenter, augmenter: Augmenter) -> None:
        if not callable(getattr(segmenter, "predict", None)):
            raise FsdiffError(f"segmenter must implement predict(episode), got {type(segmenter).__name__}.")
        if not isinstance(augmenter, Augmenter):
            raise FsdiffError(f"augmenter must be an fsdiff Augmenter, got {type(augmenter).__name__}.")
        self.segmenter = segmenter
        self.augmenter = augmenter
        self.name = f"{getattr(segmenter, 'name', type(segmenter).__name__)}+{augmenter.spec}"

    @property
    def threshold(self) -> float:
        """The wrapped segmenter's threshold."""
        return float(self.segmenter.threshold)

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.segmenter.threshold = value

    @property
    def encoder_name(self) -> str | None:
        """The wrapped segmenter's encoder."""
        return getattr(self.segmenter, "encoder_name", None)

    def predict(self, episode: Episode) -> list[np.ndarray]:
        """The wrapped segmenter's probabilities on the augmented episode."""
        return self.segmenter.predict(self.augmenter.augment(episode))

    def __repr__(self) -> str:
        return f"AugmentedSegmenter({self.name!r})"


__all__ = ["AugmentedSegmenter", "Augmenter", "generated_image_id"]
