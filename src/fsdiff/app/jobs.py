"""The app's model work: one worker, a fixed torch thread count, supports prepared once, queries one by one.

Heavy events run in gradio's queue with ``concurrency_limit=1`` under one ``concurrency_id``
(:data:`QUEUE_ID`), and :data:`PREDICT_LOCK` serialises predictions in the process as well (the scripting API
and the page share the models). Torch threads are set once (:func:`configure_threads`): several jobs each
using every core make a small CPU box many times slower than one job at a time.

Episodes are assembled exactly as :meth:`fsdiff.api.Segmenter.iter_segment` does: ``prepare`` runs the
support step (weak labels -> estimated masks) and augmentation once, then each query goes through
``predict_prepared``. Where the method gives an uncertainty map (DiffUp's ``predict_with_uncertainty``) it
is kept beside the probability.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fsdiff.episode import Episode, Query, Shot

QUEUE_ID = "fsdiff-model"
PREDICT_LOCK = threading.Lock()
_THREADS: list[int] = []


def configure_threads(n: int) -> int:
    """Set torch's thread count once per process (later calls keep the first value); returns the count in force."""
    import torch

    if not _THREADS:
        torch.set_num_threads(max(1, int(n)))
        _THREADS.append(torch.get_num_threads())
    return _THREADS[0]


def estimated_masks(prepared: Episode, k: int) -> list[np.ndarray | None]:
    """For each of the first ``k`` prepared shots, the mask the support step estimated from a weak label, else None.

    A shot's annotation is an estimate when it carries the original annotation as ``source`` and a ``mask``.
    """
    out: list[np.ndarray | None] = []
    for shot in prepared.shots[:k]:
        ann = shot.annotation
        mask = getattr(ann, "mask", None)
        out.append(np.asarray(mask) if hasattr(ann, "source") and mask is not None else None)
    return out + [None] * (k - len(out))


def predict_one(seg, prepared: Episode, query: Query) -> tuple[np.ndarray, np.ndarray | None]:
    """One query's probability map (and uncertainty map where the method gives one)."""
    prob, unc = seg.predict_prepared_with_uncertainty(seg.with_queries(prepared, (query,)))[0]
    return np.asarray(prob, np.float32), None if unc is None else np.asarray(unc, np.float32)


@dataclass
class RunResult:
    """A run's outputs: per-support estimated masks (None where none) and per-query (prob, uncertainty)."""

    estimates: list[np.ndarray | None]
    maps: list[tuple[np.ndarray, np.ndarray | None]]


def run(seg, shots: Sequence[Shot], queries: Sequence[Query], class_name: str,
        progress: Callable[[int, int], None] | None = None) -> RunResult:
    """Prepare the supports once and segment every query in order, reporting ``progress(done, total)``."""
    with PREDICT_LOCK:
        if not queries:
            return RunResult([None] * len(shots), [])
        prepared = seg.prepare(Episode(class_id=0, class_name=class_name or "object", shots=tuple(shots),
                                       queries=(queries[0],)))
        estimates = estimated_masks(prepared, len(shots))
        maps = []
        for i, q in enumerate(queries):
            if progress is not None:
                progress(i, len(queries))
            maps.append(predict_one(seg, prepared, q))
        if progress is not None:
            progress(len(queries), len(queries))
        return RunResult(estimates, maps)
