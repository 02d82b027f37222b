"""Benchmark sampler: HSNet and BAM protocols against direct re-implementations, determinism,
episode list files."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fsdiff.data import (
    CocoSource,
    EpisodeSpec,
    FewShotSource,
    FolderSource,
    PascalSource,
    bam_seeds,
    build_episode,
    episode_meta,
    load_episode_list,
    sample_episodes,
    save_episode_list,
)
from fsdiff.episode import Episode
from fsdiff.errors import FsdiffError

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def global_rng_saved():
    """Let a reference re-implementation use the global RNGs, as the original code does."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


@pytest.fixture(scope="module")
def splits(shared_data: Path) -> Path:
    return shared_data / "fss-splits" / "hsnet"


@pytest.fixture(scope="module")
def voc(shared_data: Path) -> Path:
    return shared_data / "voc-mini"


def _folder(root: Path, names: list[str]) -> Path:
    for n in names:
        for sub, arr in (("images", np.full((8, 8, 3), 50, np.uint8)), ("masks", np.eye(8, dtype=np.uint8) * 255)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / sub / f"{n}.png")
    return root


# -- HSNet ----------------------------------------------------------------------------------
def _hsnet_pascal_reference(list_file: Path, shot: int, n: int = 1000) -> list[tuple[str, int, list[str]]]:
    """HSNet's DatasetPASCAL.sample_episode + test loop, written out with the global np.random."""
    lines = list_file.read_text().split("\n")[:-1]
    img_metadata = [[d.split("__")[0], int(d.split("__")[1]) - 1] for d in lines]
    classwise: dict[int, list[str]] = {c: [] for c in range(20)}
    for name, c in img_metadata:
        classwise[c] += [name]
    out = []
    with global_rng_saved():
        np.random.seed(0)  # utils.fix_randseed(0)
        for idx in range(n):
            idx %= len(img_metadata)
            query_name, class_sample = img_metadata[idx]
            support_names: list[str] = []
            while True:
                support_name = np.random.choice(classwise[class_sample], 1, replace=False)[0]
                if query_name != support_name:
                    support_names.append(support_name)
                if len(support_names) == shot:
                    break
            out.append((query_name, class_sample + 1, support_names))
    return out


@pytest.mark.parametrize("fold, shot", [(0, 1), (2, 5)])
def test_hsnet_pascal_matches_reference(voc: Path, splits: Path, fold: int, shot: int) -> None:
    src = PascalSource(root=voc, fold=fold, splits_dir=splits)
    specs = sample_episodes(src, protocol="hsnet", shots=shot)
    ref = _hsnet_pascal_reference(splits / "pascal" / "val" / f"fold{fold}.txt", shot)
    assert len(specs) == 1000
    got = [(s.query_keys[0], s.class_id, list(s.support_keys)) for s in specs]
    assert got == ref
    items = src.query_items()
    assert all(s.query_keys[0] == items[i % len(items)][0] for i, s in enumerate(specs))


def test_hsnet_coco_matches_reference(shared_data: Path) -> None:
    src = CocoSource(root=shared_data / "coco-mini", fold=1)
    specs = sample_episodes(src, protocol="hsnet", shots=1, n_episodes=300)
    class_ids = src.class_ids()
    classwise = {c: src.images_of_class(c) for c in class_ids}
    ref = []
    with global_rng_saved():
        np.random.seed(0)
        for _ in range(300):  # DatasetCOCO.load_frame
            class_sample = np.random.choice(class_ids, 1, replace=False)[0]
            query_name = np.random.choice(classwise[class_sample], 1, replace=False)[0]
            support_names = []
            while True:
                support_name = np.random.choice(classwise[class_sample], 1, replace=False)[0]
                if query_name != support_name:
                    support_names.append(support_name)
                if len(support_names) == 1:
                    break
            ref.append((int(class_sample), query_name, support_names))
    assert [(s.class_id, s.query_keys[0], list(s.support_keys)) for s in specs] == ref
    assert len({s.class_id for s in specs}) == 20


