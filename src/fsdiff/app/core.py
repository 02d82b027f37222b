"""What every handler of the app shares: the limits, the sessions, the models and the app's root folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fsdiff.app.config import AppConfig
from fsdiff.app.models import ModelCache
from fsdiff.app.session import SessionStore

CACHE_SWEEP = (3600, 3600)
"""gradio's ``delete_cache`` (every hour, files older than an hour)."""


@dataclass
class AppCore:
    """What the page's handlers share: the limits, the sessions, the models and the root folder."""

    config: AppConfig
    root: Path
    store: SessionStore = field(init=False)
    models: ModelCache = field(default_factory=ModelCache)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.store = SessionStore(self.root / "sessions", self.config.session_ttl_s)

    def shutdown(self) -> None:
        """Close every session and remove the root folder."""
        self.store.close_all()
        shutil.rmtree(self.root, ignore_errors=True)


def make_core(config: AppConfig | None = None, root: str | os.PathLike | None = None,
              models: ModelCache | None = None) -> AppCore:
    """A new app core with its own root folder (created; removed by :meth:`AppCore.shutdown`)."""
    base = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="fsdiff-app-"))
    base.mkdir(parents=True, exist_ok=True)
    return AppCore(config or AppConfig.from_env(), base, models or ModelCache())
