"""One running app: its temporary root folder, its sessions, its shared models, and how it is served.

The root (``tempfile.mkdtemp``) is gradio's upload and cache folder (``GRADIO_TEMP_DIR``) and holds every
session folder, so gradio serves the session's pictures and zip in place instead of copying them elsewhere;
uploads are deleted once read, gradio's own cached files are swept hourly and the whole root is removed when
the app stops. The app runs offline: no analytics, no share link unless asked, a theme with system fonts
(gradio's default theme loads web fonts).
"""

from __future__ import annotations

import atexit
import os

from fsdiff.app.config import AppConfig
from fsdiff.app.core import AppCore, make_core

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def offline_environment() -> None:
    """Turn off gradio's and the Hugging Face hub's network calls (analytics, telemetry, version checks)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_app(config: AppConfig | None = None, *, core: AppCore | None = None):
    """The gradio Blocks of the app (not launched) and its core; sets ``GRADIO_TEMP_DIR`` to the core's root."""
    offline_environment()
    core = core or make_core(config)
    os.environ["GRADIO_TEMP_DIR"] = str(core.root)
    from fsdiff.app.ui import build_blocks

    return build_blocks(core), core


def launch(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, share: bool = False, *,
           config: AppConfig | None = None, block: bool = True):
    """Build and serve the app on ``host:port`` (a public gradio share link only with ``share``)."""
    from fsdiff.app import jobs
    from fsdiff.app.ui import THEME, launch_options

    demo, core = build_app(config)
    atexit.register(core.shutdown)
    jobs.configure_threads(core.config.torch_threads())
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=int(port), share=bool(share), prevent_thread_lock=not block,
                theme=THEME, **launch_options(core))
    return demo, core
