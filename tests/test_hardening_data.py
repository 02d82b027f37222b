"""Hardening of the data side against hostile or broken inputs (issue #12): paths that leave their
dataset folder, polygons and RLE that would crash or flood pycocotools, malformed json, decompression
bombs, misleading masks/boxes/scribbles, cache folders that are not caches, output permissions."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsdiff.augment.cache import (
    MARKER_NAME,
    GenerationCache,
    cache_key,
    is_generation_cache,
)
from fsdiff.augment.generate import GenerationConfig
from fsdiff.augment.pregenerate import check_cache, list_cache
from fsdiff.data import (
    CocoSource,
    FolderSource,
    PascalSource,
    build_episode,
    load_episode_list,
)
from fsdiff.data.sampler import EpisodeSpec, sample_episodes, save_episode_list
from fsdiff.episode import BoxAnnotation, MaskAnnotation, Shot
from fsdiff.errors import FsdiffError
from fsdiff.io import (
    atomic_path,
    read_image,
    read_json,
    read_mask,
    read_scribble,
    write_image,
    write_text,
)
from fsdiff.limits import (
    FOLLOW_SYMLINKS_ENV,
    MAX_EPISODES,
    MAX_GENERATION_RESOLUTION,
    MAX_IMAGE_PIXELS,
    MAX_SIDE,
    check_count,
    check_side,
)

SRC = Path(__file__).resolve().parents[1] / "src"


# -- helpers -------------------------------------------------------------------------------------
def _jpg(path: Path, h: int = 48, w: int = 64, value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path


def _coco(root: Path, names: list[str], segm: object = None, images: dict | None = None) -> Path:
    """A COCO json in ``root`` with one 64x48 image per name, one annotation each (id 100 + i)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    poly = [[4.0, 4.0, 30.0, 4.0, 30.0, 30.0, 4.0, 30.0]]
    js = {
        "images": [{"id": i + 1, "file_name": n, "height": 48, "width": 64, **(images or {})} for i, n in enumerate(names)],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 100 + i, "image_id": i + 1, "category_id": 1, "segmentation": segm if segm is not None else poly}
                        for i in range(len(names))],
    }
    (root / "instances.json").write_text(json.dumps(js).replace('"1e999"', "1e999"))  # a literal that parses as inf
    return root / "instances.json"


