"""Pre-generation with sharding (fsdiff.augment.pregenerate): stable item order and modulo assignment, shard
resolution, a user-folder source end to end, the cache list/check helpers, bad input, and two real
subprocesses (shards (0, 2) and (1, 2)) sharing one cache with no item generated twice. The diffusion pipeline
is a deterministic fake, so only the work distribution and the cache are under test."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fsdiff.augment.cache import GenerationCache
from fsdiff.augment.controls import ControlConfig
from fsdiff.augment.generate import ControlNetGenerator, GenerationConfig
from fsdiff.augment.pregenerate import (
    WorkItem,
    check_cache,
    list_cache,
    pregenerate,
    process_device,
    resolve_shard,
    shard_items,
    work_items,
)
from fsdiff.data.folder import FolderSource
from fsdiff.errors import FsdiffError

from test_augment_augmenter import FakePipeline  # noqa: E402  (the strict fake of the pipeline's call)

REPO = Path(__file__).resolve().parents[1]
CFG = GenerationConfig(steps=2, control=ControlConfig(resolution=64))


def make_folder(root: Path, classes=("cat", "dog"), per_class: int = 3) -> Path:
    """images/<class>/i.png + masks/<class>/i.png (0/255 masks), small and distinct."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / "images" / c).mkdir(parents=True)
        (root / "masks" / c).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (24 + 4 * i, 32, 3), dtype=np.uint8)
            mask = np.zeros(img.shape[:2], np.uint8)
            mask[4:16, 6 + i:20 + i] = 255
            Image.fromarray(img).save(root / "images" / c / f"{i}.png")
            Image.fromarray(mask).save(root / "masks" / c / f"{i}.png")
    return root


def test_shard_items_partition_is_stable_and_disjoint() -> None:
    items = [(f"img{i:02d}", i % 3) for i in range(11)]
    shards = [shard_items(items, i, 3) for i in range(3)]
    flat = [x for s in shards for x in s]
    assert len(flat) == len(set(flat)) == 11 and set(flat) == {WorkItem(k, c) for k, c in items}
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    assert [shard_items(shuffled, i, 3) for i in range(3)] == shards  # input order does not matter
    assert shards[0][0] == WorkItem("img00", 0) and shards[1][0] == WorkItem("img01", 1)
    assert shard_items(items + items, 0, 1) == sorted(WorkItem(k, c) for k, c in items)  # duplicates merged


def test_resolve_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_shard(None) == (0, 1)
    assert resolve_shard((1, 4)) == (1, 4)
    for bad in ((2, 2), (0, 0), (-1, 2), "x", (1,)):
        with pytest.raises(FsdiffError, match="shard"):
            resolve_shard(bad)
    assert resolve_shard("accelerate") == (0, 1)  # accelerate's PartialState in a single process
    assert process_device(None) is None


def test_pregenerate_folder_source_and_cache_helpers(tmp_path: Path) -> None:
    source = FolderSource(make_folder(tmp_path / "data"))
    items = work_items(source)
    assert len(items) == 6 and items == sorted(items) and items[0] == WorkItem("cat/0", 0)
    assert work_items(source, classes=[1]) == [WorkItem(f"dog/{i}", 1) for i in range(3)]
    pipe = FakePipeline()
    gen = ControlNetGenerator(pipe, "seg", config=CFG)
    rep = pregenerate(source, gen, "seg:2", cache=GenerationCache(tmp_path / "cache"), progress=False)
    assert (rep.total_items, rep.assigned, rep.items_done, rep.generated, rep.cached) == (6, 6, 6, 12, 0)
    assert rep.shard == (0, 1) and rep.n == 2 and not rep.failed and pipe.calls == 6
    again = pregenerate(source, gen, n=2, progress=False)  # the generator's cache is reused
    assert (again.generated, again.cached) == (0, 12) and pipe.calls == 6
    assert sorted(again.keys) == sorted(rep.keys)
    rows = list_cache(tmp_path / "cache")
    assert len(rows) == 12 and {r["class_name"] for r in rows} == {"cat", "dog"}
    assert {r["index"] for r in rows} == {0, 1} and all(r["files"] == ["control", "image"] for r in rows)
    ok = check_cache(tmp_path / "cache")
    assert ok["ok"] and ok["entries"] == 12 and ok["problems"] == []
    # corrupt one entry: check reports it; a partial write is listed and cleaned up
    entry = GenerationCache(tmp_path / "cache").entry_dir(rows[0]["key"])
    (entry / "image.png").write_bytes(b"broken")
    (entry / ".image.png.x.tmp").write_bytes(b"partial")
    bad = check_cache(tmp_path / "cache", cleanup=True)
    assert not bad["ok"] and rows[0]["key"] in bad["problems"][0] and len(bad["removed"]) == 1
    json.dumps(rep.as_dict())


