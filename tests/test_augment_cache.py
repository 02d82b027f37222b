"""The content-addressed DifFSS generation cache: keys, atomic commits, crashes, concurrent writers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fsdiff.augment import cache as cache_mod
from fsdiff.augment.cache import CACHE_FORMAT_VERSION, GenerationCache, cache_key, generation_key
from fsdiff.errors import FsdiffError

SRC = Path(__file__).resolve().parents[1] / "src"


def _img(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


BASE = dict(
    image_sha256="a" * 64, mask_sha256="b" * 64, class_name="dog", condition="seg",
    model_ids={"sd": "stable-diffusion-v1-5/stable-diffusion-v1-5", "controlnet": "lllyasviel/sd-controlnet-seg"},
    steps=20, guidance=9.0, seed=1234, resolution=512, scheduler="DDIMScheduler", eta=0.0,
    prompt="a real shot photo of dog,, best quality, extremely detailed", negative_prompt="longbody, lowres",
)


# ----------------------------------------------------------------------------------------------
# keys
# ----------------------------------------------------------------------------------------------


def test_key_is_sha256_hex_and_order_independent():
    k = cache_key(**BASE)
    assert len(k) == 64 and int(k, 16) >= 0
    assert cache_key(**dict(reversed(list(BASE.items())))) == k
    nested = dict(BASE, model_ids=dict(reversed(list(BASE["model_ids"].items()))))
    assert cache_key(**nested) == k
    assert cache_key(**dict(BASE, guidance=9)) == k  # 9 and 9.0 are the same setting
    assert cache_key(**dict(BASE, steps=20.0)) == k


@pytest.mark.parametrize("field", sorted(BASE))
def test_changing_any_field_changes_the_key(field):
    v = BASE[field]
    if isinstance(v, str):
        new = v + "x"
    elif isinstance(v, dict):
        new = dict(v, sd="other/model")
    elif isinstance(v, float):
        new = v + 0.5
    else:
        new = v + 1
    assert cache_key(**dict(BASE, **{field: new})) != cache_key(**BASE)


def test_key_includes_format_version_and_extra_fields(monkeypatch):
    k = cache_key(**BASE)
    assert cache_key(**BASE, fix_double_comma=True) != k
    monkeypatch.setattr(cache_mod, "CACHE_FORMAT_VERSION", CACHE_FORMAT_VERSION + 1)
    assert cache_mod.cache_key(**BASE) != k
    with pytest.raises(FsdiffError, match="reserved"):
        cache_key(fsdiff_cache_format=3)
    with pytest.raises(FsdiffError, match="finite"):
        cache_key(eta=float("nan"))
    with pytest.raises(FsdiffError, match="type"):
        cache_key(x=object())


def test_generation_key_hashes_arrays():
    img, mask = _img(0), np.zeros((32, 32), np.uint8)
    kw = dict(class_name="dog", condition="hed", model_ids=["a", "b"], steps=20, guidance=9.0, seed=1,
              resolution=512, scheduler="ddim", eta=0.0, prompt="p", negative_prompt="n")
    k = generation_key(image=img, mask=mask, **kw)
    assert generation_key(image=img.copy(), mask=mask.copy(), **kw) == k
    img2 = img.copy()
    img2[0, 0, 0] ^= 1
    assert generation_key(image=img2, mask=mask, **kw) != k
    mask2 = mask.copy()
    mask2[5, 5] = 1
    assert generation_key(image=img, mask=mask2, **kw) != k
    assert generation_key(image=img, mask=mask, **dict(kw, seed=2)) != k
    assert set(cache_mod.KEY_FIELDS) == set(BASE)


# ----------------------------------------------------------------------------------------------
# basic store
# ----------------------------------------------------------------------------------------------


def test_put_get_roundtrip_layout_and_stats(tmp_path):
    c = GenerationCache(tmp_path / "cache")
    key = cache_key(**BASE)
    assert c.get(key) is None and key not in c
    img, ctrl = _img(1), np.full((32, 32, 3), 120, np.uint8)
    item = c.put(key, img, ctrl, {"seed": 1234, "class": "dog"})
    assert np.array_equal(item.image, img) and np.array_equal(item.control, ctrl)
    got = c.get(key)
    assert got is not None and np.array_equal(got.image, img) and np.array_equal(got.control, ctrl)
    assert got.meta == {"seed": 1234, "class": "dog"}
    entry = tmp_path / "cache" / key[:2] / key
    assert got.path == entry
    assert {p.name for p in entry.iterdir()} == {"image.png", "control.png", "meta.json", ".lock"}
    rec = json.loads((entry / "meta.json").read_text())
    assert rec["format"] == CACHE_FORMAT_VERSION and rec["key"] == key
    assert rec["files"]["image"]["sha256"] == cache_mod.file_digest(entry / "image.png")
    assert key in c and c.contains(key) and c.list() == [key] and list(c) == [key] and len(c) == 1
    s = c.stats()
    assert (s.hits, s.misses, s.puts) == (1, 1, 1) and s.hit_rate == 0.5
    assert c.check() == []
    # put without control, overwrite: old control removed
    c.put(key, img, None, {}, overwrite=True)
    assert c.get(key).control is None and not (entry / "control.png").exists()


def test_put_existing_key_keeps_first_unless_overwrite(tmp_path):
    c = GenerationCache(tmp_path)
    key = cache_key(x=1)
    c.put(key, _img(1))
    assert np.array_equal(c.put(key, _img(2)).image, _img(1))
    assert np.array_equal(c.put(key, _img(2), overwrite=True).image, _img(2))


def test_bad_inputs(tmp_path):
    c = GenerationCache(tmp_path)
    with pytest.raises(FsdiffError, match="invalid cache key"):
        c.get("../../etc")
    with pytest.raises(FsdiffError, match="uint8"):
        c.put(cache_key(x=1), np.zeros((4, 4, 3), np.float32))
    with pytest.raises(FsdiffError, match="JSON"):
        c.put(cache_key(x=1), _img(0), meta={"a": object()})
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FsdiffError, match="not a folder"):
        GenerationCache(f)


def test_check_detects_corruption_and_get_treats_it_as_miss(tmp_path):
    c = GenerationCache(tmp_path)
    key = cache_key(x=2)
    c.put(key, _img(3), _img(4))
    entry = c.entry_dir(key)
    data = bytearray((entry / "image.png").read_bytes())
    data[-20] ^= 0xFF
    (entry / "image.png").write_bytes(bytes(data))
    problems = c.check()
    assert len(problems) == 1 and "image" in problems[0]
    assert c.get(key) is None
    os.unlink(entry / "control.png")
    assert any("missing" in p for p in c.check())
    c.put(key, _img(3), _img(4))  # a damaged entry is rewritten even without overwrite
    assert c.check() == [] and c.get(key) is not None


def test_failed_write_leaves_no_visible_entry(tmp_path, monkeypatch):
    c = GenerationCache(tmp_path)
    key = cache_key(x=3)
    real = cache_mod._write_bytes

    def failing(path, data):
        if path.name == "meta.json":
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(cache_mod, "_write_bytes", failing)
    with pytest.raises(OSError):
        c.put(key, _img(5))
    assert c.get(key) is None and key not in c and c.list() == [] and c.check() == []
    assert c.partial_files()  # the image file, with no record
    assert not list(c.entry_dir(key).glob("*.tmp"))  # _write_bytes never leaves its temp behind
    monkeypatch.setattr(cache_mod, "_write_bytes", real)
    assert c.cleanup_partial()
    assert c.partial_files() == []


# ----------------------------------------------------------------------------------------------
# crash and concurrency (real processes)
# ----------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, sys, tempfile, time
    from pathlib import Path
    import numpy as np
    import fsdiff.augment.cache as cache

    root, key, stage, marker, overwrite = sys.argv[1:6]
    real = cache._write_bytes

    def hang():
        Path(marker).write_text("ready")
        time.sleep(120)

    def slow(path, data):
        if stage == "mid-file" and path.name == "image.png":
            fd, tmp = tempfile.mkstemp(prefix=".image.png.", suffix=".tmp", dir=path.parent)
            os.write(fd, data[: len(data) // 2])
            hang()
        if stage == "before-record" and path.name == "meta.json":
            hang()
        real(path, data)

    cache._write_bytes = slow
    img = np.random.default_rng(7).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    cache.GenerationCache(root).put(key, img, img[..., ::-1].copy(), {"who": "child"}, overwrite=overwrite == "1")
    """
)