def _png_header(path: Path, width: int, height: int, bit_depth: int = 1, color_type: int = 0) -> Path:
    """A PNG whose header claims ``width`` x ``height`` but that holds no pixel data (a bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


# -- 1. paths from data files stay inside their folder -------------------------------------------
@pytest.mark.parametrize("name", ["../../../../outside/X.jpg", "ABS", "../../../../../../etc/passwd"])
def test_coco_file_name_leading_outside_is_refused(tmp_path, name):
    outside = _jpg(tmp_path / "outside" / "X.jpg")
    if name == "ABS":
        name = str(outside)
    ann = _coco(tmp_path / "a" / "b" / "c" / "ds", [name])
    src = CocoSource(root=ann.parent, fold=None)
    with pytest.raises(FsdiffError) as err:
        src.load(name, 0)
    msg = str(err.value)
    assert f"file_name {name!r} (image id 1) in {ann}" in msg and "leads outside" in msg
    with pytest.raises(FsdiffError, match="leads outside"):
        src.check()


def test_coco_symlinked_image_pointing_outside_is_refused_unless_allowed(tmp_path, monkeypatch):
    outside = _jpg(tmp_path / "elsewhere" / "X.jpg")
    ann = _coco(tmp_path / "ds", ["X.jpg"])
    (ann.parent / "images" / "X.jpg").symlink_to(outside)
    src = CocoSource(root=ann.parent, fold=None)
    with pytest.raises(FsdiffError) as err:
        src.load("X.jpg", 0)
    assert f"file_name 'X.jpg' (image id 1) in {ann}" in str(err.value)
    assert "symbolic link" in str(err.value) and FOLLOW_SYMLINKS_ENV in str(err.value)
    monkeypatch.setenv(FOLLOW_SYMLINKS_ENV, "1")
    image, mask = src.load("X.jpg", 0)
    assert image.shape == (48, 64, 3) and mask[4:30, 4:30].all()


def test_coco_legit_names_keep_working(tmp_path):
    ann = _coco(tmp_path / "ds", ["train2014/a.jpg", "/data/upload/1/b.jpg", "../images/c.jpg"])
    for rel in ("train2014/a.jpg", "b.jpg", "c.jpg"):
        _jpg(ann.parent / "images" / rel)
    src = CocoSource(root=ann.parent, fold=None)
    assert src.check() == []
    assert src.image_path("/data/upload/1/b.jpg") == ann.parent / "images" / "b.jpg"  # basename fallback inside
    for key in src.image_keys():
        assert src.load(key, 0)[0].shape == (48, 64, 3)


def test_folder_dataset_symlink_out_of_root(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    _jpg(root / "images" / "a.jpg")
    outside = _jpg(tmp_path / "elsewhere" / "b.jpg")
    (root / "images" / "b.jpg").symlink_to(outside)
    _jpg(root / "images" / "c.jpg")
    (root / "images" / "c_link.jpg").symlink_to(root / "images" / "c.jpg")  # a link inside the folder is fine
    (root / "masks").mkdir()
    for stem in ("a", "b", "c", "c_link"):
        m = np.zeros((48, 64), np.uint8)
        m[5:20, 5:20] = 255
        Image.fromarray(m).save(root / "masks" / f"{stem}.png")
    src = FolderSource(root)
    assert src.load("a", 0)[0].shape == (48, 64, 3) and src.load("c_link", 0)[1].sum() == 15 * 15
    with pytest.raises(FsdiffError) as err:
        src.load("b", 0)
    assert f"image 'b' of the folder dataset {root}" in str(err.value) and "symbolic link" in str(err.value)
    monkeypatch.setenv(FOLLOW_SYMLINKS_ENV, "1")
    assert src.load("b", 0)[0].shape == (48, 64, 3)


def _pascal(tmp_path: Path) -> tuple[Path, Path]:
    voc, splits = tmp_path / "voc", tmp_path / "splits"
    (voc / "SegmentationClass").mkdir(parents=True)
    (splits / "pascal" / "val").mkdir(parents=True)
    lines = []
    for i in range(3):
        _jpg(voc / "JPEGImages" / f"im{i}.jpg", 20, 24)
        lab = np.zeros((20, 24), np.uint8)
        lab[3:12, 4:14] = 1
        Image.fromarray(lab).save(voc / "SegmentationClass" / f"im{i}.png")
        lines.append(f"im{i}__1")
    (splits / "pascal" / "val" / "fold0.txt").write_text("\n".join(lines) + "\n")
    return voc, splits


def test_episode_list_keys_cannot_leave_the_dataset(tmp_path):
    voc, splits = _pascal(tmp_path)
    src = PascalSource(root=voc, fold=0, splits_dir=splits)
    _jpg(tmp_path / "secret.jpg", 20, 24)
    good = EpisodeSpec("0", 1, ("im0",), ("im1",))
    assert build_episode(src, good).k == 1
    for key in ("../../secret", str(tmp_path / "secret"), "../JPEGImages/../../secret"):
        path = tmp_path / f"list{len(key)}.json"
        save_episode_list(path, [EpisodeSpec("0", 1, ("im0",), (key,))], {**src.describe(), "protocol": "hsnet",
                                                                            "shots": 1, "seed": 0})
        specs, _ = load_episode_list(path)  # keys are names; the source resolves them
        with pytest.raises(FsdiffError) as err:
            build_episode(src, specs[0])
        assert f"PASCAL image id {key!r}" in str(err.value) and "leads outside" in str(err.value)
    # the same for a fold list line
    (splits / "pascal" / "val" / "fold0.txt").write_text("../../secret__1\n")
    with pytest.raises(FsdiffError, match=r"fold0\.txt line 1: expected IMAGEID__CLASS"):
        PascalSource(root=voc, fold=0, splits_dir=splits)


def test_cache_record_and_files_cannot_leave_the_cache(tmp_path):
    root = tmp_path / "cache"
    cache = GenerationCache(root)
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    secret = tmp_path / "secret.png"
    Image.fromarray(img).save(secret)
    # a record naming a file outside its entry
    k1 = cache_key(x=1)
    cache.put(k1, img)
    rec_path = cache.entry_dir(k1) / "meta.json"
    rec = json.loads(rec_path.read_text())
    rec["files"]["image"]["name"] = "../../../secret.png"
    rec_path.write_text(json.dumps(rec))
    assert GenerationCache(root, verify=False).get(k1) is None  # not a valid record: a miss
    assert any(f"{cache.entry_dir(k1)}: meta.json is unreadable" in p for p in cache.check())
    # an entry whose image.png is a symlink out of the cache
    k2 = cache_key(x=2)
    cache.put(k2, img)
    (cache.entry_dir(k2) / "image.png").unlink()
    (cache.entry_dir(k2) / "image.png").symlink_to(secret)
    problems = cache.check()
    assert any("cache file image.png of entry" in p and "symbolic link" in p for p in problems)
    with pytest.raises(FsdiffError, match=r"cache file image\.png of entry .*symbolic link"):
        GenerationCache(root, verify=False).get(k2)
    assert cache.get(k2) is None  # verified: a miss, never the outside file
    # an entry folder that is a link out of the cache is never written into
    k3 = cache_key(x=3)
    cache.entry_dir(k3).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "victim").mkdir()
    cache.entry_dir(k3).symlink_to(tmp_path / "victim")
    with pytest.raises(FsdiffError, match="symbolic link"):
        cache.put(k3, img)
    assert list((tmp_path / "victim").iterdir()) == []


# -- 2. COCO annotations are validated before rasterising ----------------------------------------
_MEMCAP = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    from fsdiff.data import CocoSource
    from fsdiff.errors import FsdiffError
    try:
        CocoSource(root=sys.argv[1], fold=None).load("a.jpg", 0)
    except FsdiffError as exc:
        print("FSDIFF:", exc)
        sys.exit(3)
    print("LOADED")
""")