def test_hsnet_three_image_class_hand_checked(tmp_path: Path) -> None:
    src = FolderSource(root=_folder(tmp_path, ["a", "b", "c"]), class_name="thing")
    specs = sample_episodes(src, shots=2, seed=0, n_episodes=6)
    rng = np.random.RandomState(0)
    expected = []
    for i in range(6):
        query = ["a", "b", "c"][i % 3]
        sup: list[str] = []
        while len(sup) < 2:
            s = rng.choice(["a", "b", "c"], 1, replace=False)[0]
            if s != query:
                sup.append(str(s))
        expected.append((query, tuple(sup)))
    assert [(s.query_keys[0], s.support_keys) for s in specs] == expected
    # by hand: RandomState(0).permutation(3)[0] gives 2 2 | 0 2 | 2 1 1 | 0 0 1 0 0 2 ..., i.e.
    # query a: c c;  query b: a c;  query c: (c rejected) b b;  query a: (a a rejected) b, (a a) c
    assert expected[:4] == [("a", ("c", "c")), ("b", ("a", "c")), ("c", ("b", "b")), ("a", ("b", "c"))]
    assert any(s.support_keys[0] == s.support_keys[1] for s in specs)  # HSNet allows duplicate supports
    assert all(s.query_keys[0] not in s.support_keys for s in specs)
    with pytest.raises(FsdiffError, match=r"class 0 \(thing\).*3 image\(s\).*3 support shot"):
        sample_episodes(src, shots=3)


# -- BAM ------------------------------------------------------------------------------------
class _TableSource(FewShotSource):
    """A source defined by per-image class pixel counts (BAM's protocol needs nothing else)."""

    name = "table"

    def __init__(self, pixels: dict[str, dict[int, int]], classes: list[int]) -> None:
        super().__init__()
        self.pixels = pixels
        self.classes = [(c, f"c{c}") for c in classes]

    def image_keys(self) -> list[str]:
        return list(self.pixels)

    def class_pixels(self, image_key: str) -> dict[int, int]:
        return {c: n for c, n in self.pixels[image_key].items() if c in self.class_ids()}

    def images_of_class(self, class_id: int) -> list[str]:
        return [k for k, p in self.pixels.items() if p.get(class_id, 0) > 0]

    def query_items(self) -> list[tuple[str, int]]:
        return [(k, c) for k, p in self.pixels.items() for c in sorted(p)]

    def load(self, image_key: str, class_id: int):
        raise AssertionError("BAM sampling must work from the pixel counts alone, without loading images")


PIXELS = {
    "i0": {1: 5000, 2: 100},
    "i1": {1: 3000},
    "i2": {2: 9000, 3: 2048},
    "i3": {3: 2047, 7: 99999},
    "i4": {1: 2500, 2: 2500, 3: 2500},
    "i5": {2: 4000},
    "i6": {7: 5000},
    "i7": {1: 2100, 3: 8000},
}


class _BamLikeDataset(torch.utils.data.Dataset):
    """BAM's SemData list building (make_dataset) and __getitem__ sampling, written out."""

    def __init__(self, pixels: dict[str, dict[int, int]], sub_val_list: list[int], shot: int) -> None:
        self.shot = shot
        self.data_list, self.sub_class_file_list = [], {c: [] for c in sub_val_list}
        self.labels = {}
        for name, px in pixels.items():
            label_class = [c for c in sorted(px) if c in sub_val_list and px[c] >= 2 * 32 * 32]
            if label_class:
                self.data_list.append(name)
                for c in label_class:
                    self.sub_class_file_list[c].append(name)
            self.labels[name] = [c for c in sorted(px) if c in sub_val_list]

    def __len__(self) -> int:
        return len(self.data_list)

    def __getitem__(self, index: int) -> str:
        image_path = self.data_list[index]
        label_class = self.labels[image_path]
        class_chosen = label_class[random.randint(1, len(label_class)) - 1]
        file_class_chosen = self.sub_class_file_list[class_chosen]
        num_file = len(file_class_chosen)
        support_image_path_list, support_idx_list = [], []
        for _ in range(self.shot):
            support_idx = random.randint(1, num_file) - 1
            support_image_path = image_path
            while support_image_path == image_path or support_idx in support_idx_list:
                support_idx = random.randint(1, num_file) - 1
                support_image_path = file_class_chosen[support_idx]
            support_idx_list.append(support_idx)
            support_image_path_list.append(support_image_path)
        return json.dumps([image_path, class_chosen, support_image_path_list])


