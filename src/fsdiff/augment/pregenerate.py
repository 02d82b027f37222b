"""Offline DifFSS pre-generation for a benchmark fold or a user folder, sharded over processes
(DifFSS-BAM also reads auxiliary images of the training lists [C], so both are generated ahead of time).

The official ``FSSpregenerate.py`` walks every image of a list and every foreground class in it, and writes
N auxiliary images per (image, class). Here the work items are the (image key, class id) pairs of every
support candidate of a source: ``images_of_class(c)`` for every class ``c`` of its fold and split (a user
folder is a source too), or an explicit list of pairs. Everything lands in one
:class:`~fsdiff.augment.cache.GenerationCache`, from which the :class:`~fsdiff.augment.augmenter.Augmenter`
later reads (same keys, so no pipeline runs at evaluation time).

Sharding: items are sorted by the stable key ``(image_key, class_id)`` and item ``i`` of that order goes to
shard ``i % count``. The shard is explicit ``(index, count)``, or comes from accelerate's ``PartialState``
(``process_index``, ``num_processes``) when the process was started by ``accelerate launch`` (``WORLD_SIZE``
> 1) or when ``shard='accelerate'``. So ``accelerate launch -m fsdiff augment ...`` splits the work with no
item done twice, every process writing into the one shared cache (entries are committed atomically, and a key
generated twice, e.g. for duplicate images under two names, is stored once). A progress bar (tqdm, stderr)
runs on shard 0 only.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fsdiff.augment.cache import MARKER_NAME, GenerationCache, is_generation_cache
from fsdiff.augment.generate import Generator, resolve_spec
from fsdiff.distributed import partial_state, world_size
from fsdiff.episode import MaskAnnotation
from fsdiff.errors import FsdiffError

if TYPE_CHECKING:  # pragma: no cover
    from fsdiff.augment.drift import DriftFilter, DriftReport
    from fsdiff.data.base import FewShotSource

Loader = Callable[[str, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True, order=True)
class WorkItem:
    """One (support image, class) pair to generate N auxiliary images for."""

    image_key: str
    class_id: int


def _as_item(x: Any) -> WorkItem:
    if isinstance(x, WorkItem):
        return x
    try:
        key, cid = x
    except (TypeError, ValueError):
        raise FsdiffError(f"work items are (image_key, class_id) pairs, got {x!r}.") from None
    if not isinstance(key, str) or isinstance(cid, bool) or not isinstance(cid, (int, np.integer)):
        raise FsdiffError(f"work item {x!r}: expected (str image key, int class id).")
    return WorkItem(key, int(cid))


def work_items(source: FewShotSource, classes: Iterable[int] | None = None) -> list[WorkItem]:
    """Every support candidate of a source: (image, class) for each image of each class, sorted, no duplicates."""
    ids = source.class_ids() if classes is None else [int(c) for c in classes]
    known = set(source.class_ids())
    for c in ids:
        if c not in known:
            source.class_name(c)  # raises an FsdiffError naming the valid classes
    return sorted({WorkItem(str(k), int(c)) for c in ids for k in source.images_of_class(c)})


def shard_items(items: Iterable[Any], index: int, count: int) -> list[WorkItem]:
    """The items of shard ``index`` of ``count``: sorted by (image_key, class_id), every ``count``-th from ``index``."""
    index, count = check_shard((index, count))
    ordered = sorted({_as_item(x) for x in items})
    return [it for i, it in enumerate(ordered) if i % count == index]


def check_shard(shard: Sequence[int]) -> tuple[int, int]:
    """Validate an explicit ``(index, count)`` shard."""
    try:
        index, count = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise FsdiffError(f"shard must be (index, count), e.g. (0, 2), got {shard!r}.") from None
    if count < 1 or not 0 <= index < count:
        raise FsdiffError(f"shard {tuple(shard)!r}: need count >= 1 and 0 <= index < count.")
    return index, count


def resolve_shard(shard: Sequence[int] | str | None = None) -> tuple[int, int]:
    """The (index, count) of this process: explicit, accelerate's PartialState, or (0, 1) for a single process."""
    if shard is not None and not isinstance(shard, str):
        return check_shard(shard)
    if shard not in (None, "accelerate"):
        raise FsdiffError(f"shard must be (index, count), 'accelerate' or None, got {shard!r}.")
    if shard == "accelerate" or world_size() > 1:
        state = partial_state()
        return int(state.process_index), int(state.num_processes)
    return 0, 1