@pytest.mark.parametrize("segm, expect", [
    ([[0, 0, 1e9, 0, 1e9, 1e9]], r"annotation 100 has an unreadable segmentation \(polygon 0 has the vertex \(1e\+09"),
    ([[0, 0, 1e8, 0, 1e8, 1e8]], r"annotation 100 .*outside the 64x48 image"),
    ([[0, 0, "1e999", 0, 10, 10]], r"annotation 100 .*non-finite coordinate"),
    ([[0, 0, 60, 0, 60, 40] * 20000], r"annotation 100 .*outlines are .* pixels long"),
    ({"size": [48, 64], "counts": [0, 48 * 64 * 100]}, r"annotation 100 .*negative or oversized run"),
    ({"size": [48, 64], "counts": "0nnnnnnn0"}, r"annotation 100 .*more than 6 characters"),
    ({"size": [48, 64], "counts": "Q3"}, r"annotation 100 .*RLE runs cover .* not height\*width = 3,072"),
])
def test_hostile_segmentations_fail_fast_under_a_memory_cap(tmp_path, segm, expect):
    ann = _coco(tmp_path / "ds", ["a.jpg"], segm=segm)
    _jpg(ann.parent / "images" / "a.jpg")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _MEMCAP, str(ann.parent)], check=False, capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert str(ann) in r.stdout
    assert re.search(expect, r.stdout), r.stdout


def test_valid_rle_still_decodes(tmp_path):
    from pycocotools import mask as mask_utils

    m = np.zeros((48, 64), np.uint8)
    m[10:30, 5:50] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    ann = _coco(tmp_path / "ds", ["a.jpg"], segm=rle)
    _jpg(ann.parent / "images" / "a.jpg")
    assert np.array_equal(CocoSource(root=ann.parent, fold=None).load("a.jpg", 0)[1], m)
    flat = m.T.ravel().astype(int)  # COCO runs are column-major and start with a run of 0s
    runs = [int(v) for v in np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size])]
    assert flat[0] == 0 and sum(runs) == m.size
    ann = _coco(tmp_path / "ds2", ["a.jpg"], segm={"size": [48, 64], "counts": runs})
    _jpg(ann.parent / "images" / "a.jpg")
    assert np.array_equal(CocoSource(root=ann.parent, fold=None).load("a.jpg", 0)[1], m)


