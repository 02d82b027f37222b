"""Content-addressed on-disk cache for DifFSS generations (an fsdiff addition [R]: generation is the costly
offline step, so each image is made once, and its control map is kept next to it for inspection).

A generated auxiliary support is a pure function of its inputs (support image and mask, class,
condition, model ids, sampler settings, seed, prompts); :func:`cache_key` hashes all of them, so an
entry can be reused by any run that asks for the same thing.

Layout::

    root/
      fsdiff-cache.json      marker: this folder is a generation cache (format name and version)
      ab/abcdef.../          one entry per key (first two hex digits fan out the folders)
        image.png            the generated image (RGB, lossless)
        control.png          the control map it was generated from (optional)
        meta.json            the record: format version, key, each file's sha256 and size, user meta
        .lock                per-entry lock file (never deleted)

Commit protocol: every file is written to a temporary file in the entry folder, flushed and fsynced,
then ``os.replace``-d onto its name; ``meta.json`` is written **last** and is the commit point. An
entry without a valid record does not exist. A process killed mid-``put`` leaves at most temporary
files or record-less files, which readers ignore and :meth:`GenerationCache.cleanup_partial` removes.
Overwriting an entry first removes its record, so a crash never leaves an old record pointing at new
files. Writers of the same key are serialised by an exclusive ``fcntl.flock`` on ``.lock``, readers
take a shared lock, and cleanup only touches entries whose lock it can take without waiting; on
systems without ``fcntl`` the protocol still guarantees that a committed record matches its files
for deterministic writers, and :meth:`GenerationCache.get` verifies checksums.

A cache may come from elsewhere (a shared folder, an upload), so nothing in it is trusted: a record is
read only if it is at most :data:`fsdiff.limits.MAX_CACHE_RECORD_BYTES` of valid JSON whose files are the
plain names ``image.png`` / ``control.png``; every file must resolve inside the cache folder
(:func:`fsdiff.io.resolve_inside`; a symlink out of it is refused); PNGs are bounded by
:data:`fsdiff.limits.MAX_IMAGE_PIXELS` before decoding; lock files are opened without following links.
Temporary files are created with mode 0666 minus the umask (:func:`fsdiff.io.temp_beside`). A folder is
recognised as a cache by its marker file (written when a cache is created or first written to), or, for
caches made before the marker existed, by holding only fan-out folders (:func:`is_generation_cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fsdiff.errors import FsdiffError
from fsdiff.io import open_image, resolve_inside, temp_beside
from fsdiff.limits import MAX_CACHE_RECORD_BYTES

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CACHE_FORMAT_VERSION = 1
"""Bump when the layout or the meaning of a key changes; it is part of every key."""

RECORD_NAME = "meta.json"
IMAGE_NAME = "image.png"
CONTROL_NAME = "control.png"
LOCK_NAME = ".lock"
MARKER_NAME = "fsdiff-cache.json"
"""The file that marks a folder as a generation cache."""
MARKER_FORMAT = "fsdiff-generation-cache"
FILE_NAMES = {"image": IMAGE_NAME, "control": CONTROL_NAME}
"""The only files a record may name, by role."""
_TMP_SUFFIX = ".tmp"
_KEY_RE = re.compile(r"^[0-9a-f]{16,128}$")
_FAN_RE = re.compile(r"^[0-9a-f]{2}$")

KEY_FIELDS: tuple[str, ...] = (
    "image_sha256", "mask_sha256", "class_name", "condition", "model_ids", "steps", "guidance",
    "seed", "resolution", "scheduler", "eta", "prompt", "negative_prompt",
)
"""The fields :func:`generation_key` puts in a key (besides the format version and any extras)."""


# ----------------------------------------------------------------------------------------------
# keys
# ----------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def array_digest(arr: np.ndarray) -> str:
    """Hex sha256 of an array's dtype, shape and C-order bytes (equal arrays, equal digests)."""
    a = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(value: Any, where: str) -> Any:
    """A JSON-able, order-independent form of a key field."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if not math.isfinite(f):
            raise FsdiffError(f"cache key field {where} is {f}; key fields must be finite numbers.")
        return int(f) if f.is_integer() else f  # 9 and 9.0 give the same key
    if isinstance(value, np.ndarray):
        return {"__ndarray_sha256__": array_digest(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"__bytes_sha256__": sha256_bytes(bytes(value))}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise FsdiffError(f"cache key field {where} has a non-string key {k!r}.")
            out[k] = _canonical(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise FsdiffError(
        f"cache key field {where} has type {type(value).__name__}; use str, numbers, bools, None, "
        "lists, dicts, bytes or numpy arrays."
    )


def canonical_json(fields: Mapping[str, Any]) -> str:
    """The canonical JSON a key hashes: sorted keys, no spaces, floats as Python's shortest repr."""
    return json.dumps(_canonical(dict(fields), "fields"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(**fields: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``fields`` plus the cache format version."""
    if "fsdiff_cache_format" in fields:
        raise FsdiffError("'fsdiff_cache_format' is reserved; it is added to every cache key automatically.")
    payload = dict(fields)
    payload["fsdiff_cache_format"] = CACHE_FORMAT_VERSION
    return sha256_bytes(canonical_json(payload).encode("utf-8"))


def generation_key(
    *,
    image: np.ndarray,
    mask: np.ndarray,
    class_name: str,
    condition: str,
    model_ids: Mapping[str, str] | tuple[str, ...] | list[str],
    steps: int,
    guidance: float,
    seed: int,
    resolution: int,
    scheduler: str,
    eta: float,
    prompt: str,
    negative_prompt: str,
    **extra: Any,
) -> str:
    """The cache key of one DifFSS generation: every input that changes the generated image."""
    return cache_key(
        image_sha256=array_digest(image),
        mask_sha256=array_digest(mask),
        class_name=class_name,
        condition=condition,
        model_ids=model_ids,
        steps=steps,
        guidance=guidance,
        seed=seed,
        resolution=resolution,
        scheduler=scheduler,
        eta=eta,
        prompt=prompt,
        negative_prompt=negative_prompt,
        **extra,
    )


# ----------------------------------------------------------------------------------------------
# file helpers
# ----------------------------------------------------------------------------------------------


def _encode_png(arr: np.ndarray, what: str) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) array."""
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (
        arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)
    ):
        desc = f"{arr.dtype} array of shape {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise FsdiffError(f"cache {what} must be a uint8 (H, W) or (H, W, 3) array, got {desc}.")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives power loss (no-op where unsupported)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder (umask permissions), fsync, ``os.replace``."""
    fd, tmp = temp_beside(path, _TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(entry: Path, exclusive: bool, blocking: bool = True) -> Iterator[bool]:
    """Hold the entry's flock (shared or exclusive); yields False if non-blocking and busy."""
    if fcntl is None:  # pragma: no cover
        yield True
        return
    try:
        entry.mkdir(parents=True, exist_ok=True)
        fd = os.open(entry / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as exc:
        if not exclusive:  # a read-only cache (e.g. shared, mounted ro) can still be read
            yield True
            return
        raise FsdiffError(f"cache folder {entry} is not writable ({exc.strerror}); pick a writable cache folder.") from None
    try:
        flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        if not blocking:
            flags |= fcntl.LOCK_NB
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_generation_cache(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a generation cache: it holds the marker, or (older caches) only fan-out folders."""
    root = Path(root)
    if (root / MARKER_NAME).is_file():
        return True
    try:
        children = [p for p in root.iterdir() if not p.name.startswith(".")]
    except OSError:
        return False
    return bool(children) and all(_FAN_RE.match(p.name) and p.is_dir() and not p.is_symlink() for p in children)


def _write_marker(root: Path) -> bool:
    """Write the cache marker into ``root`` (best effort: a read-only folder stays unmarked); whether it exists."""
    if (root / MARKER_NAME).is_file():
        return True
    with contextlib.suppress(OSError):
        text = json.dumps({"format": MARKER_FORMAT, "version": CACHE_FORMAT_VERSION}) + "\n"
        _write_bytes(root / MARKER_NAME, text.encode("utf-8"))
        return True
    return False


# ----------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CachedItem:
    """One committed cache entry, loaded."""

    key: str
    path: Path
    image: np.ndarray
    control: np.ndarray | None
    meta: dict
    record: dict


@dataclass(frozen=True)
class CacheStats:
    """Hit/miss counters of one :class:`GenerationCache` object (this process only)."""

    hits: int
    misses: int
    puts: int

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses), 0.0 before any lookup."""
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict:
        """Plain dict for reports."""
        return {"hits": self.hits, "misses": self.misses, "puts": self.puts, "hit_rate": self.hit_rate}


class GenerationCache:
    """Content-addressed store of generated images, control maps and metadata under ``root``."""

    def __init__(self, root: str | os.PathLike, *, verify: bool = True, durable: bool = True) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise FsdiffError(f"cache root {self.root} exists and is not a folder (it is a file); pick another cache folder.")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FsdiffError(f"cannot create cache folder {self.root}: {exc.strerror}; pick a writable cache folder.") from None
        self._marked = (self.root / MARKER_NAME).is_file()
        if not self._marked and not any(self.root.iterdir()):
            self._marked = _write_marker(self.root)  # a new cache; a folder with content is marked on first put
        self.verify = verify
        self.durable = durable
        self._hits = 0
        self._misses = 0
        self._puts = 0

    # -- paths ---------------------------------------------------------------------------------

    def entry_dir(self, key: str) -> Path:
        """The folder of ``key`` (whether or not it is committed)."""
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise FsdiffError(f"invalid cache key {key!r}: expected lower-case hex from cache_key().")
        return self.root / key[:2] / key

    def _entry_dirs(self) -> Iterator[Path]:
        """Every entry folder under the root, committed or not, in sorted order."""
        for fan in sorted(self.root.iterdir()) if self.root.is_dir() else ():
            if not fan.is_dir() or fan.is_symlink() or len(fan.name) != 2:
                continue
            for entry in sorted(fan.iterdir()):
                if entry.is_dir() and not entry.is_symlink() and _KEY_RE.match(entry.name) and entry.name[:2] == fan.name:
                    yield entry

    # -- reading -------------------------------------------------------------------------------

    @staticmethod
    def _read_record(entry: Path) -> dict | None:
        """The entry's record if it is present and well-formed (bounded size, plain file names), else None."""
        path = entry / RECORD_NAME
        try:
            if path.stat().st_size > MAX_CACHE_RECORD_BYTES.value():
                return None
            rec = json.loads(path.read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(rec, dict) or rec.get("key") != entry.name or not isinstance(rec.get("files"), dict):
            return None
        for role, info in rec["files"].items():
            if not isinstance(info, dict) or FILE_NAMES.get(role) is None or info.get("name") != FILE_NAMES[role]:
                return None
        return rec

    def _file(self, entry: Path, name: str) -> Path:
        """``entry/name``, refused (FsdiffError) if it resolves outside the cache folder (a symlink out)."""
        return resolve_inside(entry / name, self.root, f"cache file {name} of entry {entry.name[:16]}…")

    def _problems(self, entry: Path, rec: dict) -> list[str]:
        """Integrity problems of one committed entry (missing files, checksum or size mismatches)."""
        out = []
        if rec.get("format") != CACHE_FORMAT_VERSION:
            out.append(f"{entry}: record format {rec.get('format')!r}, expected {CACHE_FORMAT_VERSION}")
        if "image" not in rec["files"]:
            out.append(f"{entry}: record lists no image")
        for role, info in rec["files"].items():
            name = info.get("name") if isinstance(info, dict) else None
            if name != FILE_NAMES.get(role):
                out.append(f"{entry}: bad file entry for {role}: {str(info)[:80]!r}")
                continue
            try:
                p = self._file(entry, name)
            except FsdiffError as exc:
                out.append(str(exc))
                continue
            if not p.is_file():
                out.append(f"{entry}: {role} file {name} is missing")
                continue
            if p.stat().st_size != info.get("bytes"):
                out.append(f"{entry}: {role} file {name} has {p.stat().st_size} bytes, record says {info.get('bytes')}")
                continue
            if file_digest(p) != info.get("sha256"):
                out.append(f"{entry}: {role} file {name} does not match its sha256 in the record")
        return out

    def _load(self, entry: Path, rec: dict) -> CachedItem:
        """Decode a committed entry's files."""
        def png(role: str) -> np.ndarray | None:
            info = rec["files"].get(role)
            if info is None:
                return None
            with open_image(self._file(entry, info["name"]), f"cached {role}") as im:
                return np.asarray(im).copy()

        return CachedItem(
            key=entry.name, path=entry, image=png("image"), control=png("control"),
            meta=dict(rec.get("meta") or {}), record=rec,
        )

    def get(self, key: str) -> CachedItem | None:
        """The committed entry for ``key`` (checksums verified unless ``verify=False``), or None."""
        entry = self.entry_dir(key)
        item = None
        if (entry / RECORD_NAME).is_file():
            with _locked(entry, exclusive=False):
                rec = self._read_record(entry)
                if rec is not None and not (self.verify and self._problems(entry, rec)):
                    try:
                        item = self._load(entry, rec)
                    except (OSError, ValueError, KeyError):
                        item = None
        if item is None:
            self._misses += 1
        else:
            self._hits += 1
        return item

    def contains(self, key: str) -> bool:
        """Whether ``key`` has a committed record (files not verified; does not count as a lookup)."""
        return self._read_record(self.entry_dir(key)) is not None

    __contains__ = contains

    def records(self) -> Iterator[dict]:
        """The record (``key``, ``files``, ``meta``, ``created``, ...) of every committed entry, in key order."""
        for entry in self._entry_dirs():
            rec = self._read_record(entry)
            if rec is not None:
                yield rec

    def keys(self) -> list[str]:
        """Keys of all committed entries, sorted."""
        return [rec["key"] for rec in self.records()]

    def list(self) -> list[str]:  # noqa: A003 - the name the design asks for
        """Keys of all committed entries, sorted (same as :meth:`keys`)."""
        return self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    # -- writing -------------------------------------------------------------------------------

    def put(
        self,
        key: str,
        image: np.ndarray,
        control: np.ndarray | None = None,
        meta: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> CachedItem:
        """Store an entry atomically; the record is written last. Returns the committed entry.

        If ``key`` is already committed and intact and ``overwrite`` is False, nothing is written and
        the existing entry is returned (so concurrent writers of one key both succeed with one result).
        """
        entry = self.entry_dir(key)
        blobs = {"image": (IMAGE_NAME, _encode_png(image, "image"))}
        if control is not None:
            blobs["control"] = (CONTROL_NAME, _encode_png(control, "control"))
        try:
            meta_json = json.loads(json.dumps(dict(meta or {}), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise FsdiffError(f"cache meta for {key[:12]}… must be JSON-serialisable (finite numbers): {exc}.") from None

        if not self._marked:
            self._marked = _write_marker(self.root)
        entry.mkdir(parents=True, exist_ok=True)
        self._file(entry, LOCK_NAME)  # an entry folder linked out of the cache is never written into
        with _locked(entry, exclusive=True):
            rec = self._read_record(entry)
            if rec is not None and not overwrite and not self._problems(entry, rec):
                return self._load(entry, rec)
            # Un-commit first: a crash below must not leave an old record describing new files.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry / RECORD_NAME)
            for stale in (IMAGE_NAME, CONTROL_NAME):
                if stale not in {n for n, _ in blobs.values()}:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry / stale)
            files = {}
            for role, (name, data) in blobs.items():
                _write_bytes(entry / name, data)
                files[role] = {"name": name, "sha256": sha256_bytes(data), "bytes": len(data)}
            record = {
                "format": CACHE_FORMAT_VERSION,
                "key": key,
                "created": time.time(),
                "files": files,
                "meta": meta_json,
            }
            _write_bytes(entry / RECORD_NAME, json.dumps(record, indent=1, sort_keys=True).encode("utf-8"))
            if self.durable:
                _fsync_dir(entry)
            self._puts += 1
            return self._load(entry, record)

    def delete(self, key: str) -> bool:
        """Remove an entry (record first); returns whether it was committed."""
        entry = self.entry_dir(key)
        if not entry.is_dir():
            return False
        self._file(entry, LOCK_NAME)
        with _locked(entry, exclusive=True):
            was = self._read_record(entry) is not None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry / RECORD_NAME)
            for p in entry.iterdir():
                if p.name != LOCK_NAME and p.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
        return was

    # -- maintenance ---------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Verify every committed entry's files exist and match their recorded sha256; list problems.

        Temporary and uncommitted files (left by interrupted writes) are not problems: they are
        invisible to readers; :meth:`cleanup_partial` removes them.
        """
        problems: list[str] = []
        for entry in self._entry_dirs():
            if not (entry / RECORD_NAME).exists():
                continue
            rec = self._read_record(entry)
            if rec is None:
                problems.append(f"{entry}: {RECORD_NAME} is unreadable or does not name this key")
                continue
            problems.extend(self._problems(entry, rec))
        return problems

    def partial_files(self) -> list[Path]:
        """Leftovers of interrupted writes: temporary files, and files of entries with no record."""
        out: list[Path] = []
        for entry in self._entry_dirs():
            committed = self._read_record(entry) is not None
            for p in sorted(entry.iterdir()):
                if p.name == LOCK_NAME:
                    continue
                if p.name.endswith(_TMP_SUFFIX) or not committed:
                    out.append(p)
        return out

    def cleanup_partial(self) -> list[Path]:
        """Delete leftovers of interrupted writes in entries no process is writing; return what went."""
        removed: list[Path] = []
        for entry in self._entry_dirs():
            with _locked(entry, exclusive=True, blocking=False) as got:
                if not got:
                    continue  # a live writer holds it
                committed = self._read_record(entry) is not None
                for p in sorted(entry.iterdir()):
                    if p.name == LOCK_NAME or not p.is_file():
                        continue
                    if p.name.endswith(_TMP_SUFFIX) or not committed:
                        with contextlib.suppress(FileNotFoundError):
                            p.unlink()
                            removed.append(p)
        return removed

    def stats(self) -> CacheStats:
        """Hits, misses and puts of this object so far."""
        return CacheStats(self._hits, self._misses, self._puts)