def process_device(shard: Sequence[int] | str | None = None) -> Any:
    """The torch device this process should load the models on under ``accelerate launch`` (None otherwise)."""
    if shard == "accelerate" or (shard is None and world_size() > 1):
        return partial_state().device
    return None


def _barrier() -> None:
    """Wait for every process when running under accelerate (no-op otherwise)."""
    if world_size() > 1:
        partial_state().wait_for_everyone()


@dataclass
class PregenerateReport:
    """What one process (shard) did: items, images generated or found in the cache, failures."""

    shard: tuple[int, int]
    condition: str
    n: int
    total_items: int
    assigned: int
    generated: int = 0
    cached: int = 0
    items_done: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    """Cache keys of every image this shard produced or found, in item order."""
    generated_keys: list[str] = field(default_factory=list)
    """Cache keys of the images this shard's pipeline produced (cache misses)."""
    items: list[tuple[str, int]] = field(default_factory=list)
    """The (image_key, class_id) items assigned to this shard, in processing order."""
    seconds: float = 0.0
    drift: DriftReport | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON reports."""
        return {
            "shard": list(self.shard), "condition": self.condition, "n": self.n, "total_items": self.total_items,
            "assigned": self.assigned, "items_done": self.items_done, "generated": self.generated,
            "cached": self.cached, "failed": list(self.failed), "seconds": round(self.seconds, 3),
            "keys": list(self.keys), "generated_keys": list(self.generated_keys),
            "items": [list(x) for x in self.items],
            "drift": self.drift.as_dict() if self.drift is not None else None,
        }


def _use_cache(generator: Generator, cache: GenerationCache | str | os.PathLike | None) -> GenerationCache:
    """The cache the generator writes to (``cache`` is attached to a generator that has none)."""
    if cache is not None and not isinstance(cache, GenerationCache):
        cache = GenerationCache(cache)
    current = getattr(generator, "cache", None)
    if cache is None:
        if current is None:
            raise FsdiffError("pre-generation needs a cache: pass cache=<folder> or a GenerationCache.")
        return current
    if current is None:
        generator.cache = cache
        return cache
    if current is not cache and os.path.realpath(current.root) != os.path.realpath(cache.root):
        raise FsdiffError(
            f"the generator writes to cache {current.root} but cache={cache.root} was passed; use one cache."
        )
    return current


def pregenerate(
    items: FewShotSource | Iterable[Any],
    generator: Generator,
    condition: str | None = None,
    n: int | None = None,
    cache: GenerationCache | str | os.PathLike | None = None,
    shard: Sequence[int] | str | None = None,
    *,
    source: FewShotSource | None = None,
    loader: Loader | None = None,
    class_names: Callable[[int], str] | dict[int, str] | None = None,
    classes: Iterable[int] | None = None,
    drift_filter: DriftFilter | None = None,
    progress: bool = True,
    fail_fast: bool = False,
    barrier: bool = True,
) -> PregenerateReport:
    """Generate ``n`` auxiliary images for every (image, class) work item of this shard into the cache.

    ``items``: a FewShotSource (all its support candidates, optionally only ``classes``) or (image_key, class_id)
    pairs, loaded with ``source`` (its ``load`` and ``class_name``) or with ``loader(key, cid) -> (image, mask)``
    and ``class_names``. Items that fail with an FsdiffError (e.g. an empty mask) are reported and skipped,
    unless ``fail_fast``. With ``drift_filter``, low-scoring images are regenerated into the cache as well.
    """
    from fsdiff.data.base import FewShotSource

    t0 = time.perf_counter()
    if isinstance(items, FewShotSource):
        source = items if source is None else source
        all_items = work_items(items, classes)
    else:
        if classes is not None:
            raise FsdiffError("classes= only applies when pre-generating a whole source; filter the item list instead.")
        all_items = sorted({_as_item(x) for x in items})
    if loader is None:
        if source is None:
            raise FsdiffError("pre-generating a list of (image_key, class_id) items needs source= or loader=.")
        loader = source.load
    if class_names is None:
        if source is None:
            raise FsdiffError("pass class_names= (a dict or a function of the class id) together with loader=.")
        name_of: Callable[[int], str] = source.class_name
    elif isinstance(class_names, dict):
        table = dict(class_names)

        def name_of(cid: int) -> str:
            if cid not in table:
                raise FsdiffError(f"class id {cid} has no name in class_names.")
            return table[cid]
    else:
        name_of = class_names
    gen_cond, n = resolve_spec(getattr(generator, "condition", ""), condition, n, minimum=1)
    _use_cache(generator, cache)
    index, count = resolve_shard(shard)
    mine = shard_items(all_items, index, count)
    report = PregenerateReport(shard=(index, count), condition=gen_cond, n=int(n), total_items=len(all_items),
                               assigned=len(mine), items=[(it.image_key, it.class_id) for it in mine])
    bar = None
    if progress and index == 0 and mine:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=f"diffss {gen_cond}:{n}" + (f" shard 0/{count}" if count > 1 else ""),
                   unit="item", file=sys.stderr)
    try:
        for it in mine:
            try:
                image, mask = loader(it.image_key, it.class_id)
                name = name_of(it.class_id)
                ann = MaskAnnotation(mask)
                ann.validate(image.shape[:2], f"{it.image_key} (class {it.class_id})")
                outs = generator.generate(image, ann, name, int(n))
                if drift_filter is not None:
                    outs, rep = drift_filter.filter(generator, image, ann, name, outs, support_id=it.image_key)
                    report.drift = rep if report.drift is None else report.drift.add(rep)  # rep is this call's own
            except FsdiffError as exc:
                if fail_fast:
                    raise
                report.failed.append({"image_key": it.image_key, "class_id": it.class_id, "error": str(exc)})
            else:
                report.items_done += 1
                for o in outs:
                    report.keys.append(o.key)
                    if o.cached:
                        report.cached += 1
                    else:
                        report.generated += 1
                        report.generated_keys.append(o.key)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if barrier and count > 1:
        _barrier()
    report.seconds = time.perf_counter() - t0
    return report


def _existing_cache(cache: GenerationCache | str | os.PathLike) -> GenerationCache:
    """A GenerationCache over an existing cache folder (a typo must not create an empty cache and report success;
    a folder that is not a cache, e.g. /etc, must not be reported as a healthy empty one)."""
    if isinstance(cache, GenerationCache):
        return cache
    path = Path(cache)
    if path.exists() and not path.is_dir():
        raise FsdiffError(
            f"cache {cache} is a file, not a folder; give the cache folder that pre-generation wrote."
        )
    if not path.is_dir():
        raise FsdiffError(
            f"cache folder {cache} does not exist; give the cache folder that pre-generation wrote."
        )
    if not is_generation_cache(path):
        raise FsdiffError(
            f"folder {cache} is not a DifFSS generation cache (no {MARKER_NAME} marker, and it holds other things "
            "than the cache's two-hex-digit entry folders); give the cache folder that pre-generation wrote."
        )
    return GenerationCache(cache)


def list_cache(cache: GenerationCache | str | os.PathLike) -> list[dict[str, Any]]:
    """One row per committed cache entry: key, class, condition, seed, index, attempt, sizes, shard, created."""
    rows = []
    for rec in _existing_cache(cache).records():
        meta = rec.get("meta") or {}
        rows.append({
            "key": rec["key"], "class_name": meta.get("class_name"), "condition": meta.get("condition"),
            "seed": meta.get("seed"), "index": meta.get("index"), "attempt": meta.get("attempt"),
            "support": meta.get("support"), "support_size": meta.get("support_size"),
            "generated_size": meta.get("generated_size"), "steps": meta.get("steps"), "shard": meta.get("shard"),
            "created": rec.get("created"), "files": sorted(rec["files"]),
        })
    return rows


def check_cache(cache: GenerationCache | str | os.PathLike, cleanup: bool = False) -> dict[str, Any]:
    """Verify every entry's files against their checksums; list (and with ``cleanup`` delete) partial writes."""
    cache = _existing_cache(cache)
    problems = cache.check()
    partial = [str(p) for p in cache.partial_files()]
    removed = [str(p) for p in cache.cleanup_partial()] if cleanup else []
    return {"root": str(cache.root), "entries": len(cache.keys()), "problems": problems,
            "partial_files": partial, "removed": removed, "ok": not problems}


__all__ = [
    "PregenerateReport", "WorkItem", "check_cache", "check_shard", "list_cache", "pregenerate", "process_device",
    "resolve_shard",
    "shard_items", "work_items",
]