@pytest.mark.parametrize("where, patch, expect", [
    ("images", {"id": "abc"}, r"images\[0\] has id 'abc', not an integer"),
    ("images", {"id": [1]}, r"images\[0\] has id \[1\], not an integer"),
    ("images", {"height": "abc"}, r"images\[0\] \(id 1\) has height 'abc', not an integer"),
    ("images", {"width": [640]}, r"images\[0\] \(id 1\) has width \[640\], not an integer"),
    ("images", {"height": 100000, "width": 100000}, r"images\[0\] \(id 1\) \('a.jpg'\) is 100000x100000"),
    ("images", {"file_name": ["a.jpg"]}, r"images\[0\] \(id 1\) has file_name \['a.jpg'\]"),
    ("categories", {"id": {"a": 1}}, r"categories\[0\] has id \{'a': 1\}, not an integer"),
    ("annotations", {"image_id": [1]}, r"annotation 100 has image_id \[1\], not an integer"),
    ("annotations", {"category_id": None}, r"annotation 100 has category_id None, not an integer"),
    ("annotations", {"id": {"x": 1}}, r"annotations\[0\] has id \{'x': 1\}, not an integer"),
    ("annotations", {"segmentation": "polygon"}, r"annotation 100 has a segmentation of type str"),
])
def test_malformed_coco_entries_are_named(tmp_path, where, patch, expect):
    ann = _coco(tmp_path / "ds", ["a.jpg"])
    js = json.loads(ann.read_text())
    js[where][0].update(patch)
    ann.write_text(json.dumps(js))
    with pytest.raises(FsdiffError, match=expect) as err:
        CocoSource(root=ann.parent, fold=None)
    assert str(ann) in str(err.value)


@pytest.mark.parametrize("text, expect", [
    ("[" * 100000 + "]" * 100000, "nests lists or objects more than"),
    ('{"images": [], "annotations": [], "categories": [{"id": NaN, "name": "x"}]}', r"categories\[0\] has id nan"),
    ('{"images": [{"id": ' + "9" * 5000 + "}]}", "digits"),
    ('{"images": [', "is not valid JSON"),
])
def test_hostile_json_gives_clear_errors(tmp_path, text, expect):
    path = tmp_path / "instances.json"
    path.write_text(text)
    with pytest.raises(FsdiffError, match=expect) as err:
        CocoSource(ann=path)
    assert str(path) in str(err.value)


def test_json_size_limit(tmp_path, monkeypatch):
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"x": "y" * 200}))
    monkeypatch.setenv("FSDIFF_MAX_JSON_BYTES", "100")
    with pytest.raises(FsdiffError, match=rf"episode list {path} is 2\d\d bytes, above the limit of 100 bytes"):
        load_episode_list(path)
    monkeypatch.delenv("FSDIFF_MAX_JSON_BYTES")
    path.write_text('{"format": "fsdiff-episode-list", "x": NaN}')
    with pytest.raises(FsdiffError, match=rf"episode list {path}: the file holds NaN, which is not a JSON number"):
        load_episode_list(path)
    monkeypatch.setenv("FSDIFF_MAX_JSON_BYTES", "lots")
    with pytest.raises(FsdiffError, match="FSDIFF_MAX_JSON_BYTES='lots' is not a positive integer"):
        read_json(path, "x")


def test_sampling_bounds(tmp_path):
    src = FolderSource(_folder_for_sampling(tmp_path))
    with pytest.raises(FsdiffError, match=r"n_episodes=2000000 exceeds the limit of 1,000,000 episodes \(MAX_EPISODES\)"):
        sample_episodes(src, "hsnet", 2_000_000, 1)
    with pytest.raises(FsdiffError, match=r"shots=5000 exceeds the limit of 1,000 shots"):
        sample_episodes(src, "hsnet", 3, 5000)
    assert len(sample_episodes(src, "hsnet", 3, 1)) == 3