def _run_until_marker(tmp_path: Path, args: list[str]) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env)
    marker = Path(args[3])
    deadline = time.time() + 30
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early with {proc.returncode}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("child never reached the write")
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("stage", ["mid-file", "before-record"])
def test_resume_after_sigkill_mid_put(tmp_path, stage):
    root = tmp_path / "cache"
    key = cache_key(stage=stage)
    proc = _run_until_marker(tmp_path, [str(root), key, stage, str(tmp_path / "marker"), "0"])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    c = GenerationCache(root)
    assert c.check() == []
    assert c.get(key) is None and key not in c and c.list() == []
    leftovers = c.partial_files()
    assert leftovers
    if stage == "mid-file":
        assert any(p.name.endswith(".tmp") for p in leftovers)
    removed = c.cleanup_partial()
    assert sorted(removed) == sorted(leftovers) and c.partial_files() == []
    item = c.put(key, _img(9), _img(10), {"who": "fresh"})  # the dead writer's lock is gone
    assert c.get(key).meta == {"who": "fresh"} and np.array_equal(item.image, _img(9))
    assert c.check() == []


def test_sigkill_during_overwrite_never_leaves_a_stale_record(tmp_path):
    root = tmp_path / "cache"
    key = cache_key(stage="overwrite")
    c = GenerationCache(root)
    c.put(key, _img(11), None, {"who": "old"})
    proc = _run_until_marker(tmp_path, [str(root), key, "before-record", str(tmp_path / "marker"), "1"])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    # the new image is on disk but uncommitted; the old record was withdrawn first
    assert c.check() == [] and c.get(key) is None
    c.cleanup_partial()
    c.put(key, _img(12))
    assert c.check() == [] and np.array_equal(c.get(key).image, _img(12))


