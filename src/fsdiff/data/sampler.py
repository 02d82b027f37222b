"""Benchmark episode sampling, reproducing the reference protocols (HSNet, arXiv 2104.01538; BAM, arXiv 2203.07615).

``hsnet`` (juhongm999/hsnet ``test.py`` + ``data/{pascal,coco,fss}.py``): one ``np.random`` stream
seeded once with 0 (``utils.fix_randseed(0)``); episode i takes its query by the source's mode
('cycle': ``query_items()[i % N]``, PASCAL 1000 episodes, FSS-1000 one per image; 'class_random':
``np.random.choice(class_ids, 1, replace=False)`` then ``np.random.choice(images_of_class, 1,
replace=False)``, COCO 1000 episodes). Supports are drawn one at a time with
``np.random.choice(images_of_class(c), 1, replace=False)[0]``, rejecting the query image; duplicate
supports are allowed, as in HSNet.

``bam`` (chunbolang/BAM and TrinitialChan/DifFSS-BAM ``test.py`` + ``util/dataset.py``): five runs
whose seeds are ``np.random.seed(123); np.random.randint(0, 1000, 5)``; each run walks the query
list (images with a fold class of >= 2*32*32 pixels, in list order) for 1000 episodes, picks the
class with Python's ``random.randint`` among the fold classes present in the query, and draws
distinct supports (never the query) from that class's list of images with >= 2*32*32 pixels.
BAM's loaders run in ``workers`` (8 in the shipped configs) DataLoader processes whose ``random``
is seeded ``base_seed + worker_id`` with ``base_seed`` drawn from torch's generator seeded with the
run seed; that is reproduced here (``workers=0`` gives the single-process stream).

All randomness comes from explicitly seeded ``np.random.RandomState`` / ``random.Random`` /
``torch.Generator`` objects, never from global state, so the same call gives the same episodes in
any process.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fsdiff.data.base import FewShotSource
from fsdiff.episode import Episode, MaskAnnotation, Query, Shot
from fsdiff.errors import FsdiffError
from fsdiff.io import atomic_path, read_json
from fsdiff.jsonutil import dumps
from fsdiff.limits import MAX_EPISODES, MAX_KEY_CHARS, MAX_SHOTS, check_count

PROTOCOLS = ("hsnet", "bam")
HSNET_SEED = 0
BAM_SEED = 123
BAM_RUNS = 5
BAM_EPISODES = 1000
BAM_WORKERS = 8
BAM_MIN_PIXELS = 2 * 32 * 32
FORMAT = "fsdiff-episode-list"
REQUIRED_META = ("dataset", "fold", "shots", "protocol", "seed")


@dataclass(frozen=True)
class EpisodeSpec:
    """A sampled episode by reference: class id, query image keys and support image keys."""

    episode_id: str
    class_id: int
    query_keys: tuple[str, ...]
    support_keys: tuple[str, ...]


def _not_enough(source: FewShotSource, class_id: int, pool: list[str], query: str, shots: int) -> None:
    """Raise unless the class has ``shots`` distinct images other than the query."""
    others = len(set(pool) - {query})
    if shots > others:
        raise FsdiffError(
            f"class {class_id} ({source.class_name(class_id)}) of {source.name} has {len(set(pool))} image(s) "
            f"({others} besides the query {query!r}); {shots} support shot(s) were requested. Ask for at most "
            f"{others} shot(s), add images of this class, or use another fold/split."
        )


def _check_shots(shots: object) -> int:
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or int(shots) < 0:
        raise FsdiffError(f"shots={shots!r} must be a non-negative integer (1 or 5 in the benchmarks).")
    return check_count(shots, "shots", MAX_SHOTS)


def _hsnet(source: FewShotSource, n_episodes: int | None, shots: int, seed: int) -> list[EpisodeSpec]:
    rng = np.random.RandomState(seed)
    pools: dict[int, list[str]] = {}

    def pool(c: int) -> list[str]:
        if c not in pools:
            pools[c] = source.images_of_class(c)
            if not pools[c]:
                raise FsdiffError(f"class {c} ({source.class_name(c)}) of {source.name} has no image.")
        return pools[c]

    mode = source.hsnet_query_mode
    items = source.query_items() if mode == "cycle" else []
    if mode == "cycle" and not items:
        raise FsdiffError(f"the {source.name} source has no query image in this fold and split.")
    n = n_episodes if n_episodes is not None else (source.default_episodes or len(items))
    class_ids = source.class_ids()
    specs = []
    for i in range(n):
        if mode == "cycle":
            query, c = items[i % len(items)]
        else:
            c = class_ids[rng.choice(len(class_ids), 1, replace=False)[0]]
            query = pool(c)[rng.choice(len(pool(c)), 1, replace=False)[0]]
        candidates = pool(c)
        supports: list[str] = []
        if shots:
            _not_enough(source, c, candidates, query, shots)
        while len(supports) < shots:  # HSNet: keep drawing while the draw is the query
            s = candidates[rng.choice(len(candidates), 1, replace=False)[0]]
            if s != query:
                supports.append(s)
        specs.append(EpisodeSpec(f"{i:05d}", int(c), (query,), tuple(supports)))
    return specs


def bam_seeds(seed: int = BAM_SEED, runs: int = BAM_RUNS) -> list[int]:
    """BAM's per-run seeds: ``np.random.seed(seed); np.random.randint(0, 1000, runs)``."""
    return [int(s) for s in np.random.RandomState(seed).randint(0, 1000, runs, dtype=np.int64)]