def _folder_for_sampling(root: Path) -> Path:
    for i in range(3):
        _jpg(root / "images" / f"x{i}.jpg")
        (root / "masks").mkdir(exist_ok=True)
        m = np.zeros((48, 64), np.uint8)
        m[5:20, 5:20] = 255
        Image.fromarray(m).save(root / "masks" / f"x{i}.png")
    return root


def test_episode_list_bounds(tmp_path, monkeypatch):
    meta = {"dataset": "folder", "fold": None, "shots": 1, "protocol": "hsnet", "seed": 0}
    path = tmp_path / "eps.json"
    save_episode_list(path, [EpisodeSpec(str(i), 0, ("q",), ("s",)) for i in range(3)], meta)
    assert len(load_episode_list(path)[0]) == 3
    monkeypatch.setenv(MAX_EPISODES.env, "2")
    with pytest.raises(FsdiffError, match=rf"episode list {path} holds 3 episodes, above the limit of 2"):
        load_episode_list(path)
    monkeypatch.delenv(MAX_EPISODES.env)
    data = json.loads(path.read_text())
    data["episodes"][1]["support"] = ["x" * 5000]
    path.write_text(json.dumps(data))
    with pytest.raises(FsdiffError, match=rf"episode list {path}: episode 1 is malformed"):
        load_episode_list(path)