def _bam_reference(dataset: _BamLikeDataset, workers: int, runs: int, test_num: int) -> list[list]:
    """BAM test.py: 5 seeds from np.random(123); per seed setup_seed + db_epoch passes of the loader."""
    kwargs = {"multiprocessing_context": "fork"} if workers else {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, num_workers=workers, **kwargs)
    out = []
    with global_rng_saved():
        random.seed(123)
        np.random.seed(123)
        torch.manual_seed(123)
        seed_array = np.random.randint(0, 1000, runs)
        for val_seed in seed_array:
            random.seed(int(val_seed))
            np.random.seed(val_seed)
            torch.manual_seed(val_seed)
            iter_num = 0
            for _ in range(math.ceil(test_num / (len(loader) - 1))):
                for batch in loader:
                    if iter_num >= test_num:
                        break
                    iter_num += 1
                    out.append(json.loads(batch[0]))
    return out


def test_bam_seeds() -> None:
    assert bam_seeds() == [510, 365, 382, 322, 988]


@pytest.mark.parametrize("workers", [0, 2])
def test_bam_matches_reference(workers: int) -> None:
    src = _TableSource(PIXELS, classes=[1, 2, 3])
    specs = sample_episodes(src, protocol="bam", shots=2, n_episodes=13, runs=2, workers=workers)
    ref = _bam_reference(_BamLikeDataset(PIXELS, [1, 2, 3], shot=2), workers, runs=2, test_num=13)
    assert len(specs) == 26 and specs[13].episode_id == "r1-00000"
    assert [[s.query_keys[0], s.class_id, list(s.support_keys)] for s in specs] == ref
    assert all(len(set(s.support_keys)) == 2 and s.query_keys[0] not in s.support_keys for s in specs)
    assert "i3" not in {s.query_keys[0] for s in specs}  # class 3 there has 2047 < 2048 pixels


def test_bam_on_voc_mini(voc: Path, splits: Path) -> None:
    src = PascalSource(root=voc, fold=2, splits_dir=splits)  # person (15) in two of the three images
    specs = sample_episodes(src, protocol="bam", shots=1, n_episodes=4)
    assert [s.query_keys[0] for s in specs[:4]] == ["2011_000003", "2011_000006"] * 2
    assert all(s.class_id == 15 and s.support_keys[0] != s.query_keys[0] for s in specs)
    with pytest.raises(FsdiffError, match="besides the query"):
        sample_episodes(PascalSource(root=voc, fold=1, splits_dir=splits), protocol="bam", n_episodes=4)


# -- determinism, files, episodes --------------------------------------------------------------
def _digest(specs: list[EpisodeSpec]) -> str:
    return hashlib.sha256(json.dumps([dataclasses.astuple(s) for s in specs]).encode()).hexdigest()


def test_deterministic_across_calls_and_processes(voc: Path, splits: Path) -> None:
    src = PascalSource(root=voc, fold=1, splits_dir=splits)
    a = sample_episodes(src, shots=5)
    assert a == sample_episodes(src, shots=5)
    assert a != sample_episodes(src, shots=5, seed=1)
    code = (
        "import sys, json, hashlib, dataclasses\n"
        "from fsdiff.data import PascalSource, sample_episodes\n"
        "s = PascalSource(root=sys.argv[1], fold=1, splits_dir=sys.argv[2])\n"
        "sp = sample_episodes(s, shots=5)\n"
        "print(hashlib.sha256(json.dumps([dataclasses.astuple(x) for x in sp]).encode()).hexdigest())\n"
    )
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONHASHSEED": hash_seed}
        res = subprocess.run([sys.executable, "-c", code, str(voc), str(splits)], env=env,
                             capture_output=True, text=True, check=True)  # fmt: skip
        assert res.stdout.strip() == _digest(a)


