"""``fsdiff app``: a web page for few-shot segmentation of one's own photos (docs/APP.md).

Upload 1..K support images and annotate them (paint a mask, draw a box, scribble, click points or upload a
mask PNG), upload queries, see the results, correct one and add it as a support, export PNG masks and COCO
json. The app is a front end of the library: it assembles episodes and calls :mod:`fsdiff.api`; it holds no
method logic. gradio is imported only when the app is built (``pip install "fsdiff[app]"``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app", "launch"]


def build_app(*args: Any, **kwargs: Any):
    """The gradio Blocks and its core (see :func:`fsdiff.app.server.build_app`)."""
    from fsdiff.app.server import build_app as build

    return build(*args, **kwargs)


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs: Any):
    """Serve the app (see :func:`fsdiff.app.server.launch`)."""
    from fsdiff.app.server import launch as run

    return run(host, port, share, **kwargs)