# -- 3. size limits, checked before decoding -----------------------------------------------------
def test_decompression_bomb_header_is_refused_before_decoding(tmp_path):
    bomb = _png_header(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(FsdiffError) as err:
        read_image(bomb)
    msg = str(err.value)  # PIL's own bomb check fires inside Image.open at this size: its pixel count is quoted
    assert f"image {bomb} is too large (900,000,000 pixels" in msg
    assert f"limit of {MAX_IMAGE_PIXELS.default:,} pixels" in msg and "FSDIFF_MAX_IMAGE_PIXELS" in msg
    big = _png_header(tmp_path / "big.png", 12000, 12000)
    with pytest.raises(FsdiffError, match=rf"mask {big} is 12000x12000"):
        read_mask(big)


def test_real_one_bit_png_above_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "m.png"
    Image.new("1", (400, 300)).save(path)  # 120,000 pixels, a few hundred bytes on disk
    monkeypatch.setenv(MAX_IMAGE_PIXELS.env, "100000")
    with pytest.raises(FsdiffError, match=rf"image {path} is 400x300 = 120,000 pixels, above the limit of 100,000"):
        read_image(path)
    monkeypatch.setenv(MAX_IMAGE_PIXELS.env, "120000")
    assert read_image(path).shape == (300, 400, 3)
    assert read_image(path, max_pixels=200_000).shape == (300, 400, 3)
    with pytest.raises(FsdiffError, match="pass a larger max_pixels"):
        read_image(path, max_pixels=1000)


def test_pil_decompression_bomb_error_becomes_an_fsdiff_error(tmp_path, monkeypatch):
    path = _jpg(tmp_path / "a.jpg", 40, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses > 200 pixels inside Image.open
    with pytest.raises(FsdiffError, match=rf"image {path} is too large \(1,600 pixels, above the limit of 150 pixels"):
        read_image(path, max_pixels=150)
    assert read_image(path, max_pixels=2000).shape == (40, 40, 3)  # PIL's limit follows a larger fsdiff limit


def test_limit_checks_for_arguments(monkeypatch):
    assert check_side(512, "input_size") == 512
    with pytest.raises(FsdiffError, match=r"input_size=100000 exceeds the limit of 2,048 pixels \(MAX_SIDE\).*FSDIFF_MAX_SIDE"):
        check_side(100000, "input_size")
    with pytest.raises(FsdiffError, match="input_size must be an integer"):
        check_side(3.5, "input_size")
    with pytest.raises(FsdiffError, match="too small"):
        check_side(0, "input_size")
    monkeypatch.setenv(MAX_SIDE.env, "100000")
    assert check_side(100000, "input_size") == 100000
    with pytest.raises(FsdiffError, match=r"episodes=2000000 exceeds the limit of 1,000,000 episodes"):
        check_count(2_000_000, "episodes", MAX_EPISODES)
    with pytest.raises(FsdiffError, match=r"resolution=100000 exceeds .*FSDIFF_MAX_GENERATION_RESOLUTION"):
        GenerationConfig().replace(resolution=100000)
    assert GenerationConfig().replace(resolution=768).resolution == 768
    monkeypatch.setenv(MAX_GENERATION_RESOLUTION.env, "2048")
    assert GenerationConfig().replace(resolution=2048).resolution == 2048


# -- 4. clear messages ---------------------------------------------------------------------------
def _binary(h: int = 64, w: int = 80) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[16:48, 20:60] = 255
    return m


def test_jpeg_mask_says_resave_as_png(tmp_path):
    path = tmp_path / "m.jpg"
    yy, xx = np.mgrid[:64, :80]
    Image.fromarray(np.where((yy - 30) ** 2 + (xx - 41) ** 2 < 17**2, 255, 0).astype(np.uint8)).save(path, quality=90)
    for cv in (None, 1):
        with pytest.raises(FsdiffError, match=rf"mask {path} .*it is a JPEG.*re-save the mask as PNG"):
            read_mask(path, class_value=cv)
    blurred = tmp_path / "blur.png"  # a PNG saved from a decoded JPEG: same signature, no JPEG format
    Image.open(path).save(blurred)
    with pytest.raises(FsdiffError, match=rf"mask {blurred} looks like a binary 0/255 mask.*re-save the mask as PNG"):
        read_mask(blurred)
    voc = np.zeros((20, 20), np.uint8)
    voc[2:8, 2:8], voc[10:15, 10:15], voc[8, :] = 3, 15, 255  # a class-index mask still asks for a class
    Image.fromarray(voc).save(tmp_path / "voc.png")
    with pytest.raises(FsdiffError, match="class-index or palette mask"):
        read_mask(tmp_path / "voc.png")


def test_class_value_255_is_refused(tmp_path):
    Image.fromarray(_binary()).save(tmp_path / "m.png")
    with pytest.raises(FsdiffError, match=rf"mask {tmp_path / 'm.png'}: class_value=255 is the ignore label"):
        read_mask(tmp_path / "m.png", class_value=255)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_only_mask_uses_the_alpha_channel(tmp_path, mode):
    alpha = _binary()
    alpha[16:48, 19] = 100  # an anti-aliased edge below the 128 threshold
    color = np.zeros((*alpha.shape, 3 if mode == "RGBA" else 1), np.uint8)
    Image.fromarray(np.dstack([color, alpha]).squeeze() if mode == "RGBA" else np.dstack([color[..., 0], alpha]),
                    mode=mode).save(tmp_path / "a.png")
    mask = read_mask(tmp_path / "a.png")
    np.testing.assert_array_equal(mask, (_binary() == 255).astype(np.uint8))


def test_normalised_box_is_refused():
    img = np.zeros((480, 640, 3), np.uint8)
    with pytest.raises(FsdiffError, match=r"support s: box \(0.1, 0.2, 0.5, 0.9\) looks normalised.*pixels of the 640x480"
                                          r".*64,96,320,432"):
        Shot(img, BoxAnnotation((0.1, 0.2, 0.5, 0.9)), image_id="s")
    assert Shot(np.zeros((4, 4, 3), np.uint8), BoxAnnotation((0, 0, 1, 1))).annotation.box == (0, 0, 1, 1)
    assert Shot(img, BoxAnnotation((0, 0, 2, 1))).shape == (480, 640)


def test_photo_passed_as_scribble_is_refused(tmp_path):
    photo = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    with pytest.raises(FsdiffError, match=rf"scribble {tmp_path / 'photo.png'} does not look like a scribble.*a photo"):
        read_scribble(tmp_path / "photo.png")
    white = np.full((60, 80), 255, np.uint8)
    white[20:30, 10:70] = 0
    Image.fromarray(white).save(tmp_path / "white.png")
    with pytest.raises(FsdiffError, match=rf"scribble {tmp_path / 'white.png'} .*strokes \(255 or 1\) cover 88%"):
        read_scribble(tmp_path / "white.png")
    s = np.zeros((60, 80), np.uint8)
    s[30, 10:70], s[31, 10:70], s[5, 5:20] = 255, 200, 128  # a stroke with an anti-aliased edge, a bg stroke
    Image.fromarray(s).save(tmp_path / "s.png")
    np.testing.assert_array_equal(read_scribble(tmp_path / "s.png"), s)


def test_all_255_masks_are_refused(tmp_path):
    img = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(FsdiffError, match="support s: every pixel of the support mask is 255, the ignore label"):
        Shot(img, MaskAnnotation(np.full((20, 30), 255, np.uint8)), image_id="s")
    Image.fromarray(np.full((20, 30), 255, np.uint8)).save(tmp_path / "white.png")
    with pytest.raises(FsdiffError, match=rf"mask {tmp_path / 'white.png'} is 255 everywhere.*save the mask as all 1"):
        read_mask(tmp_path / "white.png")
    Image.fromarray(np.ones((20, 30), np.uint8)).save(tmp_path / "ones.png")
    assert read_mask(tmp_path / "ones.png").all()  # the way to say "the object fills the image"


def test_missing_episode_list_names_the_command_that_writes_one(tmp_path):
    with pytest.raises(FsdiffError, match=rf"episode list {tmp_path / 'none.json'} not found; write one with save_episodes=FILE"):
        load_episode_list(tmp_path / "none.json")


def test_cache_commands_refuse_files_and_foreign_folders(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for fn in (list_cache, check_cache):
        with pytest.raises(FsdiffError, match=rf"cache {f} is a file, not a folder"):
            fn(f)
    foreign = tmp_path / "etc"
    foreign.mkdir()
    (foreign / "passwd").write_text("root:x:0:0")
    (foreign / "ab").mkdir()
    for fn in (list_cache, check_cache):
        with pytest.raises(FsdiffError, match=rf"folder {foreign} is not a DifFSS generation cache"):
            fn(foreign)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FsdiffError, match="is not a DifFSS generation cache"):
        check_cache(tmp_path / "empty")


def test_new_caches_are_marked_and_old_ones_stay_readable(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    new = GenerationCache(tmp_path / "new")
    assert (tmp_path / "new" / MARKER_NAME).is_file() and check_cache(tmp_path / "new")["ok"]
    old = tmp_path / "old"
    GenerationCache(old).put(cache_key(x=1), img)
    (old / MARKER_NAME).unlink()  # a cache written before the marker existed
    assert is_generation_cache(old) and [r["key"] for r in list_cache(old)] == [cache_key(x=1)]
    assert not (old / MARKER_NAME).exists()  # listing does not modify it
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    c = GenerationCache(busy)
    assert not (busy / MARKER_NAME).exists()  # a folder with content is marked on the first write only
    c.put(cache_key(x=2), img)
    assert (busy / MARKER_NAME).is_file() and check_cache(busy)["entries"] == 1
    assert new.root == tmp_path / "new"


# -- 5. permissions follow the umask -------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
        write_image(tmp_path / "b.png", np.zeros((4, 4, 3), np.uint8))
        with atomic_path(tmp_path / "c.bin") as tmp:
            tmp.write_bytes(b"x")
        cache = GenerationCache(tmp_path / "cache")
        item = cache.put(cache_key(x=1), np.zeros((4, 4, 3), np.uint8))
    finally:
        os.umask(old)
    files = [tmp_path / "a.txt", tmp_path / "b.png", tmp_path / "c.bin", item.path / "image.png",
             item.path / "meta.json", tmp_path / "cache" / MARKER_NAME]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(mode) for f in files}