def test_pregenerate_bad_input(tmp_path: Path) -> None:
    img = np.zeros((20, 20, 3), np.uint8)
    full = np.zeros((20, 20), np.uint8)
    full[5:10, 5:10] = 1
    data = {"a": full, "b": np.zeros((20, 20), np.uint8)}  # 'b' has an empty mask

    def loader(key: str, cid: int):
        return img, data[key]

    gen = ControlNetGenerator(FakePipeline(), "seg", config=CFG)
    cache = GenerationCache(tmp_path / "c")
    rep = pregenerate([("a", 1), ("b", 1)], gen, n=1, cache=cache, loader=loader, class_names={1: "dog"},
                      progress=False)
    assert rep.items_done == 1 and rep.generated == 1
    assert rep.failed[0]["image_key"] == "b" and "empty" in rep.failed[0]["error"]
    with pytest.raises(FsdiffError, match="empty"):
        pregenerate([("b", 1)], gen, n=1, loader=loader, class_names={1: "dog"}, fail_fast=True, progress=False)
    with pytest.raises(FsdiffError, match="does not match"):
        pregenerate([("a", 1)], gen, "hed", loader=loader, class_names={1: "dog"}, progress=False)
    # the same precedence as the Augmenter: an explicit n wins over the spec's count
    assert pregenerate([("a", 1)], gen, "seg:2", n=3, loader=loader, class_names={1: "dog"}, progress=False).n == 3
    assert pregenerate([("a", 1)], gen, "seg:2", loader=loader, class_names={1: "dog"}, progress=False).n == 2
    with pytest.raises(FsdiffError, match="integer >= 1"):
        pregenerate([("a", 1)], gen, n=0, loader=loader, class_names={1: "dog"}, progress=False)
    with pytest.raises(FsdiffError, match="source= or loader="):
        pregenerate([("a", 1)], gen, n=1, progress=False)
    with pytest.raises(FsdiffError, match="needs a cache"):
        pregenerate([("a", 1)], ControlNetGenerator(FakePipeline(), "seg", config=CFG), loader=loader,
                    class_names={1: "dog"}, progress=False)
    with pytest.raises(FsdiffError, match="one cache"):
        pregenerate([("a", 1)], gen, cache=GenerationCache(tmp_path / "other"), loader=loader,
                    class_names={1: "dog"}, progress=False)
    with pytest.raises(FsdiffError, match="pairs"):
        pregenerate([("a",)], gen, loader=loader, class_names={1: "dog"}, progress=False)


WORKER = textwrap.dedent("""
    import json, sys
    from types import SimpleNamespace
    import numpy as np, torch
    torch.set_num_threads(1)
    from fsdiff.augment.cache import GenerationCache
    from fsdiff.augment.controls import ControlConfig
    from fsdiff.augment.generate import ControlNetGenerator, GenerationConfig
    from fsdiff.augment.pregenerate import pregenerate
    from fsdiff.data.folder import FolderSource

    data, cache_dir, index, count, out = sys.argv[1:6]
    index, count = int(index), int(count)

    class Fake:
        calls = 0
        def __call__(self, *, image, generator, height, width, **kw):
            Fake.calls += 1
            ctrl = image[0].permute(1, 2, 0).numpy()
            return SimpleNamespace(images=np.stack(
                [0.5 * torch.rand((height, width, 3), generator=g).numpy() + 0.5 * ctrl for g in generator]))

    gen = ControlNetGenerator(Fake(), "seg", config=GenerationConfig(steps=2, control=ControlConfig(resolution=64)),
                              shard=f"{index}/{count}")
    rep = pregenerate(FolderSource(data), gen, "seg", 2, GenerationCache(cache_dir), shard=(index, count),
                      progress=(index == 0))
    d = rep.as_dict()
    d["pipeline_images"] = gen.images_generated
    with open(out, "w") as f:
        json.dump(d, f)
""")


def test_two_processes_share_one_cache_without_double_work(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", classes=("cat", "dog", "eel"), per_class=3)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    procs = [subprocess.Popen([sys.executable, str(script), str(data), str(tmp_path / "cache"), str(i), "2",
                               str(tmp_path / f"r{i}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    reps = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    items = [{tuple(x) for x in r["items"]} for r in reps]
    everything = {(it.image_key, it.class_id) for it in work_items(FolderSource(data))}
    assert items[0].isdisjoint(items[1]) and items[0] | items[1] == everything and len(everything) == 9
    assert [r["assigned"] for r in reps] == [5, 4] and all(r["total_items"] == 9 for r in reps)
    gen_keys = [set(r["generated_keys"]) for r in reps]
    assert gen_keys[0].isdisjoint(gen_keys[1])  # no image generated by both processes
    assert sum(r["pipeline_images"] for r in reps) == 18 == sum(r["generated"] for r in reps)
    rows = list_cache(tmp_path / "cache")
    assert len(rows) == 18 and {r["key"] for r in rows} == gen_keys[0] | gen_keys[1]
    for r in rows:  # each entry was written by the shard that owns it
        owner = 0 if r["key"] in gen_keys[0] else 1
        assert r["shard"] == f"{owner}/2"
    assert check_cache(tmp_path / "cache")["ok"]


def test_process_layout_without_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsdiff.distributed (shared by pre-generation and DiffSeg training): one process, the default device;
    the two-process case is exercised for real by test_augment_accelerate."""

    from fsdiff import distributed
    from fsdiff.methods.diffseg.training import steps_per_epoch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world_size() == 1 and distributed.num_processes() == 1
    assert distributed.process_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for raw, want in (("4", 4), ("junk", 1), ("0", 1)):
        monkeypatch.setenv("WORLD_SIZE", raw)
        assert distributed.world_size() == want

    class Pairs:
        def query_items(self):
            return list(range(10))

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert steps_per_epoch(Pairs(), 4) == 3 and steps_per_epoch(Pairs(), 4, num_processes=2) == 2