def test_episode_list_round_trip(voc: Path, splits: Path, tmp_path: Path) -> None:
    src = PascalSource(root=voc, fold=3, splits_dir=splits)
    specs = sample_episodes(src, shots=5, n_episodes=50)
    meta = episode_meta(src, "hsnet", shots=5, n_episodes=50)
    assert {k: meta[k] for k in ("dataset", "fold", "split", "shots", "protocol", "seed")} == {
        "dataset": "pascal", "fold": 3, "split": "val", "shots": 5, "protocol": "hsnet", "seed": 0}  # fmt: skip
    path = tmp_path / "lists" / "pascal-f3-5shot.json"
    save_episode_list(path, specs, meta)
    assert json.loads(path.read_text())["meta"]["fold"] == 3
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    back, back_meta = load_episode_list(path)
    assert back == specs and back_meta == meta
    bam_meta = episode_meta(src, "bam", shots=1)
    assert bam_meta["run_seeds"] == [510, 365, 382, 322, 988] and bam_meta["workers"] == 8
    assert episode_meta(src, "bam", shots=1, runs=2)["run_seeds"] == [510, 365]
    with pytest.raises(FsdiffError, match="shots=1"):
        save_episode_list(tmp_path / "bad.json", specs, {**meta, "shots": 1})


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("{oops", "not valid JSON"),
        (json.dumps({"meta": {}, "episodes": []}), "not an fsdiff episode list"),
        (json.dumps({"format": "fsdiff-episode-list", "meta": {"dataset": "x"}, "episodes": []}), "meta"),
        (json.dumps({"format": "fsdiff-episode-list", "meta": dict.fromkeys(("dataset", "fold", "shots", "protocol", "seed"), 0),
                     "episodes": [{"id": "a", "class_id": "1", "query": ["q"], "support": []}]}), "episode 0"),
        (json.dumps({"format": "fsdiff-episode-list", "meta": dict.fromkeys(("dataset", "fold", "shots", "protocol", "seed"), 1),
                     "episodes": [{"id": "a", "class_id": 1, "query": ["q"], "support": []}]}), "shots=1"),  # fmt: skip
    ],
)
def test_malformed_episode_list(tmp_path: Path, content: str, pattern: str) -> None:
    path = tmp_path / "e.json"
    path.write_text(content)
    with pytest.raises(FsdiffError, match=pattern) as exc:
        load_episode_list(path)
    assert str(path) in str(exc.value)
    with pytest.raises(FsdiffError, match="not found"):
        load_episode_list(tmp_path / "missing.json")
    with pytest.raises(FsdiffError, match="meta lacks"):
        save_episode_list(tmp_path / "x.json", [], {"dataset": "x"})


def test_build_episode_and_bad_arguments(tmp_path: Path) -> None:
    src = FolderSource(root=_folder(tmp_path, ["a", "b", "c", "d"]))
    spec = sample_episodes(src, shots=2, n_episodes=1)[0]
    ep = build_episode(src, spec)
    assert isinstance(ep, Episode) and ep.k == 2 and ep.episode_id == "00000"
    assert ep.queries[0].image_id == spec.query_keys[0] and ep.queries[0].gt.max() == 1
    assert ep.meta["dataset"] == "folder"
    with pytest.raises(FsdiffError, match="protocol"):
        sample_episodes(src, protocol="panet")
    with pytest.raises(FsdiffError, match="shots"):
        sample_episodes(src, shots=-1)
    zero = sample_episodes(src, shots=0, n_episodes=2)
    assert all(s.support_keys == () for s in zero)