def test_cleanup_skips_entries_a_live_writer_holds(tmp_path):
    root = tmp_path / "cache"
    key = cache_key(stage="live")
    proc = _run_until_marker(tmp_path, [str(root), key, "before-record", str(tmp_path / "marker"), "0"])
    try:
        c = GenerationCache(root)
        assert c.partial_files()  # image and control written, no record yet
        assert c.cleanup_partial() == []  # locked by the (hung) writer: left alone
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert GenerationCache(root).cleanup_partial()


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from fsdiff.augment.cache import GenerationCache, cache_key

    root, who, go, overwrite = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"
    c = GenerationCache(root)
    while not go.exists():
        time.sleep(0.005)
    for rnd in range(6):
        for i in range(6):
            shared = cache_key(shared=i)
            img = np.random.default_rng(1000 * who + i).integers(0, 256, (96, 96, 3), dtype=np.uint8)
            item = c.put(shared, img, img // 2, {"who": who, "i": i}, overwrite=overwrite)
            exp = np.random.default_rng(1000 * item.meta["who"] + i).integers(0, 256, (96, 96, 3), dtype=np.uint8)
            assert np.array_equal(item.image, exp) and np.array_equal(item.control, exp // 2)
            own = cache_key(own=who, i=i, rnd=rnd)
            c.put(own, img, None, {"who": who})
    print("ok", who)
    """
)


def _expected(who: int, i: int) -> np.ndarray:
    return np.random.default_rng(1000 * who + i).integers(0, 256, (96, 96, 3), dtype=np.uint8)


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_processes_writing_same_and_different_keys(tmp_path, overwrite):
    root = tmp_path / "cache"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen([sys.executable, str(script), str(root), str(w), str(go), "1" if overwrite else "0"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in (1, 2)
    ]
    time.sleep(0.8)  # let both import before the start signal
    GenerationCache(root)
    go.write_text("go")
    reader = GenerationCache(root)
    while any(p.poll() is None for p in procs):  # a reader never sees an inconsistent entry
        for i in range(6):
            item = reader.get(cache_key(shared=i))
            if item is not None:
                exp = _expected(item.meta["who"], i)
                assert np.array_equal(item.image, exp) and np.array_equal(item.control, exp // 2)
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.startswith("ok")
    c = GenerationCache(root)
    assert c.check() == [] and c.partial_files() == []
    assert len(c) == 6 + 2 * 36
    for i in range(6):
        item = c.get(cache_key(shared=i))
        assert item.meta["who"] in (1, 2) and np.array_equal(item.image, _expected(item.meta["who"], i))
    for who in (1, 2):
        assert all(cache_key(own=who, i=i, rnd=r) in c for i in range(6) for r in range(6))