def _bam_table(source: FewShotSource, min_pixels: int) -> tuple[list[str], dict[int, list[str]], dict[str, list[int]]]:
    """BAM's ``data_list``, ``sub_class_file_list`` and each query's fold classes (loads every label)."""
    keys = source.image_keys()
    ids = source.class_ids()
    pixels = {k: source.class_pixels(k) for k in keys}
    data_list = [k for k in keys if any(pixels[k].get(c, 0) >= min_pixels for c in ids)]
    files = {c: [k for k in keys if pixels[k].get(c, 0) >= min_pixels] for c in ids}
    present = {k: [c for c in ids if pixels[k].get(c, 0) > 0] for k in data_list}
    if not data_list:
        raise FsdiffError(
            f"no image of the {source.name} source holds a class of this fold with >= {min_pixels} pixels; "
            "BAM's protocol has no query (lower min_pixels or check the data)."
        )
    return data_list, files, present


def _bam_run(
    source: FewShotSource, run: int, seed: int, n: int, shots: int, workers: int,
    table: tuple[list[str], dict[int, list[str]], dict[str, list[int]]],
) -> list[EpisodeSpec]:
    """One BAM validation run: ``n`` episodes walking the query list with ``seed``'s streams."""
    data_list, files, present = table
    if workers > 0:
        import torch

        gen = torch.Generator()
        gen.manual_seed(int(seed))
    else:
        rng = random.Random(int(seed))
    specs: list[EpisodeSpec] = []
    while len(specs) < n:
        if workers > 0:  # a fresh DataLoader iterator per pass: new base seed, workers reseeded
            base = int(torch.empty((), dtype=torch.int64).random_(generator=gen).item())
            rngs = [random.Random(base + w) for w in range(workers)]
        for j, query in enumerate(data_list):
            if len(specs) >= n:
                break
            r = rngs[j % workers] if workers > 0 else rng
            classes = present[query]
            c = classes[r.randint(1, len(classes)) - 1]
            pool = files[c]
            if shots:
                _not_enough(source, c, pool, query, shots)
            chosen: list[int] = []
            for _ in range(shots):
                idx = r.randint(1, len(pool)) - 1  # BAM draws once before its rejection loop
                s = query
                while s == query or idx in chosen:
                    idx = r.randint(1, len(pool)) - 1
                    s = pool[idx]
                chosen.append(idx)
            specs.append(EpisodeSpec(f"r{run}-{len(specs):05d}", int(c), (query,), tuple(pool[x] for x in chosen)))
    return specs


