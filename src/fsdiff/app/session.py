"""Per-session state of the app: supports, queries, results and a private temporary folder.

Every browser tab (gradio session) gets an :class:`AppSession` keyed by gradio's session hash, held by one
:class:`SessionStore` per app. A session's files (the pictures the page shows, the export zip) live only in
its own folder (``tempfile.mkdtemp`` under the app's root), which is removed when the tab closes (gradio's
unload event), when the session has been idle for ``ttl_s`` seconds, or when the app stops. Sessions share
nothing but the read-only models (:mod:`fsdiff.app.models`), so two users never see each other's data.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fsdiff.app.annotations import Clicks
from fsdiff.episode import Shot
from fsdiff.errors import FsdiffError
from fsdiff.io import write_image

SESSION_PREFIX = "session-"


def safe_name(name: str, fallback: str = "image") -> str:
    """A file name from an uploaded name: no folders, only letters, digits, ``._-`` (others become ``_``)."""
    base = re.split(r"[\\/]", str(name))[-1]
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return clean[:120] or fallback


@dataclass
class Picture:
    """An image held by a session: its name, the original pixels and the scaled copy the page shows."""

    name: str
    image: np.ndarray
    display: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the original image."""
        return self.image.shape[0], self.image.shape[1]

    @property
    def display_shape(self) -> tuple[int, int]:
        """(H, W) of the shown copy."""
        return self.display.shape[0], self.display.shape[1]


@dataclass
class SupportItem:
    """One support shot: the picture, the annotation given (``load_shot`` keywords), the Shot, its estimate."""

    picture: Picture
    annotation: dict
    shot: Shot
    estimate: np.ndarray | None = None
    """The mask the weak-label step estimated from a box, scribble or points (None when it has not run)."""
    origin: str = "upload"


@dataclass
class QueryItem:
    """One query: its picture, the stem of its exported files, its cached maps or the user's corrected mask."""

    picture: Picture
    stem: str
    prob: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    corrected: np.ndarray | None = None

    def mask(self, threshold: float) -> np.ndarray | None:
        """The current binary mask: the corrected one, else ``prob > threshold``, else None (not segmented)."""
        if self.corrected is not None:
            return self.corrected.astype(bool)
        return None if self.prob is None else self.prob > threshold


@dataclass
class AppSession:
    """Everything one user has in the app (see the module docstring)."""

    key: str
    folder: Path
    supports: list[SupportItem] = field(default_factory=list)
    queries: list[QueryItem] = field(default_factory=list)
    draft: Picture | None = None
    """The support image being annotated."""
    clicks: Clicks = field(default_factory=Clicks)
    threshold: float = 0.5
    view: str = "overlay"
    class_name: str = ""
    selected_query: int | None = None
    selected_support: int | None = None
    result_method: str = ""
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _renders: dict[str, int] = field(default_factory=dict, repr=False)

    def touch(self) -> None:
        """Mark the session as used now."""
        self.last_used = time.monotonic()

    def check_open(self) -> None:
        """Raise if the session was closed (its folder is gone)."""
        if self.closed:
            raise FsdiffError("this session has ended (the page was closed or idle too long); reload the page.")

    def close(self) -> None:
        """Remove the session's folder and forget its data."""
        with self.lock:
            self.closed = True
            self.supports.clear()
            self.queries.clear()
            self.draft = None
            shutil.rmtree(self.folder, ignore_errors=True)

    def unique_stem(self, name: str) -> str:
        """A file stem for a new query, unique within the session (``a``, ``a_png``, ``a_png_1``, ...)."""
        path = Path(safe_name(name))
        used = {q.stem for q in self.queries}
        stem = path.stem or "query"
        if stem in used:
            stem = f"{stem}_{path.suffix.lstrip('.') or 'noext'}"
        base, n = stem, 1
        while stem in used:
            stem, n = f"{base}_{n}", n + 1
        return stem

    def render(self, slot: str, pictures: list[tuple[np.ndarray, str]], fmt: str = "jpg") -> list[tuple[str, str]]:
        """Write ``pictures`` (arrays, captions) for one page element into a fresh sub-folder, dropping the
        element's previous pictures; returns (path, caption) pairs. JPEG for display (never exported); ``fmt='png'``
        for an RGBA editor layer."""
        with self.lock:
            return self._render(slot, pictures, fmt)

    def _render(self, slot: str, pictures: list[tuple[np.ndarray, str]], fmt: str) -> list[tuple[str, str]]:
        self.check_open()
        n = self._renders.get(slot, 0) + 1
        self._renders[slot] = n
        old, new = self.folder / f"{slot}-{n - 1}", self.folder / f"{slot}-{n}"
        shutil.rmtree(old, ignore_errors=True)
        new.mkdir(parents=True, exist_ok=True)
        out = []
        for i, (array, caption) in enumerate(pictures):
            path = new / f"{i:04d}.{fmt}"
            write_image(path, np.ascontiguousarray(array))
            out.append((str(path), caption))
        return out


class SessionStore:
    """The sessions of one app, by gradio session hash, each with a folder under ``root``."""

    def __init__(self, root: str | Path, ttl_s: float = 4 * 3600) -> None:
        self.root = Path(root)
        self.ttl_s = float(ttl_s)
        self._sessions: dict[str, AppSession] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> AppSession:
        """The open session for ``key``, created (with a new folder) when absent; idle sessions are swept first."""
        if not key:
            raise FsdiffError("no session id: this page must be used through the app's web page or gradio API.")
        self.sweep()
        with self._lock:
            session = self._sessions.get(key)
            if session is None or session.closed:
                self.root.mkdir(parents=True, exist_ok=True)
                folder = Path(tempfile.mkdtemp(prefix=SESSION_PREFIX, dir=self.root))
                session = AppSession(key=key, folder=folder)
                self._sessions[key] = session
        session.touch()
        return session

    def close(self, key: str) -> bool:
        """Close the session of ``key`` and remove its folder; False if there was none."""
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is None:
            return False
        session.close()
        return True

    def sweep(self, now: float | None = None) -> list[str]:
        """Close every session idle for longer than ``ttl_s``; returns their keys."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [k for k, s in self._sessions.items() if now - s.last_used > self.ttl_s]
            gone = [self._sessions.pop(k) for k in idle]
        for s in gone:
            s.close()
        return idle

    def close_all(self) -> None:
        """Close every session (the app is stopping)."""
        with self._lock:
            keys = list(self._sessions)
        for k in keys:
            self.close(k)

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, key: str) -> bool:
        return key in self._sessions
