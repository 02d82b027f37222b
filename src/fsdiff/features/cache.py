"""Feature cache: each image is encoded once per run and its multi-level features reused across episodes
(an image is typically a query in one episode and a support in others).

Key: (encoder cache id = name + weight dtype + compute precision, network input size (H, W),
blake2b-128 digest of the image's shape and bytes). Values are the encoder's level maps for that image,
stored in **float16** by default (half the memory of float32; features of the frozen encoders here are
bounded far below float16's 65504 limit — EfficientNet-Lite's ReLU6/BN outputs are O(10); an entry whose
magnitude would overflow float16 is stored in bfloat16 instead) and returned as float32. Relative
rounding error of float16 storage is <= 2^-11 ~ 5e-4, far below what a cosine similarity notices.

Memory is bounded by a byte budget (default 2 GiB); the least recently used entries are evicted first.
At 473x473 input EfficientNet-Lite0's three levels (40x60x60, 112x30x30, 320x15x15) take ~0.63 MB per image
in float16, so the default budget holds ~3,400 images.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from fsdiff.errors import FsdiffError
from fsdiff.features.base import Encoder

DEFAULT_BUDGET_BYTES = 2 * 1024**3
"""Default cache size: 2 GiB of stored features."""
_FP16_MAX = 65000.0


def image_digest(image: np.ndarray) -> str:
    """blake2b-128 hex digest of an image's shape, dtype and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.shape}|{image.dtype}".encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


def encoder_cache_id(encoder: Encoder) -> str:
    """What distinguishes one encoder's features from another's: name, weight dtype and compute precision."""
    precision = getattr(encoder, "autocast_dtype", None)
    return f"{encoder.name}|{str(encoder.dtype).replace('torch.', '')}|{str(precision).replace('torch.', '')}"


class FeatureCache:
    """In-memory LRU cache of per-image multi-level features, bounded by a byte budget."""

    def __init__(self, max_bytes: int = DEFAULT_BUDGET_BYTES, dtype: torch.dtype = torch.float16):
        if not isinstance(max_bytes, (int, np.integer)) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise FsdiffError(f"max_bytes must be a non-negative integer number of bytes, got {max_bytes!r}.")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise FsdiffError(f"cache dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}.")
        self.max_bytes = int(max_bytes)
        self.dtype = dtype
        self._store: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return self._bytes

    def key(self, encoder: Encoder, image: np.ndarray, size) -> tuple:
        """The cache key of ``image`` encoded by ``encoder`` at requested ``size``."""
        return (encoder_cache_id(encoder), tuple(encoder.input_size(size)), image_digest(image))

    def get(self, key: tuple) -> list[torch.Tensor] | None:
        """Stored float32 features for ``key`` (marking it recently used), or None."""
        with self._lock:
            feats = self._store.get(key)
            if feats is None:
                self.misses += 1
                return None
            self._store.move_to_end(key)
            self.hits += 1
        return [f.float() for f in feats]

    def _compress(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Own CPU copies in the storage dtype (bfloat16 for a map that would overflow float16)."""
        stored = []
        for f in feats:
            dt = self.dtype
            if dt == torch.float16 and f.numel() and float(f.detach().abs().max()) > _FP16_MAX:
                dt = torch.bfloat16
            stored.append(f.detach().to(device="cpu", dtype=dt).clone(memory_format=torch.contiguous_format))
        return stored

    def _insert(self, key: tuple, stored: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in stored)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._store.pop(key, None)
            if old is not None:
                self._bytes -= sum(t.numel() * t.element_size() for t in old)
            self._store[key] = stored
            self._bytes += size
            while self._bytes > self.max_bytes and self._store:
                _, ev = self._store.popitem(last=False)
                self._bytes -= sum(t.numel() * t.element_size() for t in ev)

    def put(self, key: tuple, feats: Sequence[torch.Tensor]) -> None:
        """Store ``feats`` (a list of level maps) under ``key``, evicting least recently used entries."""
        self._insert(key, self._compress(feats))

    def clear(self) -> None:
        """Drop everything and reset the hit/miss counters."""
        with self._lock:
            self._store.clear()
            self._bytes = 0
            self.hits = self.misses = 0

    def features(self, encoder: Encoder, images: Sequence[np.ndarray], size=None,
                 batch_size: int = 8) -> list[list[torch.Tensor]]:
        """Level maps (each (C_l, h_l, w_l), float32, CPU) for every image, encoding only the misses.

        Misses are encoded in batches of ``batch_size``; an image repeated in ``images`` is encoded once.
        """
        keys = [self.key(encoder, im, size) for im in images]
        out: list[list[torch.Tensor] | None] = [self.get(k) for k in keys]
        todo: dict[tuple, int] = {}
        for i, (k, f) in enumerate(zip(keys, out)):
            if f is None and k not in todo:
                todo[k] = i
        items = list(todo.items())
        for start in range(0, len(items), max(1, batch_size)):
            chunk = items[start:start + batch_size]
            batch = torch.cat([encoder.preprocess(images[i], size) for _, i in chunk])
            levels = encoder.extract(batch)
            for j, (k, _) in enumerate(chunk):
                stored = self._compress([lv[j] for lv in levels])
                self._insert(k, stored)
                # Return what a later hit would return, so results never depend on the cache state.
                todo[k] = [t.float() for t in stored]  # type: ignore[assignment]
        return [f if f is not None else todo[k] for f, k in zip(out, keys)]  # type: ignore[misc]
