"""The segmenter protocol every method implements: an Episode in, one probability map per query out.

It lives outside :mod:`fsdiff.methods` so that the evaluation loop, the augmenter and the front ends depend on
the interface only, never on the methods package.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from fsdiff.episode import Episode


@runtime_checkable
class Segmenter(Protocol):
    """Anything with ``predict(episode) -> [prob map per query]``.

    Each map is float32 (H, W) in [0, 1] at the query image's own resolution; the binary mask is
    ``prob > threshold`` (``threshold`` attribute, 0.5 unless a method chose another on validation).
    ``encoder_name`` names the frozen image encoder the method computes its features with (None if none).
    """

    name: str
    threshold: float
    encoder_name: str | None

    def predict(self, episode: Episode) -> list[np.ndarray]:
        """Probability of the episode's class for every pixel of every query."""
        ...
