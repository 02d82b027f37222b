"""The app's limits and settings (docs/APP.md "Limits and safety"), each overridable by an environment variable.

Uploads are bounded twice: gradio refuses any file above ``max_file_mb`` before it reaches fsdiff (its
``max_file_size``), and every image is checked from its header against ``max_pixels`` before it is
decoded, then decoded by the same code as the CLI (:mod:`fsdiff.inputs` / :mod:`fsdiff.io`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from fsdiff.errors import FsdiffError


def _library_max_pixels() -> int:
    """The library's image pixel limit where it has one (``fsdiff.limits``), else 50 MP (the same default)."""
    try:
        from fsdiff.limits import MAX_IMAGE_PIXELS  # type: ignore[import-not-found]
    except ImportError:
        return 50_000_000
    return int(MAX_IMAGE_PIXELS.value())


@dataclass(frozen=True)
class AppConfig:
    """Limits and settings of one app instance (environment variables ``FSDIFF_APP_<FIELD>`` override them)."""

    max_file_mb: int = 25
    """Largest uploaded file (images, masks, a zip of queries), in MB; enforced by gradio before upload."""
    max_pixels: int = 0
    """Largest image, width x height (0: the library's limit, 50 MP by default)."""
    max_queries: int = 200
    """Most query images held by one session."""
    max_supports: int = 20
    """Most support shots (K) in one session."""
    max_zip_mb: int = 200
    """Most bytes (uncompressed, MB) extracted from one uploaded zip of queries."""
    display_side: int = 1024
    """Images are shown (and painted on) at most this many pixels on their longer side."""
    threads: int = 0
    """Torch threads of the one worker that runs the models (0: one less than the CPU count, at least 1)."""
    session_ttl_s: int = 4 * 3600
    """A session idle this long is closed and its folder removed, even if its browser tab never said goodbye."""

    def pixels(self) -> int:
        """The pixel limit in force."""
        return self.max_pixels or _library_max_pixels()

    def torch_threads(self) -> int:
        """The worker's torch thread count."""
        return self.threads or max(1, (os.cpu_count() or 2) - 1)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: int) -> "AppConfig":
        """Defaults, then ``FSDIFF_APP_<FIELD>`` variables (e.g. ``FSDIFF_APP_MAX_FILE_MB=50``), then ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, int] = {}
        for f in fields(cls):
            text = env.get(f"FSDIFF_APP_{f.name.upper()}", "").strip()
            if text:
                try:
                    values[f.name] = int(text)
                except ValueError:
                    values[f.name] = -1
                if values[f.name] < 0:
                    raise FsdiffError(f"environment variable FSDIFF_APP_{f.name.upper()}={text!r}: expected a "
                                      f"non-negative integer ({f.name}, default {getattr(cls, f.name)}).")
        values.update(overrides)
        return cls(**values)