def sample_episodes(
    source: FewShotSource,
    protocol: str = "hsnet",
    n_episodes: int | None = None,
    shots: int = 1,
    seed: int | None = None,
    *,
    runs: int = BAM_RUNS,
    workers: int = BAM_WORKERS,
    min_pixels: int = BAM_MIN_PIXELS,
) -> list[EpisodeSpec]:
    """Sample benchmark episodes of ``source`` under ``protocol`` ('hsnet' or 'bam').

    hsnet: ``seed`` defaults to 0, ``n_episodes`` to the source's default (1000 for PASCAL and COCO,
    one per query image for FSS-1000 and folders). bam: ``seed`` (default 123) draws ``runs`` run
    seeds; each run gives ``n_episodes`` (default 1000) episodes with ids ``r<run>-<index>``. Bounds:
    :data:`fsdiff.limits.MAX_EPISODES` episodes per run, :data:`~fsdiff.limits.MAX_SHOTS` shots.
    """
    shots = _check_shots(shots)
    if n_episodes is not None and (isinstance(n_episodes, bool) or int(n_episodes) < 1):
        raise FsdiffError(f"n_episodes={n_episodes!r} must be a positive integer.")
    if n_episodes is not None:
        check_count(n_episodes, "n_episodes", MAX_EPISODES, minimum=1)
    if protocol == "hsnet":
        n = None if n_episodes is None else int(n_episodes)
        return _hsnet(source, n, shots, HSNET_SEED if seed is None else int(seed))
    if protocol == "bam":
        if int(workers) < 0 or int(runs) < 1:
            raise FsdiffError(f"workers={workers} must be >= 0 and runs={runs} >= 1.")
        table = _bam_table(source, int(min_pixels))
        n = BAM_EPISODES if n_episodes is None else int(n_episodes)
        seeds = bam_seeds(BAM_SEED if seed is None else int(seed), int(runs))
        return [s for run, rs in enumerate(seeds) for s in _bam_run(source, run, rs, n, shots, int(workers), table)]
    raise FsdiffError(f"protocol={protocol!r} is unknown; use one of: {', '.join(PROTOCOLS)}.")


def episode_meta(
    source: FewShotSource, protocol: str, shots: int, seed: int | None = None, **extra: object
) -> dict:
    """The metadata an episode list records: the source's description, protocol, shots, seed(s).

    ``extra`` adds or overrides keys, e.g. ``n_episodes`` or, for 'bam', non-default ``runs``,
    ``workers`` and ``min_pixels`` (defaults recorded: 5, 8, 2048).
    """
    if seed is None:
        seed = HSNET_SEED if protocol == "hsnet" else BAM_SEED
    meta = {**source.describe(), "dataset": source.name, "protocol": protocol, "shots": int(shots), "seed": int(seed)}
    if protocol == "bam":
        meta.update(runs=BAM_RUNS, workers=BAM_WORKERS, min_pixels=BAM_MIN_PIXELS)
    meta.update(extra)
    if protocol == "bam":
        meta["run_seeds"] = bam_seeds(int(seed), int(meta["runs"]))  # type: ignore[arg-type]
    return meta


