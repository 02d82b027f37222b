"""The inference pipeline every front end runs (docs/ARCHITECTURE.md): support preparation, the method, refinement.

    episode -> support step (e.g. weak labels -> estimated masks) -> DifFSS augmenter -> method.predict
            -> refiner (e.g. edge snapping) -> one probability map per query

Each stage is optional; :class:`Pipeline` itself satisfies :class:`fsdiff.protocol.Segmenter`, so the
evaluation loop scores it like any method. :meth:`Pipeline.prepare` runs the support stages once, so a
front end can then stream queries through :meth:`Pipeline.predict_prepared` one at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from fsdiff.episode import Episode, Query
from fsdiff.errors import FsdiffError
from fsdiff.protocol import Segmenter

SupportStep = Callable[[Episode], Episode]
"""Turns an episode's supports into the ones the method sees (queries unchanged)."""
Refiner = Callable[[Episode, list[np.ndarray]], list[np.ndarray]]
"""Refines the method's probability maps of an episode's queries (same shapes, values in [0, 1])."""


class Pipeline:
    """A method with optional support preparation and output refinement (see the module docstring)."""

    def __init__(self, method: Segmenter, *, support_step: SupportStep | None = None, augmenter=None,
                 refiner: Refiner | None = None) -> None:
        if not callable(getattr(method, "predict", None)):
            raise FsdiffError(f"method must implement predict(episode), got {type(method).__name__}.")
        self.method = method
        self.support_step = support_step
        self.augmenter = augmenter
        self.refiner = refiner

    @property
    def name(self) -> str:
        """The method's name, with the augmentation spec when supports are generated (``prototype+hed:4``)."""
        base = str(getattr(self.method, "name", type(self.method).__name__))
        return base if self.augmenter is None else f"{base}+{self.augmenter.spec}"

    @property
    def threshold(self) -> float:
        """The method's decision threshold."""
        return float(self.method.threshold)

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.method.threshold = value

    @property
    def encoder_name(self) -> str | None:
        """The method's frozen encoder."""
        return getattr(self.method, "encoder_name", None)

    def prepare(self, episode: Episode) -> Episode:
        """The episode with its supports as the method will see them (support step, then augmentation)."""
        if not isinstance(episode, Episode):
            raise FsdiffError(f"predict expects an fsdiff Episode, got {type(episode).__name__}.")
        if self.support_step is not None:
            episode = self.support_step(episode)
        if self.augmenter is not None:
            episode = self.augmenter.augment(episode)
        return episode

    def predict_prepared(self, episode: Episode) -> list[np.ndarray]:
        """The method's (refined) maps for an episode whose supports :meth:`prepare` already made."""
        probs = self.method.predict(episode)
        return probs if self.refiner is None else self.refiner(episode, probs)

    def predict_prepared_with_uncertainty(self, episode: Episode) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(refined probability, uncertainty or None) per query; the uncertainty comes from methods that give one
        (``predict_with_uncertainty``, e.g. DiffUp), unrefined."""
        with_unc = getattr(self.method, "predict_with_uncertainty", None)
        if with_unc is None:
            return [(p, None) for p in self.predict_prepared(episode)]
        outs = with_unc(episode)
        probs = [o.prob for o in outs]
        probs = probs if self.refiner is None else self.refiner(episode, probs)
        return [(p, o.uncertainty) for p, o in zip(probs, outs)]

    def predict(self, episode: Episode) -> list[np.ndarray]:
        """Probability of the episode's class for every pixel of every query."""
        return self.predict_prepared(self.prepare(episode))

    def with_queries(self, prepared: Episode, queries: tuple[Query, ...]) -> Episode:
        """``prepared`` (from :meth:`prepare`) with other queries, its supports kept."""
        return dataclasses.replace(prepared, queries=tuple(queries))

    def __getattr__(self, name: str):
        """Attributes the pipeline lacks come from the method (``seg.config``, ``seg.checkpoint``, ...)."""
        if name == "method" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.method, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
