"""The picture half of an evaluation report (``fsdiff eval --visualize N``): a per-class IoU bar chart and a
sheet of the N best and N worst episodes (supports with their annotation, query, prediction, ground truth).

:class:`EpisodeGallery` is the evaluation loop's per-episode callback; it renders only episodes that enter
its best or worst N, so its memory does not grow with the number of episodes. Galleries of several
processes merge into the one a single process would keep (ties broken by episode id).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fsdiff.episode import Episode
from fsdiff.io import write_image
from fsdiff.render import OBJECT, PREDICTION, bar_chart, caption, draw_annotation, fit, hstack, outline, vstack

CLASS_CHART = "per_class_iou.png"
EPISODE_SHEET = "episodes_best_worst.png"
MAX_SUPPORTS_SHOWN = 5


def episode_row(episode: Episode, probs: Sequence[np.ndarray], iou: float, threshold: float,
                height: int = 140) -> np.ndarray:
    """One episode as a strip: supports with annotations, then the first query with prediction and ground truth."""
    panels = [caption(fit(draw_annotation(s.image, s.annotation), height), f"support ({s.annotation.kind})")
              for s in episode.shots[:MAX_SUPPORTS_SHOWN]]
    q = episode.queries[0]
    pred = outline(q.image, probs[0] > threshold, PREDICTION, fill=0.35)
    panels.append(caption(fit(q.image, height), "query"))
    panels.append(caption(fit(pred, height), f"prediction IoU {iou:.1f}"))
    if q.gt is not None:
        panels.append(caption(fit(outline(q.image, q.gt == 1, OBJECT, fill=0.35), height), "ground truth"))
    title = f"{episode.episode_id or 'episode'} - class {episode.class_name} - {episode.k} shot(s)"
    return caption(hstack(panels), title, height=24)


class EpisodeGallery:
    """Keeps the ``n`` best and ``n`` worst episodes (mean query IoU) as rendered rows."""

    def __init__(self, n: int, threshold: float, height: int = 140) -> None:
        self.n, self.threshold, self.height = int(n), float(threshold), int(height)
        self._best: list[tuple[float, str, np.ndarray]] = []  # min-heap on (iou, id): the n largest
        self._worst: list[tuple[float, str, np.ndarray]] = []  # min-heap on (-iou, id): the n smallest

    def __call__(self, episode: Episode, probs: list[np.ndarray], ious: list[float]) -> None:
        if self.n <= 0 or not ious:
            return
        iou, key = float(np.mean(ious)), episode.episode_id
        row = None
        for heap, score in ((self._best, iou), (self._worst, -iou)):
            if len(heap) < self.n or (score, key) > heap[0][:2]:
                row = row if row is not None else episode_row(episode, probs, iou, self.threshold, self.height)
                self._push(heap, (score, key, row))

    def _push(self, heap: list, item: tuple) -> None:
        if len(heap) < self.n:
            heapq.heappush(heap, item)
        elif item[:2] > heap[0][:2]:
            heapq.heapreplace(heap, item)

    def merge(self, other: "EpisodeGallery") -> "EpisodeGallery":
        """Add another process's kept episodes."""
        for item in other._best:
            self._push(self._best, item)
        for item in other._worst:
            self._push(self._worst, item)
        return self

    def best(self) -> list[tuple[float, str, np.ndarray]]:
        """(IoU, episode id, row), best first."""
        return [(s, k, r) for s, k, r in sorted(self._best, key=lambda t: (-t[0], t[1]))]

    def worst(self) -> list[tuple[float, str, np.ndarray]]:
        """(IoU, episode id, row), worst first."""
        return [(-s, k, r) for s, k, r in sorted(self._worst, key=lambda t: (-t[0], t[1]))]


def class_chart(summary: Mapping) -> np.ndarray:
    """Per-class IoU bars, worst class first, titled with the mIoU."""
    rows = sorted(summary["per_class"], key=lambda r: (r["iou"], str(r["class_name"])))
    return bar_chart([str(r["class_name"]) for r in rows], [float(r["iou"]) for r in rows],
                     f"per-class IoU (%), mIoU {float(summary['miou']):.1f}")


def write_visual_report(out_dir: str | os.PathLike, summary: Mapping, gallery: EpisodeGallery) -> list[Path]:
    """Write the class chart and the best/worst sheet into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    written = [out / CLASS_CHART]
    write_image(written[0], class_chart(summary))
    best, worst = gallery.best(), gallery.worst()
    if best:
        blank = np.full((4, max(r.shape[1] for _, _, r in best + worst), 3), 255, np.uint8)
        sheet = vstack([caption(blank, f"{len(best)} best episodes (mean query IoU %)"), *[r for _, _, r in best],
                        caption(blank, f"{len(worst)} worst episodes"), *[r for _, _, r in worst]])
        written.append(out / EPISODE_SHEET)
        write_image(written[1], sheet)
    return written