def save_episode_list(path: str | os.PathLike, specs: list[EpisodeSpec], meta: dict) -> None:
    """Write ``specs`` and ``meta`` (dataset, fold, shots, protocol, seed, ...) as JSON, atomically."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise FsdiffError(f"episode list meta lacks {missing}; build it with fsdiff.data.sampler.episode_meta().")
    wrong = next((s for s in specs if len(s.support_keys) != meta["shots"]), None)
    if wrong is not None:
        raise FsdiffError(
            f"episode {wrong.episode_id} has {len(wrong.support_keys)} support(s) but meta says shots={meta['shots']}; "
            "record the shots the episodes were sampled with."
        )
    episodes = [
        {"id": s.episode_id, "class_id": int(s.class_id), "query": list(s.query_keys), "support": list(s.support_keys)}
        for s in specs
    ]
    try:
        head = dumps({"format": FORMAT, "version": 1, "meta": meta})
    except (TypeError, ValueError) as exc:
        raise FsdiffError(f"episode list meta is not JSON serialisable: {exc}.") from None
    lines = ",\n".join(json.dumps(e, ensure_ascii=False) for e in episodes)
    text = head[:-1] + ', "episodes": [\n' + lines + "\n]}\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _bad_key(key: object) -> bool:
    return not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS or "\0" in key


def load_episode_list(path: str | os.PathLike) -> tuple[list[EpisodeSpec], dict]:
    """Read an episode list written by :func:`save_episode_list`: (specs, meta).

    Image keys are only names here: the source resolves them (a COCO key must be a file_name of its json, a
    folder key one of its files, a PASCAL id a file inside its folders), so a key cannot reach outside the
    dataset. Bounds: :data:`fsdiff.limits.MAX_EPISODES` episodes, :data:`~fsdiff.limits.MAX_SHOTS` images per
    side of an episode, keys of at most :data:`~fsdiff.limits.MAX_KEY_CHARS` characters.
    """
    p = Path(path)
    what = f"episode list {p}"
    if not p.exists():
        raise FsdiffError(
            f"{what} not found; write one with save_episodes=FILE, which saves the episodes an evaluation "
            "samples (fsdiff.data.save_episode_list() for your own)."
        )
    data = read_json(p, "episode list", fix="re-create the file")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FsdiffError(f"{what} is not an fsdiff episode list (no \"format\": \"{FORMAT}\"); re-create the file.")
    meta, episodes = data.get("meta"), data.get("episodes")
    if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED_META):
        raise FsdiffError(f"{what}: 'meta' must be an object with keys {list(REQUIRED_META)}; re-create the file.")
    if not isinstance(episodes, list):
        raise FsdiffError(f"{what}: 'episodes' must be a list; re-create the file.")
    shots = meta["shots"]
    if isinstance(shots, bool) or not isinstance(shots, int) or not 0 <= shots <= MAX_SHOTS.value():
        raise FsdiffError(
            f"{what}: meta 'shots' is {str(shots)[:40]!r}; it must be an integer in 0..{MAX_SHOTS.value()} "
            f"({MAX_SHOTS.name}); re-create the file."
        )
    if len(episodes) > MAX_EPISODES.value():
        raise FsdiffError(
            f"{what} holds {len(episodes):,} episodes, above the limit of {MAX_EPISODES.value():,} "
            f"({MAX_EPISODES.name}); split the file, or {MAX_EPISODES.hint()}."
        )
    specs = []
    for i, e in enumerate(episodes):
        ok = (
            isinstance(e, dict)
            and isinstance(e.get("id"), str)
            and len(e["id"]) <= MAX_KEY_CHARS
            and isinstance(e.get("class_id"), int)
            and not isinstance(e.get("class_id"), bool)
            and isinstance(e.get("query"), list)
            and 0 < len(e["query"]) <= MAX_SHOTS.value()
            and isinstance(e.get("support"), list)
            and not any(_bad_key(k) for k in e["query"] + e["support"])
        )
        if not ok:
            raise FsdiffError(
                f"{what}: episode {i} is malformed (needs 'id' string, 'class_id' integer, 'query' list of 1 to "
                f"{MAX_SHOTS.value()} image keys, 'support' list of image keys; keys are non-empty strings of at "
                f"most {MAX_KEY_CHARS} characters); re-create the file."
            )
        if len(e["support"]) != shots:
            raise FsdiffError(
                f"{what}: episode {i} has {len(e['support'])} support(s) but meta says shots={shots}; "
                "re-create the file."
            )
        specs.append(EpisodeSpec(e["id"], e["class_id"], tuple(e["query"]), tuple(e["support"])))
    return specs, meta


def build_episode(source: FewShotSource, spec: EpisodeSpec, class_name: str | None = None) -> Episode:
    """Load the images and masks of ``spec`` into a validated :class:`~fsdiff.episode.Episode`."""
    name = class_name if class_name is not None else source.class_name(spec.class_id)
    shots = []
    for key in spec.support_keys:
        image, mask = source.load(key, spec.class_id)
        shots.append(Shot(image, MaskAnnotation(mask), image_id=key))
    queries = []
    for key in spec.query_keys:
        image, mask = source.load(key, spec.class_id)
        queries.append(Query(image, gt=mask, image_id=key))
    meta = {**source.describe(), "dataset": source.name}
    return Episode(spec.class_id, name, tuple(shots), tuple(queries), episode_id=spec.episode_id, meta=meta)
